"""Health figures from run and task-instance records (the pure part; the API server and the REST
reader feed it real records in test_incident_scheduler.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from closedloop.records.health import figures
from closedloop.web.health_page import render

T0 = datetime(2026, 11, 20, 8, tzinfo=UTC)


def run(dag, rid, state, day, queued_after=0, note=None):
    at = T0 + timedelta(days=day)
    return {"dag_id": dag, "run_id": rid, "state": state, "run_type": "manual", "run_after": at,
            "queued_at": at + timedelta(seconds=queued_after), "start_date": at, "end_date": None, "note": note}


def ti(dag, rid, task, state, queued, start, end, tries=1):
    return {"dag_id": dag, "run_id": rid, "task_id": task, "state": state, "try_number": tries,
            "queued_dttm": T0 + timedelta(seconds=queued), "start_date": T0 + timedelta(seconds=start),
            "end_date": T0 + timedelta(seconds=end)}


def test_figures_per_pipeline():
    runs = [run("p", "a", "success", 0), run("p", "b", "failed", 1), run("p", "c", "running", 2),
            run("p_incident", "i", "success", 0), run("q", "z", "success", 0)]
    tis = [ti("p", "a", "generate_dataset", "success", 0, 2, 5), ti("p", "a", "register_candidate", "success", 50, 51, 60),
           ti("p", "b", "train", "failed", 0, 6, 9, tries=3), ti("p_incident", "i", "admit_incident", "success", 0, 1, 2),
           ti("p_incident", "i", "register_candidate", "success", 30, 31, 40),
           ti("p_incident", "i", "promote", "success", 88, 89, 90), ti("p_incident", "i", "approval", "success", 40, 41, 80),
           ti("p", "c", "approval", "awaiting_input", 10, 11, 11)]
    h = figures({"p": ["p", "p_incident"], "q": ["q"]}, runs, tis, since=T0, until=T0 + timedelta(days=3))
    p = h["pipelines"]["p"]
    assert p["runs"] == 4 and p["incident_runs"] == 1 and p["by_state"] == {"failed": 1, "running": 1, "success": 2}
    assert p["failure_rate"] == round(1 / 3, 3)
    assert p["queue_wait_s"]["n"] == 8 and p["queue_wait_s"]["median"] == 1.0 and p["queue_wait_s"]["p95"] == 6.0
    assert p["lead_time_to_candidate_s"] == {"n": 2, "median": 50.0, "p95": 60.0}
    assert p["incident_to_production_s"] == {"n": 1, "median": 90.0, "p95": 90.0}
    assert p["retries"] == 1 and p["pending_approvals"] == 1
    assert p["per_day"][T0.date().isoformat()] == {"success": 2, "rejected": 0, "failed": 0, "other": 0}
    assert h["pipelines"]["q"]["runs"] == 1 and h["pipelines"]["q"]["failure_rate"] == 0.0
    page = render({**h, "versions": {"p": {"production": "3", "candidate": "4"}}}, 7)
    assert page.count('class="runs-chart"') == 2 and 'data-kind="failed" data-count="1"' in page
    assert "<b>33%</b>failure rate (errors)" in page and "<b>3</b>production version" in page
    assert 'data-figure="registry"' not in page  # nothing unexplained: no alarm
    moved = "p_model@production → version 5, but the last sealed promotion (promotion by x) put version 3 there"
    h["versions"] = {"p": {"production": "5", "candidate": "4", "registry_problems": [moved]}}
    page = render(h, 7)
    assert '<div class="card alarm" data-figure="registry"><b>Registry: unexplained alias move</b>' in page
    assert "p_model@production → version 5" in page
    from closedloop.records.render import format_health

    assert f"  UNEXPLAINED  {moved}" in format_health(h)


def test_cache_figures_count_the_step_runs_tags_in_the_window(tmp_path):
    """Real MLflow (SQLite in a temp dir): hits, misses and runs with the cache off, per step."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from closedloop.records.health import cache_figures
    from closedloop.records.render import format_health

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("closedloop/p", artifact_location=str(tmp_path / "a"))
    for step, state in [("train", "hit"), ("label", "hit"), ("train", "hit"), ("simulate", "miss"),
                        ("train", "off"), ("release_gate", None)]:
        c.create_run(exp, tags={"closedloop.step": step, **({"closedloop.cache": state} if state else {})})
    spec = SimpleNamespace(spec=SimpleNamespace(name="p"))
    other = SimpleNamespace(spec=SimpleNamespace(name="never_ran"))
    since = datetime.now(UTC) - timedelta(hours=1)
    got = cache_figures([spec, other], since, uri)
    assert got["p"] == {"hits": 3, "misses": 1, "off": 1, "hit_rate": 0.75, "hits_by_step": {"label": 1, "train": 2}}
    assert got["never_ran"]["hits"] == 0 and got["never_ran"]["hit_rate"] is None
    assert cache_figures([spec], datetime.now(UTC) + timedelta(hours=1), uri)["p"]["hits"] == 0  # outside the window
    h = figures({"p": ["p"]}, [], [], since=since, until=datetime.now(UTC))
    h["cache"] = got
    assert "step cache   3 hits, 1 misses (75% hit rate), 1 with the cache off; hits: label 1, train 2" in format_health(h)
    page = render(h, 1)
    assert 'data-figure="cache_hits"><b>3 of 4</b>' in page and 'data-step="train" data-hits="2"' in page


def test_a_gate_rejection_is_an_outcome_not_a_failure():
    note = "rejected by gate sim.hard_braking.collision_rate: lower bound 37 % > max 5 % at 95 %"
    runs = [run("p", "a", "success", 0), run("p", "b", "failed", 0, note=note), run("p", "c", "failed", 0),
            run("p", "d", "failed", 1, note="rejected by gate offline.rmse, sim.collision_rate: 0.4 > max 0.35")]
    h = figures({"p": ["p"]}, runs, [], since=T0, until=T0 + timedelta(days=2))
    p = h["pipelines"]["p"]
    assert p["failure_rate"] == 0.25 and p["gate_rejections"] == 2 and p["gate_rejection_rate"] == 0.5
    assert p["rejected_by"] == {"sim.hard_braking.collision_rate": 1, "offline.rmse": 1, "sim.collision_rate": 1}
    assert p["per_day"][T0.date().isoformat()] == {"success": 1, "rejected": 1, "failed": 1, "other": 0}
    page = render(h, 7)
    assert 'data-kind="rejected" data-count="1"' in page and "<b>25%</b>failure rate (errors)" in page
    assert "<b>2 (50%): sim.hard_braking.collision_rate 1" in page
    from closedloop.records.render import format_health

    assert "failure rate 25% (errors), rejected by a gate 2 (sim.hard_braking.collision_rate 1" in format_health(h)

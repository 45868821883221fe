"""Incident runs through real Airflow (dag.test, Airflow's own asset state store), real MLflow and
real Great Expectations: the shipped data mix fails the hard-braking gate, an incident retrain
mines hard braking and passes; repeats are debounced; malformed incidents start nothing.

The same DAGs under a real scheduler, triggerer and API server (events posted by REST, the inbox
watcher, the KPI watcher) are in test_incident_scheduler.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from mlflow import MlflowClient

from closedloop import settings
from closedloop.local.run import load_dag, run_dag
from tests.conftest import NO_REVIEW, template_text

pytestmark = pytest.mark.integration

WHEN = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
MODEL = "acc_inc_model"
INCIDENT = {"model": MODEL, "scenario_type": "hard_braking", "severity": "high", "kind": "collision",
            "log_refs": ["s3://fleet-logs/eu/2026-11-22/veh-042/clip-17.mcap"], "vehicle": "veh-042",
            "description": "rear-end collision: lead vehicle emergency stop on the A9"}


def states(summary: dict) -> dict[str, str]:
    return {t["task_id"]: t["state"] for t in summary["tasks"]}


def error_of(summary: dict, task_id: str) -> dict:
    return next(t for t in summary["tasks"] if t["task_id"] == task_id)["error"]


@pytest.fixture(scope="module")
def runs(airflow_db, tmp_path_factory, project):
    """One periodic run with the shipped data mix, then incident runs, in one scratch project."""
    import airflow.settings

    from tests.conftest import scratch_project

    root = scratch_project(tmp_path_factory.mktemp("incident"))
    (root / "include" / "pipelines" / "acc_inc.yaml").write_text(template_text(project, **NO_REVIEW, **{
        "name: acc_longitudinal": "name: acc_inc", "name: acc_longitudinal_policy": f"name: {MODEL}"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(root / "dags"))
        old, airflow.settings.DAGS_FOLDER = airflow.settings.DAGS_FOLDER, str(root / "dags")
        try:
            out = {"periodic": run_dag(load_dag("acc_inc"), WHEN)}
            incident_dag = load_dag("acc_inc_incident")
            out["incident"] = run_dag(incident_dag, WHEN.replace(hour=4), conf={"incident": INCIDENT})
            out["repeat"] = run_dag(incident_dag, WHEN.replace(hour=4, minute=10),
                                    conf={"incident": {**INCIDENT, "vehicle": "veh-077"}})
            out["malformed"] = run_dag(incident_dag, WHEN.replace(hour=5), conf={"incident": {
                "model": MODEL, "severity": "urgent", "kind": "collision"}})
            out["other_model"] = run_dag(incident_dag, WHEN.replace(hour=6), conf={"incident": {
                **INCIDENT, "model": "acc_unknown_model"}})
        finally:
            airflow.settings.DAGS_FOLDER = old
    return out


def test_periodic_model_with_rare_hard_braking_fails_the_hard_braking_gate(runs):
    s = runs["periodic"]
    assert s["state"] == "failed"
    assert states(s)["release_gate"] == "failed" and states(s)["register_candidate"] == "upstream_failed"
    failed = {g["metric"] for g in error_of(s, "release_gate")["report"] if not g["passed"]}
    assert "sim.hard_braking.collision_rate" in failed
    assert s["results"]["generate_dataset"]["focus"] == {"hard_braking": 0.1}


def test_incident_retrain_mines_the_incident_scenario_and_becomes_candidate(runs):
    s = runs["incident"]
    assert s["state"] == "success", s
    admitted = s["results"]["admit_incident"]
    assert admitted["admitted"] and [i["vehicle"] for i in admitted["incidents"]] == ["veh-042"]
    raw, periodic_raw = s["results"]["generate_dataset"], runs["periodic"]["results"]["generate_dataset"]
    assert raw["focus"] == {"hard_braking": 2.0}  # sampling 0.1 x incidents.focus 20
    assert raw["rows_per_scenario"]["hard_braking"] > 10 * periodic_raw["rows_per_scenario"]["hard_braking"]
    assert raw["digest"] != periodic_raw["digest"]
    assert s["results"]["simulate"]["metrics"]["sim.hard_braking.collision_rate"] == 0

    client = MlflowClient(settings.tracking_uri())
    mv = client.get_model_version_by_alias(MODEL, "candidate")
    assert str(mv.version) == s["registry"]["version"]
    assert mv.tags["closedloop.trigger"] == "incident"
    assert mv.tags["closedloop.incident.id"] == admitted["incidents"][0]["id"]
    assert mv.tags["closedloop.incident.scenario_type"] == "hard_braking"
    assert mv.tags["closedloop.incident.log_refs"] == INCIDENT["log_refs"][0]
    assert mv.tags["closedloop.request.ticket"] == admitted["incidents"][0]["id"]
    # the model card quotes the request (the incident's words) as written, Markdown escaped
    assert "> Incident retrain" in mv.description and "collision in hard\\_braking \\(high\\)" in mv.description
    from closedloop.runtime.pages import quoted

    assert quoted(mv.tags["closedloop.request.purpose"]) in mv.description
    train_run = client.get_run(s["results"]["train"]["run_id"])
    assert train_run.data.tags["closedloop.trigger"] == "incident"
    assert train_run.data.tags["airflow.dag_id"] == "acc_inc_incident"


def test_repeat_of_the_same_problem_within_the_debounce_window_starts_nothing(runs):
    s = runs["repeat"]
    assert states(s)["admit_incident"] == "skipped"
    assert {t: st for t, st in states(s).items() if t != "admit_incident"} == {
        t: "skipped" for t in states(s) if t != "admit_incident"}
    decision = s["results"]["admit_incident"]
    assert decision["admitted"] is False
    assert list(decision["merged_into"].values()) == [runs["incident"]["run_id"]]
    versions = MlflowClient(settings.tracking_uri()).search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1


@pytest.mark.parametrize("case, problems", [
    ("malformed", ["scenario_type: required", "severity: expected one of ['low', 'medium', 'high', 'critical'], "
                                              "got 'urgent'"]),
    ("other_model", ["model: unknown model 'acc_unknown_model'"]),
])
def test_malformed_incident_fails_admission_with_every_problem_and_starts_nothing(runs, case, problems):
    s = runs[case]
    assert s["state"] == "failed"
    assert states(s)["admit_incident"] == "failed"
    assert states(s)["generate_dataset"] == "upstream_failed"
    error = error_of(s, "admit_incident")
    assert error["permanent"] and error["error_class"] == "PermanentError"
    for problem in problems:
        assert problem in error["message"]
    assert len(MlflowClient(settings.tracking_uri()).search_model_versions(f"name = '{MODEL}'")) == 1

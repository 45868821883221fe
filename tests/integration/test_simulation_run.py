"""Sharded simulation and incident regression scenarios through real Airflow (dag.test: dynamic
task mapping, deferral to the triggerer's trigger inline), real MLflow and the real simulator.

One scratch project, in order: an unsharded run; the same template sharded in three (a shard
failed once by a drill); an incident with the scenario it happened in; the sharded run again,
whose model (the same, from the cache) fails the incident's scenario and is stopped at the gate."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from mlflow import MlflowClient

from closedloop import settings
from closedloop.local.run import load_dag, run_dag
from closedloop.runtime.faults import matrix
from tests.conftest import NO_REVIEW, SAFE_DATA, SHIPPED_ADAPTIVE, scratch_project, template_text

pytestmark = pytest.mark.integration

WHEN = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
MODEL = "acc_sim_model"
SHARDED = {"scenario_set: standard": "scenario_set: standard\n  shards: {count: 3}"}
# the simulation features, not a safety policy: no adaptive budget, gates any policy meets but the regression one
PLAIN = {SHIPPED_ADAPTIVE: "", "gates:\n": "gates:\n  - metric: sim.regression.collision_rate\n    max: 0.0\n"}
ADAPTIVE = {SHIPPED_ADAPTIVE: "  adaptive: {max_episodes: 400}\n",
            "  - metric: sim.collision_rate\n    max: 1.0\n": "  - metric: sim.collision_rate\n    max: 0.05\n"}
# the learned policy brakes too late here; the expert behind its labels does not collide (see test_driving)
INCIDENT = {"id": "INC-2026-0042", "model": MODEL, "scenario_type": "hard_braking", "severity": "critical",
            "kind": "collision", "vehicle": "veh-311", "description": "lead emergency stop at 28 m/s, 20 m gap",
            "scenario": {"params": {"decel": 9.0, "gap": 20, "ego_speed": 28}, "seed": 9100}}


def states(summary: dict) -> dict[str, str]:
    return {t["task_id"] + (f"[{t['map_index']}]" if "map_index" in t else ""): t["state"] for t in summary["tasks"]}


def tries(summary: dict) -> dict[str, int]:
    return {t["task_id"] + (f"[{t['map_index']}]" if "map_index" in t else ""): t["try_number"] for t in summary["tasks"]}


@pytest.fixture(scope="module")
def runs(airflow_db, tmp_path_factory, project):
    import airflow.settings

    root = scratch_project(tmp_path_factory.mktemp("simulation"))
    path = root / "include" / "pipelines" / "acc_sim.yaml"
    base = {**NO_REVIEW, **SAFE_DATA, **PLAIN, "name: acc_longitudinal": "name: acc_sim",
            "name: acc_longitudinal_policy": f"name: {MODEL}", "retries: 2": "retries: 4",
            "retry_delay_seconds: 20": "retry_delay_seconds: 1", "max_retry_delay_seconds: 600": "max_retry_delay_seconds: 2"}
    faults = root / "faults.json"
    out = {"root": root}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(root / "dags"))
        mp.setenv("CLOSEDLOOP_FAULTS", str(faults))
        old, airflow.settings.DAGS_FOLDER = airflow.settings.DAGS_FOLDER, str(root / "dags")
        try:
            path.write_text(template_text(project, gates="lax", **base))
            out["unsharded"] = run_dag(load_dag("acc_sim"), WHEN)
            path.write_text(template_text(project, gates="lax", **base, **SHARDED))
            # shard 2 fails once after launching its job; merge_simulation at each of its crash points
            marks = root / "marks"
            marks.mkdir()
            out["merge_points"] = [p for p, _ in matrix()["merge_simulation"]]
            faults.write_text(json.dumps([{"task": "simulate", "map_index": 1, "point": "job_launched",
                                           "fault": "transient", "tries": [1]}] + [
                {"task": "merge_simulation", "point": p, "fault": "transient", "once": True, "dag": "acc_sim",
                 "mark": str(marks / p)} for p in out["merge_points"]]))
            out["sharded"] = run_dag(load_dag("acc_sim"), WHEN.replace(hour=5))
            faults.unlink()
            out["incident"] = run_dag(load_dag("acc_sim_incident"), WHEN.replace(hour=6), conf={"incident": INCIDENT})
            out["after"] = run_dag(load_dag("acc_sim"), WHEN.replace(hour=7))
            path.write_text(template_text(project, gates="lax", **{**base, **ADAPTIVE}))
            out["adaptive"] = run_dag(load_dag("acc_sim"), WHEN.replace(hour=8))
            path.write_text(template_text(project, gates="lax", **{**base, **ADAPTIVE, SHIPPED_ADAPTIVE:
                                          ADAPTIVE[SHIPPED_ADAPTIVE] + "  shards: {by: scenario_type}\n"}))
            out["adaptive_sharded"] = run_dag(load_dag("acc_sim"), WHEN.replace(hour=9))
        finally:
            airflow.settings.DAGS_FOLDER = old
    return out


def test_sharded_and_unsharded_simulation_give_the_same_metrics(runs):
    one, three = runs["unsharded"], runs["sharded"]
    assert one["state"] == three["state"] == "success", (states(one), states(three))
    assert [t for t in states(three) if t.startswith("simulate")] == ["simulate[0]", "simulate[1]", "simulate[2]"]
    shards = three["results"]["simulate"]
    assert [s["shard"] for s in shards] == ["1/3", "2/3", "3/3"] and sum(s["episodes"] for s in shards) == 26
    merged = three["results"]["merge_simulation"]
    assert merged["metrics"] == one["results"]["simulate"]["metrics"]  # same seeds, same numbers
    assert merged["shards"] == 3 and merged["episodes"] == one["results"]["simulate"]["episodes"] == 26
    # the model judged is the same one (its steps came from the cache); the gates read the merged result
    assert three["results"]["train"]["model_uri"] == one["results"]["train"]["model_uri"]
    gate = {r["metric"]: r for r in three["results"]["release_gate"]["report"]}
    assert gate["sim.collision_rate"]["value"] == merged["metrics"]["sim.collision_rate"]
    client = MlflowClient(settings.tracking_uri())
    episodes = client.download_artifacts(merged["run_id"], "simulation/episodes.json", str(runs["root"]))
    ids = [e["id"] for e in json.loads(open(episodes).read())]
    assert len(ids) == len(set(ids)) == 26 and ids[0] == "highway-cruise#0"


def test_merge_simulation_struck_at_each_crash_point_merges_once(runs):
    """merge_simulation's crash-point matrix (a transient error at each point, in one run): each retry
    finishes in the same MLflow run; one merged result, the same as without the faults."""
    three = runs["sharded"]
    assert sorted(p.name for p in (runs["root"] / "marks").iterdir()) == sorted(runs["merge_points"])
    assert tries(three)["merge_simulation"] == len(runs["merge_points"]) + 1
    client = MlflowClient(settings.tracking_uri())
    exp = client.get_experiment_by_name("closedloop/acc_sim")
    merges = client.search_runs([exp.experiment_id], filter_string=f"tags.`airflow.run_id` = '{three['run_id']}' "
                                                                   "and tags.`closedloop.step` = 'merge_simulation'")
    assert [r.info.status for r in merges] == ["FINISHED"] and merges[0].info.run_id == \
        three["results"]["merge_simulation"]["run_id"]
    assert three["results"]["merge_simulation"]["metrics"] == runs["unsharded"]["results"]["simulate"]["metrics"]


def test_a_failed_shard_is_retried_alone_and_attaches_to_its_job(runs):
    three = runs["sharded"]
    assert {k: v for k, v in tries(three).items() if k.startswith("simulate")} == \
        {"simulate[0]": 1, "simulate[1]": 2, "simulate[2]": 1}
    from closedloop.runtime.context import RunContext
    from closedloop.steps.simulation import Shard, job_dir, local_log_path

    ctx = RunContext(pipeline="acc_sim", template_digest="", dag_id="acc_sim", run_id=three["run_id"])
    for i in range(3):  # one job per shard, each started once: the retried shard attached to its job
        job = job_dir(ctx, Shard(i, 3))
        assert local_log_path(job).read_text().count("simulating ") == 1, i
        assert json.loads(open(f"{job}/result.json").read())["episodes"]


def test_an_incident_becomes_a_regression_scenario_the_next_candidate_must_pass(runs):
    from closedloop.steps.regression import catalog

    inc = runs["incident"]
    assert inc["results"]["admit_incident"]["admitted"]
    cat = catalog(settings.data_root(), MODEL)
    assert [e["incident"]["id"] for e in cat["entries"]] == ["INC-2026-0042"] and cat["version"].startswith("v1-")
    (entry,) = cat["entries"]
    assert entry["scenario"]["params"] == {"decel": 9.0, "gap": 20.0, "ego_speed": 28.0}
    assert entry["lineage"]["dag_id"] == "acc_sim_incident" and entry["lineage"]["run_id"] == inc["run_id"]
    # the incident's own retrain already simulated it
    inc_sim = inc["results"]["merge_simulation"]
    assert inc_sim["metrics"]["sim.regression.episodes"] == 3 and inc_sim["regression_catalog"] == cat["version"]

    after, before = runs["after"], runs["sharded"]
    assert after["state"] == "failed" and states(after)["release_gate"] == "failed"
    assert states(after)["register_candidate"] == "upstream_failed"
    assert after["results"]["train"]["model_uri"] == before["results"]["train"]["model_uri"]  # the same model...
    assert before["results"]["merge_simulation"]["metrics"]["sim.regression.episodes"] == 0  # ...passed without it
    shard_hits = [s["cache"]["hit"] for s in after["results"]["simulate"]]
    assert shard_hits == [False, False, False] or shard_hits.count(False) >= 1  # the catalog is in the key
    report = {r["metric"]: r for r in next(t for t in after["tasks"] if t["task_id"] == "release_gate")["error"]["report"]}
    failed = [m for m, r in report.items() if not r["passed"]]
    assert failed == ["sim.regression.collision_rate"]  # stopped by the incident's scenario only
    (outcome,) = report["sim.regression.collision_rate"]["incidents"]
    assert outcome == {"incident": "INC-2026-0042", "type": "hard_braking", "episodes": 3, "collisions": 3,
                       "min_ttc_s": 0.0}
    assert report["sim.regression.collision_rate"]["value"] == 1.0


def test_the_trace_names_the_regression_catalog_and_each_incident(runs):
    from closedloop.records.lineage import trace
    from closedloop.records.render import format_trace

    t = trace(runs["after"]["run_id"])
    assert t["simulation"]["shards"] == 3 and t["simulation"]["regression_catalog"].startswith("v1-")
    text = format_trace(t)
    assert "in 3 shards, regression catalog v1-" in text
    assert "incident INC-2026-0042: 3 collision(s) in 3 episode(s) of hard_braking" in text
    # the regression scenarios (one per admitted incident: the list that grows) are paged, with their total
    assert t["totals"] == {"regression": 1} and [i["incident"] for i in t["simulation"]["regression"]] == ["INC-2026-0042"]
    page = trace(runs["after"]["run_id"], limit=1, offset=1)
    assert page["totals"] == {"regression": 1} and page["simulation"]["regression"] == []
    assert page["simulation"]["regression_catalog"] == t["simulation"]["regression_catalog"]
    assert "0 of 1 regression scenarios shown, from number 2" in format_trace(page)
    from closedloop.records.lineage import MAX_LIMIT, LineageError

    for bad in ({"limit": 0}, {"limit": MAX_LIMIT + 1}, {"offset": -1}):
        with pytest.raises(LineageError, match="limit must be"):
            trace(runs["after"]["run_id"], **bad)


def test_an_adaptive_budget_simulates_more_rounds_until_the_bound_decides(runs):
    """simulation.adaptive through the real job: whole rounds of the catalog (the scenario set and the
    incident's regression scenario) with fresh seeds until the confidence gate on sim.collision_rate
    is decided or 400 episodes are spent; the gate judges every episode and says how many rounds."""
    from closedloop.spec import GateSpec
    from closedloop.steps.gates import undecided

    ad = runs["adaptive"]
    assert ad["results"]["train"]["model_uri"] == runs["unsharded"]["results"]["train"]["model_uri"]
    sim = ad["results"]["simulate"]
    a = sim["adaptive"]
    per_round = 26 + 3  # the scenario set and INC-2026-0042's scenario
    assert sim["episodes"] == a["episodes"] == a["rounds"] * per_round and a["rounds"] > 1
    assert a["episodes"] <= 400 and (a["stopped"] == "decided" or a["episodes"] + per_round > 400)
    gate = GateSpec(metric="sim.collision_rate", max=0.05, confidence=0.95)
    assert (undecided([gate], sim["metrics"]) == []) == (a["stopped"] == "decided")
    task = next(t for t in ad["tasks"] if t["task_id"] == "release_gate")
    report = {r["metric"]: r for r in (ad["results"].get("release_gate") or task["error"])["report"]}
    judged = report["sim.collision_rate"]  # the scenario set's episodes (the regression group is its own)
    assert judged["trials"] == sim["metrics"]["sim.episodes"] == a["rounds"] * 26
    assert judged["events"] == sim["metrics"]["sim.collisions"]
    assert f"adaptive budget: {a['episodes']:,} episodes in {a['rounds']} round(s) of the catalog" in judged["evidence"]
    client = MlflowClient(settings.tracking_uri())
    assert client.get_run(sim["run_id"]).data.params["adaptive.rounds"] == str(a["rounds"])


def test_adaptive_rounds_fanned_out_over_shards_give_the_unsharded_adaptive_metrics(runs):
    """simulation.adaptive with shards by scenario type, through real Airflow task mapping and real jobs
    (dag.test runs the shards one after the other: each simulates its part of the first round, and
    merge_simulation simulates the further rounds the budget's rule takes): the same rounds, episodes
    and metrics as the unsharded adaptive run of the same model."""
    one, many = runs["adaptive"], runs["adaptive_sharded"]
    assert states(many)["merge_simulation"] == "success", states(many)
    assert many["results"]["train"]["model_uri"] == one["results"]["train"]["model_uri"]
    shards = many["results"]["simulate"]
    assert [s["shard"] for s in shards] == ["1/4", "2/4", "3/4", "4/4"]
    merged, alone = many["results"]["merge_simulation"], one["results"]["simulate"]
    assert merged["adaptive"] == alone["adaptive"] and merged["adaptive"]["rounds"] > 1
    assert merged["metrics"] == alone["metrics"] and merged["episodes"] == alone["episodes"]
    gate = {r["metric"]: r for r in (many["results"].get("release_gate") or next(
        t for t in many["tasks"] if t["task_id"] == "release_gate")["error"])["report"]}
    assert gate["sim.collision_rate"]["trials"] == alone["metrics"]["sim.episodes"]

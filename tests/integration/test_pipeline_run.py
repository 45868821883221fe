"""Whole pipelines through real Airflow (dag.test), real MLflow (SQLite in a temp dir) and real
Great Expectations: the registry state after a good run, and runs that must stop early."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from mlflow import MlflowClient

from closedloop import settings
from closedloop.local.run import load_dag, run_dag
from closedloop.spec import load_spec
from tests.conftest import NO_REVIEW, SAFE_DATA, scratch_project, template_text

pytestmark = pytest.mark.integration

WHEN = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)


def states(summary: dict) -> dict[str, str]:
    return {t["task_id"]: t["state"] for t in summary["tasks"]}


def alerts_of(summary: dict) -> list[dict]:
    """Failure alerts the run left in the local alert record."""
    import json

    from closedloop.notifiers import alerts_path

    lines = alerts_path().read_text().splitlines() if alerts_path().exists() else []
    return [a for a in map(json.loads, lines) if a["kind"] == "task_failed" and a["run_id"] == summary["run_id"]]


@pytest.fixture(scope="module")
def periodic(airflow_db, tmp_path_factory, project):
    """The shipped periodic template without its review step (dag.test would wait for a reviewer;
    review is tested against a real API server in test_governance_scheduler), run once."""
    import airflow.settings

    root = scratch_project(tmp_path_factory.mktemp("periodic"))
    path = root / "include" / "pipelines" / "acc_longitudinal.yaml"
    path.write_text(template_text(project, gates="point", **NO_REVIEW, **SAFE_DATA))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(root / "dags"))
        old, airflow.settings.DAGS_FOLDER = airflow.settings.DAGS_FOLDER, str(root / "dags")
        try:
            summary = run_dag(load_dag("acc_longitudinal"), WHEN)
        finally:
            airflow.settings.DAGS_FOLDER = old
    return summary, load_spec(path)


@pytest.fixture(scope="module")
def periodic_run(periodic):
    return periodic[0]


def test_periodic_pipeline_registers_one_candidate_with_lineage(periodic, periodic_run):
    s = periodic_run
    assert s["state"] == "success", s
    assert set(states(s).values()) == {"success"}
    client = MlflowClient(settings.tracking_uri())
    versions = client.search_model_versions("name = 'acc_longitudinal_policy'")
    assert len(versions) == 1
    mv = client.get_model_version_by_alias("acc_longitudinal_policy", "candidate")
    assert str(mv.version) == str(versions[0].version) == s["registry"]["version"]
    labelled = s["results"]["label"]
    loaded = periodic[1]
    assert mv.tags["closedloop.pipeline"] == "acc_longitudinal"
    assert mv.tags["closedloop.template_hash"] == loaded.digest
    assert mv.tags["closedloop.dataset_version"] == labelled["digest"]
    assert mv.tags["closedloop.label_policy"] == "expert_idm_smoothed@2"
    assert mv.tags["airflow.dag_id"] == "acc_longitudinal" and mv.tags["airflow.run_id"] == s["run_id"]
    assert mv.tags["closedloop.code_version"].startswith("0.1.0")

    train_run = client.get_run(s["results"]["train"]["run_id"])
    assert mv.run_id == train_run.info.run_id
    for key in ("closedloop.pipeline", "closedloop.template_hash", "closedloop.dataset_version",
                "closedloop.label_policy", "airflow.dag_id", "airflow.run_id", "airflow.task_id",
                "airflow.try_number", "closedloop.code_version"):
        assert train_run.data.tags.get(key), key
    assert train_run.data.tags["airflow.task_id"] == "train"
    inputs = train_run.inputs.dataset_inputs
    assert [(i.dataset.digest, {t.key: t.value for t in i.tags}) for i in inputs] == [
        (labelled["digest"][:32], {"mlflow.data.context": "training", "closedloop.sha256": labelled["digest"]})]
    assert inputs[0].dataset.source and labelled["uri"] in inputs[0].dataset.source

    # the step runs hang under one parent run for this pipeline run
    parents = {client.get_run(s["results"][t]["run_id"]).data.tags["mlflow.parentRunId"]
               for t in ("train", "offline_eval", "simulate", "release_gate")}
    assert len(parents) == 1
    assert client.get_run(s["results"]["simulate"]["run_id"]).data.metrics["sim.hard_braking.collision_rate"] == 0


def test_xcom_carries_only_small_json(periodic_run):
    import json

    # every step's result was sealed where it was born (the tasks that read it check the seal)
    assert set(periodic_run["sealed"]) >= {"generate_dataset", "label", "validate_data", "train", "offline_eval",
                                           "simulate", "release_gate", "register_candidate"}

    for task, value in periodic_run["results"].items():
        assert len(json.dumps(value)) < 20_000, task
    assert periodic_run["results"]["generate_dataset"]["window_end"] == "2026-11-23"
    assert periodic_run["results"]["generate_dataset"]["window_start"] == "2026-11-09"


def test_running_the_steps_again_creates_nothing_new(periodic, periodic_run):
    """Retrying train/register for the same pipeline run reuses what exists (no second version)."""
    from closedloop.runtime.context import RunContext
    from closedloop.steps.registry import register_candidate
    from closedloop.steps.training import train

    s = periodic_run
    loaded = periodic[1]
    ctx = RunContext(pipeline="acc_longitudinal", template_digest=loaded.digest, dag_id="acc_longitudinal",
                     run_id=s["run_id"], task_id="train", try_number=2)
    again = train(loaded, ctx, labelled=s["results"]["label"], validation=s["results"]["validate_data"],
                  raw=s["results"]["generate_dataset"])
    assert again["run_id"] == s["results"]["train"]["run_id"]
    assert again["model_uri"] == s["results"]["train"]["model_uri"]
    reg = register_candidate(loaded, ctx.for_task("register_candidate", 2), trained=again,
                             labelled=s["results"]["label"], gate=s["results"]["release_gate"])
    assert reg["version"] == s["registry"]["version"]
    client = MlflowClient(settings.tracking_uri())
    assert len(client.search_model_versions("name = 'acc_longitudinal_policy'")) == 1
    runs = client.search_runs([client.get_experiment_by_name("closedloop/acc_longitudinal").experiment_id],
                              filter_string="tags.`closedloop.step` = 'train'")
    assert len(runs) == 1


@pytest.fixture
def scratch_dag(make_project, project, dags_folder):
    """A DAG from a copy of the shipped template with a new name and some lines changed."""

    def build(name: str, **replacements):
        make_project(f"{name}.yaml", template_text(project, gates="point", incidents=False, **{
            "name: acc_longitudinal": f"name: {name}", "name: acc_longitudinal_policy": f"name: {name}_model",
            "window_days: 14": "window_days: 7", **SAFE_DATA, **replacements}))
        dags_folder(make_project.root / "dags")
        return load_dag(name)

    return build


def test_broken_dataset_stops_at_validate_data(airflow_db, scratch_dag):
    dag = scratch_dag("acc_corrupt", **{
        "generator: closedloop.driving.logs:synthesize_drive_logs": "generator: tests.fixtures.domain:corrupted_drive_logs"})
    s = run_dag(dag, WHEN)
    st = states(s)
    assert s["state"] == "failed"
    assert st["generate_dataset"] == st["label"] == "success"
    assert st["validate_data"] == "failed"
    assert {st[t] for t in ("train", "offline_eval", "simulate", "release_gate", "register_candidate")} == {"upstream_failed"}
    assert next(t for t in s["tasks"] if t["task_id"] == "validate_data")["try_number"] == 1  # not retried
    error = next(t for t in s["tasks"] if t["task_id"] == "validate_data")["error"]
    failing = {(c["expectation"], c["column"]) for c in error["report"]["checks"] if not c["success"]}
    assert failing == {("expect_column_values_to_not_be_null", "ego_speed"),
                       ("expect_column_values_to_be_between", "lead_speed")}
    assert "expect_column_values_to_be_between(lead_speed)" in error["message"]
    (alert,) = alerts_of(s)  # one alert, for the task that failed for good (not the upstream_failed ones)
    assert (alert["task_id"], alert["error_class"], alert["permanent"]) == ("validate_data", "DataValidationError", True)
    assert alert["pipeline"] == "acc_corrupt" and "expect_column_values_to_be_between(lead_speed)" in alert["cause"]
    assert alert["log_url"] and "validate_data" in alert["log_url"]
    client = MlflowClient(settings.tracking_uri())
    assert client.search_registered_models("name = 'acc_corrupt_model'") == []
    exp = client.get_experiment_by_name("closedloop/acc_corrupt")
    steps = {r.data.tags["closedloop.step"]: r.info.status for r in client.search_runs([exp.experiment_id])}
    assert steps == {"pipeline": "RUNNING", "generate_dataset": "FINISHED", "label": "FINISHED",
                     "validate_data": "FAILED"}  # nothing trained; the failed validation is never a cache entry


def test_policy_without_hard_braking_data_fails_the_simulation_gate(airflow_db, scratch_dag):
    """A policy that never saw emergency braking crashes into braking leads in simulation;
    the gate stops the run before registration."""
    dag = scratch_dag("acc_no_hard_braking", **{
        "scenarios: [cruise, cut_in, hard_braking, stop_and_go]": "scenarios: [cruise, cut_in, stop_and_go]"})
    s = run_dag(dag, WHEN)
    st = states(s)
    assert s["state"] == "failed"
    assert st["simulate"] == "success" and st["release_gate"] == "failed"
    assert st["register_candidate"] == "upstream_failed"
    sim = s["results"]["simulate"]["metrics"]
    assert sim["sim.hard_braking.collision_rate"] > 0.5
    assert sim["sim.cruise.collision_rate"] == 0
    report = {r["metric"]: r for r in next(t for t in s["tasks"] if t["task_id"] == "release_gate")["error"]["report"]}
    assert report["sim.hard_braking.collision_rate"]["passed"] is False
    assert report["offline.rmse"]["passed"] is True
    (alert,) = alerts_of(s)
    assert (alert["task_id"], alert["error_class"]) == ("release_gate", "GateFailed")
    assert "sim.hard_braking.collision_rate" in alert["cause"]
    client = MlflowClient(settings.tracking_uri())
    assert client.search_registered_models("name = 'acc_no_hard_braking_model'") == []
    gate_runs = client.search_runs([client.get_experiment_by_name("closedloop/acc_no_hard_braking").experiment_id],
                                   filter_string="tags.`closedloop.step` = 'release_gate'")
    assert gate_runs[0].data.tags["closedloop.gates"] == "failed"
    artifacts = [a.path for a in client.list_artifacts(gate_runs[0].info.run_id, "gates")]
    assert artifacts == ["gates/report.json"]

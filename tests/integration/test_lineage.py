"""Trace, impact and rerun over real runs (dag.test: real Airflow task runner, real MLflow on
SQLite, real Great Expectations): a periodic run, an incident run and an exact rerun of the
periodic one in pipeline A; a periodic run in pipeline B, which reads another source."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from closedloop import settings
from closedloop.local.run import load_dag, run_dag
from closedloop.records.lineage import impact, rerun_plan, trace
from closedloop.spec import load_all
from tests.conftest import NO_REVIEW, SAFE_DATA, scratch_project, template_text

pytestmark = pytest.mark.integration

A, B = "acc_lin", "acc_lin_asia"
MA, MB = "acc_lin_model", "acc_lin_asia_model"


@pytest.fixture(scope="module")
def runs(airflow_db, tmp_path_factory, project):
    import airflow.settings

    root = scratch_project(tmp_path_factory.mktemp("lineage"))
    pipelines = root / "include" / "pipelines"
    # sources of their own: the session's other tests share this MLflow store and read fleet-eu/us
    (pipelines / f"{A}.yaml").write_text(template_text(project, gates="point", **NO_REVIEW, **SAFE_DATA, **{
        "name: acc_longitudinal": f"name: {A}", "name: acc_longitudinal_policy": f"name: {MA}",
        "window_days: 14": "window_days: 5", "sources: [fleet-eu, fleet-us]": "sources: [lin-a, lin-b]"}))
    (pipelines / f"{B}.yaml").write_text(template_text(project, gates="point", incidents=False, **NO_REVIEW, **SAFE_DATA, **{
        "name: acc_longitudinal": f"name: {B}", "name: acc_longitudinal_policy": f"name: {MB}",
        "window_days: 14": "window_days: 5", "sources: [fleet-eu, fleet-us]": "sources: [asia-north, asia-south]"}))
    specs, errors = load_all(pipelines)
    assert not errors
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(root / "dags"))
        old, airflow.settings.DAGS_FOLDER = airflow.settings.DAGS_FOLDER, str(root / "dags")
        try:
            out = {"periodic": run_dag(load_dag(A), datetime(2026, 11, 20, 3, tzinfo=UTC))}
            out["incident"] = run_dag(load_dag(f"{A}_incident"), datetime(2026, 11, 21, 3, tzinfo=UTC), conf={
                "incident": {"id": "INC-77", "model": MA, "scenario_type": "hard_braking", "severity": "critical",
                             "kind": "near_miss", "log_refs": ["s3://fleet/a.mcap"]}})
            plan = rerun_plan(out["periodic"]["run_id"], specs)
            out["plan"], out["specs"], out["dir"] = plan, specs, pipelines
            out["rerun"] = run_dag(load_dag(plan["dag_id"]), datetime(2026, 11, 24, 3, tzinfo=UTC), conf=plan["conf"])
            out["other"] = run_dag(load_dag(B), datetime(2026, 11, 22, 3, tzinfo=UTC))
        finally:
            airflow.settings.DAGS_FOLDER = old
    for name in ("periodic", "incident", "rerun", "other"):
        assert out[name]["state"] == "success", (name, out[name])
    return out


def version_of(summary) -> str:
    reg = summary["results"]["register_candidate"]
    return f"{reg['model']}/{reg['version']}"


def test_trace_shows_data_labels_template_and_origin_of_each_version(runs):
    for name, trigger in (("periodic", "request"), ("incident", "incident"), ("rerun", "rerun")):
        s = runs[name]
        t = trace(version_of(s))
        digests = {d["kind"]: d["digest"] for d in t["datasets"]}
        assert digests == {"raw": s["results"]["generate_dataset"]["digest"], "labelled": s["results"]["label"]["digest"]}
        assert t["label_policy"] == "expert_idm_smoothed@2"
        assert t["template"]["pipeline"] == A and t["template"]["hash"]
        assert t["airflow_run"]["run_id"] == s["run_id"] and t["airflow_run"]["started_by"]["trigger"] == trigger
        assert t["training_run"]["run_id"] == s["results"]["train"]["run_id"]
        assert t["gates"]["passed"] is True and t["validation"]["success"] is True
        raw = next(d for d in t["datasets"] if d["kind"] == "raw")
        assert raw["sources"] == ["lin-a", "lin-b"] and raw["window_end"]
    incident = trace(version_of(runs["incident"]))["airflow_run"]["started_by"]["incident"]
    assert incident["id"] == "INC-77" and incident["scenario_type"] == "hard_braking" and incident["severity"] == "critical"
    # every way of naming the same thing gives the same chain
    s = runs["periodic"]
    same = [trace(r) for r in (f"models:/{version_of(s)}", s["run_id"], s["results"]["train"]["run_id"])]
    assert {t["training_run"]["run_id"] for t in same} == {s["results"]["train"]["run_id"]}
    assert trace(f"models:/{MA}@candidate")["model_version"]["version"] == runs["rerun"]["registry"]["version"]


def test_rerun_pins_the_original_snapshot_and_links_both_ways(runs):
    original, rerun = runs["periodic"], runs["rerun"]
    assert runs["plan"]["pinned"] == original["results"]["generate_dataset"]["digest"]
    assert rerun["results"]["generate_dataset"]["digest"] == original["results"]["generate_dataset"]["digest"]
    assert rerun["results"]["generate_dataset"]["pinned"] is True
    assert rerun["results"]["label"]["digest"] == original["results"]["label"]["digest"]
    assert runs["plan"]["conf"]["purpose"]  # the original request travels with the rerun
    assert trace(version_of(rerun))["airflow_run"]["started_by"]["rerun_of"] == f"{A}/{original['run_id']}"
    assert trace(original["run_id"])["airflow_run"]["started_by"]["reruns"] == f"{A}/{rerun['run_id']}"


def test_every_run_reference_trace_prints_is_accepted_back(runs):
    """`DAG_ID/RUN_ID`, the form `trace`, `runs` and `impact` print, names the same pipeline run as the run id."""
    original, rerun = runs["periodic"], runs["rerun"]
    printed = trace(version_of(rerun))["airflow_run"]["started_by"]["rerun_of"]
    assert printed == f"{A}/{original['run_id']}"
    again = trace(printed)
    assert again["airflow_run"]["run_id"] == original["run_id"]
    assert again["model_version"]["version"] == trace(original["run_id"])["model_version"]["version"]
    assert rerun_plan(printed, runs["specs"])["original"] == printed


def test_a_rerun_conf_naming_a_file_is_refused_by_the_first_step_before_any_compute(runs, project):
    """`closedloop_rerun` is not a trigger-form field: what Airflow cannot refuse at trigger time, the run's
    first step refuses on its first try (no retry, no MLflow run, no snapshot read)."""
    import airflow.settings
    from mlflow import MlflowClient

    root = runs["dir"].parents[1]
    bad = {"of": f"{A}/{runs['periodic']['run_id']}", "raw": {
        "uri": "http://attacker.example/logs.parquet", "digest": "0" * 64,
        "window_start": "2026-11-01", "window_end": "2026-11-04"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(root / "dags"))
        old, airflow.settings.DAGS_FOLDER = airflow.settings.DAGS_FOLDER, str(root / "dags")
        try:
            out = run_dag(load_dag(A), datetime(2026, 11, 26, 3, tzinfo=UTC), conf={"closedloop_rerun": bad})
        finally:
            airflow.settings.DAGS_FOLDER = old
    assert out["state"] == "failed"
    first = next(task for task in out["tasks"] if task["task_id"] == "generate_dataset")
    assert first["state"] == "failed" and first["try_number"] == 1, first
    assert "closedloop_rerun.raw.uri: extra inputs are not permitted" in str(first["error"]), first
    made = MlflowClient(settings.tracking_uri()).search_runs(
        [e.experiment_id for e in MlflowClient(settings.tracking_uri()).search_experiments()],
        filter_string=f"tags.`airflow.run_id` = '{out['run_id']}'")
    assert made == []


def test_rerun_dry_run_prints_text_and_json_on_request(runs, capsys, monkeypatch):
    import json

    from closedloop import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri())
    ref = f"{A}/{runs['periodic']['run_id']}"
    before = set(os.environ)
    try:
        assert cli.main(["rerun", ref, "--dry-run", "--no-cache", "--dir", str(runs["dir"])]) == 0
        text = capsys.readouterr().out
        assert cli.main(["rerun", ref, "--dry-run", "--json", "--dir", str(runs["dir"])]) == 0
        plan = json.loads(capsys.readouterr().out)
    finally:
        for key in set(os.environ) - before:
            del os.environ[key]
    pinned = runs["periodic"]["results"]["generate_dataset"]["digest"]
    assert text.splitlines()[0] == f"would rerun {ref} as a new run of {A}"
    assert f"the pinned snapshot {pinned}" in text and "step cache: off" in text and not text.lstrip().startswith("{")
    assert plan["original"] == ref and plan["pinned"] == pinned and plan["dag_id"] == A


def test_impact_of_a_source_lists_only_the_pipelines_that_read_it(runs):
    asia = impact(source="asia-north")
    assert {e["pipeline"] for e in asia["training_runs"]} == {B}
    assert [(v["model"], v["version"]) for v in asia["model_versions"]] == [(MB, runs["other"]["registry"]["version"])]
    assert asia["live"] == asia["model_versions"] and asia["live"][0]["live"] == ["candidate"]
    eu = impact(source="lin-a")
    assert {e["pipeline"] for e in eu["training_runs"]} == {A}
    assert {v["model"] for v in eu["model_versions"]} == {MA} and len(eu["model_versions"]) == 3
    assert [v["version"] for v in eu["live"]] == [runs["rerun"]["registry"]["version"]]  # the rerun is @candidate now
    assert impact(source="asia-mars")["training_runs"] == []
    pinned = impact(dataset=runs["periodic"]["results"]["generate_dataset"]["digest"])
    assert {e["airflow_run_id"] for e in pinned["training_runs"]} == {runs["periodic"]["run_id"], runs["rerun"]["run_id"]}
    assert {e["pipeline"] for e in impact(label_policy="expert_idm_smoothed")["training_runs"]} >= {A, B}
    assert not {e["pipeline"] for e in impact(label_policy="expert_idm_smoothed@1")["training_runs"]} & {A, B}


@pytest.mark.parametrize("args, message", [
    (["trace", "models:/no_such_model@production"], "unknown model 'no_such_model'"),
    (["trace", f"{MA}/999"], f"model '{MA}' has no version '999'"),
    (["trace", f"models:/{MA}@production"], f"model '{MA}' has no alias 'production'"),
    (["trace", "0123456789abcdef0123456789abcdef"], "no MLflow run '0123456789abcdef0123456789abcdef'"),
    (["trace", "manual__1999-01-01T00:00:00+00:00"], "is no model"),
    (["impact", "--source", "a,b"], "no wildcards, commas or quotes"),
    (["rerun", "manual__1999-01-01T00:00:00+00:00", "--dry-run"], "is no model"),
    (["rerun", f"{A}/manual__1999-01-01T00:00:00+00:00", "--dry-run"], "no pipeline run DAG_ID/RUN_ID"),
])
def test_unknown_references_exit_2_with_a_clear_message(runs, args, message, capsys, monkeypatch):
    # in this process (the CLI's own process start is covered by the trace test below): an uncaught
    # exception would fail the test as a traceback would fail the user
    from closedloop import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri())
    before = set(os.environ)
    try:
        code = cli.main(args)
    finally:
        for key in set(os.environ) - before:  # the CLI's embedded defaults stay out of later tests
            del os.environ[key]
    out = capsys.readouterr()
    assert code == 2, (out.out, out.err)
    assert message in out.err


def test_trace_cli_prints_the_chain(runs):
    out = subprocess.run([sys.executable, "-m", "closedloop.cli", "trace", version_of(runs["incident"])],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri()})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(p))
             for p in ("model version", "training run", "dataset labelled", "dataset raw", "label policy",
                       "template", "airflow run", "gates")]
    assert order == sorted(order)
    assert "incident INC-77 (near_miss, hard_braking, critical)" in out.stdout

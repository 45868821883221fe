"""Built for failure, through real Airflow (dag.test, with its retry handling and the Airflow 3.3
retry policy), real MLflow and real Great Expectations: fault drills in every step, the step
cache, and the alerts of tasks that fail for good.

One pipeline (``acc_faults``) runs in order: a run whose every step fails once on purpose after
doing its work; a second run with the same inputs (cache hits); a run with the cache switched
off; a run after the label policy's version changed (misses from ``label`` on); then, for every
step, a run in which that step fails permanently.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from closedloop import settings
from closedloop.local.run import load_dag, run_dag
from tests.conftest import NO_REVIEW, SAFE_DATA, scratch_project, template_text
from tests.fixtures.runs import PIPELINE_STEPS, crash_points, registry_record
from tests.integration.test_pipeline_run import alerts_of, states

pytestmark = pytest.mark.integration

STEPS = PIPELINE_STEPS  # every step of a pipeline without review, from the step table (the dossier last)
CACHED = STEPS[:6]
MODEL = "acc_faults_model"
DAY = datetime(2026, 11, 23, tzinfo=UTC)
# quick retries, and enough of them for the crash-point matrix (a step's k-th point struck on its k-th try)
FAST_RETRIES = {"retry_delay_seconds: 20": "retry_delay_seconds: 1", "max_retry_delay_seconds: 600":
                "max_retry_delay_seconds: 2", "retries: 2": "retries: 6", "train: {retries: 3}": "train: {retries: 6}"}


class Drill:
    """A scratch project with pipeline ``acc_faults`` and a fault-drill file."""

    def __init__(self, root: Path, project: Path, monkeypatch):
        import airflow.settings

        self.root = scratch_project(root)
        self.project = project
        self.faults = root / "faults.json"
        self.write_template(policy_version='"2"')
        monkeypatch.setenv("CLOSEDLOOP_FAULTS", str(self.faults))
        monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(self.root / "dags"))
        monkeypatch.setattr(airflow.settings, "DAGS_FOLDER", str(self.root / "dags"))

    def write_template(self, *, policy_version: str, **replacements: str) -> None:
        text = template_text(self.project, gates="point", incidents=False, **NO_REVIEW, **SAFE_DATA, **{
            "name: acc_longitudinal": "name: acc_faults", "name: acc_longitudinal_policy": f"name: {MODEL}",
            "window_days: 14": "window_days: 7", 'version: "2"': f"version: {policy_version}", **FAST_RETRIES,
            **replacements})
        (self.root / "include" / "pipelines" / "acc_faults.yaml").write_text(text)

    def run(self, hour: int, faults: list[dict] | None = None, conf: dict | None = None) -> dict:
        self.faults.write_text(json.dumps(faults or []))
        try:
            return run_dag(load_dag("acc_faults"), DAY.replace(hour=hour), conf=conf)
        finally:
            self.faults.unlink()


@pytest.fixture(scope="module")
def drill(airflow_db, tmp_path_factory, project):
    with pytest.MonkeyPatch.context() as mp:
        yield Drill(tmp_path_factory.mktemp("faults"), project, mp)


@pytest.fixture(scope="module")
def runs(drill):
    """The runs, in order (later ones read the cache the earlier ones filled)."""
    out = {}
    # every step fails once after it made everything (train: after its model is logged, before
    # its MLflow run is marked finished) with a connection error, then is retried
    out["transient"] = drill.run(3, [
        {"task": "train", "point": "before_finish", "fault": "transient", "tries": [1]},
        {"task": "*", "point": "end", "fault": "transient", "tries": [1]}])
    root = Path(settings.data_root()) / "acc_faults"
    out["files"] = {sub: sorted(p.name for p in (root / sub).iterdir()) for sub in ("raw", "labelled", "jobs")}
    out["again"] = drill.run(4)  # same day, same window, same template: nothing to recompute
    # `closedloop rerun --no-cache` of the first run: what it would post to Airflow, run here
    from closedloop.records.lineage import rerun_plan
    from closedloop.spec import load_all

    specs, _ = load_all(drill.root / "include" / "pipelines")
    out["no_cache_plan"] = rerun_plan(out["transient"]["run_id"], specs, no_cache=True)
    out["no_cache"] = drill.run(5, conf=out["no_cache_plan"]["conf"])
    # the crash-point matrix in one run: a transient error at every point between two side effects
    # of every step, the k-th point on the k-th try (the cache off: every step does its work)
    out["marks"] = drill.root / "marks"
    out["marks"].mkdir()
    out["matrix_drills"] = crash_points("transient", out["marks"], "acc_faults")
    out["matrix"] = drill.run(7, out["matrix_drills"], conf={"closedloop_cache": False})
    drill.write_template(policy_version='"3"')
    out["new_policy"] = drill.run(6)
    return out


def client() -> MlflowClient:
    return MlflowClient(settings.tracking_uri())


def step_runs(run_id: str) -> dict[str, list]:
    c = client()
    exp = c.get_experiment_by_name("closedloop/acc_faults")
    found: dict[str, list] = {}
    for r in c.search_runs([exp.experiment_id], filter_string=f"tags.`closedloop.run_key` = 'acc_faults/{run_id}'"):
        found.setdefault(r.data.tags["closedloop.step"], []).append(r)
    return found


def cache_states(summary: dict) -> dict[str, str]:
    return {step: runs[0].data.tags.get("closedloop.cache") for step, runs in step_runs(summary["run_id"]).items()
            if step in CACHED}


def test_a_transient_fault_in_every_step_is_retried_and_leaves_one_of_each_artifact(runs):
    s = runs["transient"]
    tries = {t["task_id"]: t["try_number"] for t in s["tasks"]}
    assert s["state"] == "success", states(s)
    assert tries == dict.fromkeys(STEPS, 2)  # each step failed once, then succeeded on its retry
    assert alerts_of(s) == []  # retried errors are not failures for good
    found = step_runs(s["run_id"])
    # one MLflow run per step (register_candidate keeps its record on the model version instead)
    assert {step: len(r) for step, r in found.items()} == {"pipeline": 1, **dict.fromkeys(
        [step for step in STEPS if step != "register_candidate"], 1)}
    assert all(r[0].info.status == "FINISHED" for step, r in found.items() if step != "pipeline")
    train = found["train"][0]
    logged = client().search_logged_models(experiment_ids=[train.info.experiment_id],
                                           filter_string=f"source_run_id = '{train.info.run_id}'")
    assert len(logged) == 1  # the retry reused the model the first try had logged
    assert train.data.tags["closedloop.model_uri"] == s["results"]["train"]["model_uri"]
    versions = client().search_model_versions(f"name = '{MODEL}'")
    mine = [v for v in versions if v.tags.get("airflow.run_id") == s["run_id"]]
    assert len(mine) == 1 and client().get_model_version_by_alias(MODEL, "candidate").version is not None
    files = runs["files"]  # written by this run alone (no .tmp left behind)
    assert files["raw"] == [f"{s['results']['generate_dataset']['digest']}.parquet"]
    assert files["labelled"] == [f"{s['results']['label']['digest']}.parquet"]
    assert len(files["jobs"]) == 1  # one simulation job: the retry attached to it


def test_a_transient_error_at_every_crash_point_leaves_what_an_undisturbed_run_leaves(runs):
    """Every point of the crash-point matrix struck in one run (dag.test, Airflow's retry handling):
    each retry finishes what the failed try began; the registry record equals the undisturbed
    no-cache run's, and the data root holds one snapshot per content."""
    from closedloop.runtime.faults import matrix

    s = runs["matrix"]
    assert s["state"] == "success", states(s)
    struck = sorted(p.name for p in runs["marks"].iterdir())
    assert struck == sorted(f"{d['task']}.{d['point']}" for d in runs["matrix_drills"])  # every point fired
    tries = {t["task_id"]: t["try_number"] for t in s["tasks"]}
    assert tries == {step: len(matrix()[step]) + 1 for step in STEPS}
    assert alerts_of(s) == []
    calm = registry_record(client(), runs["no_cache"]["run_id"], "acc_faults", MODEL)
    hit = registry_record(client(), s["run_id"], "acc_faults", MODEL)
    for record in (calm, hit):
        record.pop("train_run")
        record.pop("candidate_is_it")
    assert hit == calm == {"steps": {step: ["FINISHED"] for step in CACHED + ("release_gate", "dossier")}
                           | {"pipeline": ["RUNNING"]}, "logged_models": 1, "versions": 1, "described": [True]}
    root = Path(settings.data_root()) / "acc_faults"
    for kind, step in (("raw", "generate_dataset"), ("labelled", "label")):
        assert (root / kind / f"{s['results'][step]['digest']}.parquet").exists()
    assert not list(root.rglob("*.tmp"))


def test_rerun_with_unchanged_inputs_hits_the_cache_and_registers_the_same_model(runs):
    first, again = runs["transient"], runs["again"]
    assert again["state"] == "success", states(again)
    assert first["results"]["generate_dataset"]["window_end"] == again["results"]["generate_dataset"]["window_end"]
    assert cache_states(again) == dict.fromkeys(CACHED, "hit")
    # generate_dataset followed the chain: the later tasks only read their result (no MLflow import)
    assert sorted(again["cache_plan"]) == sorted(CACHED[1:])
    assert all(again["cache_plan"][step] == again["results"][step] for step in CACHED[1:])
    assert first["cache_plan"] is None
    for step in CACHED:
        hit = again["results"][step]["cache"]
        assert hit["hit"] is True and hit["source_run_key"] == f"acc_faults/{first['run_id']}"
        assert again["results"][step]["cache_key"] == first["results"][step]["cache_key"]
    assert again["results"]["train"]["model_uri"] == first["results"]["train"]["model_uri"]
    assert again["results"]["simulate"]["metrics"] == first["results"]["simulate"]["metrics"]
    assert again["results"]["train"]["run_id"] != first["results"]["train"]["run_id"]  # its own record
    found = step_runs(again["run_id"])
    train = found["train"][0]
    assert train.data.tags["closedloop.cache.source_run_id"] == first["results"]["train"]["run_id"]
    assert train.data.params["max_iter"] == "150"  # the source's params, visible on the hit's run
    assert found["simulate"][0].data.metrics == step_runs(first["run_id"])["simulate"][0].data.metrics
    # gates and registration judge and record this run: never from the cache
    assert found["release_gate"][0].data.tags.get("closedloop.cache") is None
    assert again["registry"]["version"] != first["registry"]["version"]
    from closedloop.records.lineage import trace
    from closedloop.records.render import format_trace

    t = trace(f"{MODEL}/{again['registry']['version']}")
    assert t["training_run"]["cache_hit"]["source_run_key"] == f"acc_faults/{first['run_id']}"
    assert "step cache    hit: model trained by MLflow run" in format_trace(t)
    assert client().get_model_version(MODEL, again["registry"]["version"]).tags["airflow.run_id"] == again["run_id"]


def test_rerun_without_cache_recomputes_everything(runs):
    first, off = runs["transient"], runs["no_cache"]
    assert runs["no_cache_plan"]["conf"]["closedloop_cache"] is False
    assert off["state"] == "success", states(off)
    assert off["results"]["generate_dataset"]["pinned"] is True  # the rerun read the original snapshot back
    assert cache_states(off) == dict.fromkeys(CACHED, "off")
    assert off["results"]["train"]["model_uri"] != first["results"]["train"]["model_uri"]  # trained again
    assert off["results"]["label"]["digest"] == first["results"]["label"]["digest"]  # deterministic data


def test_new_label_policy_version_misses_from_label_on(runs):
    first, new = runs["transient"], runs["new_policy"]
    assert new["state"] == "success", states(new)
    assert cache_states(new) == {"generate_dataset": "hit", **dict.fromkeys(CACHED[1:], "miss")}
    assert new["results"]["label"]["label_policy"] == "expert_idm_smoothed@3"
    assert new["results"]["train"]["model_uri"] != first["results"]["train"]["model_uri"]


@pytest.mark.parametrize("step", STEPS)
def test_a_permanent_fault_fails_the_step_at_once_with_one_alert(runs, drill, step):
    s = drill.run(7 + STEPS.index(step), [{"task": step, "point": "start", "fault": "permanent", "tries": [1, 2, 3]}])
    st = states(s)
    task = next(t for t in s["tasks"] if t["task_id"] == step)
    assert s["state"] == "failed"
    assert st[step] == "failed" and task["try_number"] == 1  # retries were left: the policy refused them
    assert all(st[t] == "success" for t in STEPS[:STEPS.index(step)])
    assert all(st[t] == "upstream_failed" for t in STEPS[STEPS.index(step) + 1:])
    (alert,) = alerts_of(s)
    assert (alert["task_id"], alert["error_class"], alert["permanent"]) == (step, "TypeError", True)
    assert "injected permanent fault" in alert["cause"] and alert["pipeline"] == "acc_faults"
    assert alert["log_url"] and step in alert["log_url"]


def test_alerts_go_to_every_channel_the_template_names(runs, drill, monkeypatch):
    """A chat webhook and e-mail (Airflow's SMTP provider) next to the local record; the webhook URL
    and the SMTP server live in Airflow connections (environment variables here), not the template."""
    from tests.fixtures.sinks import HttpSink, SmtpSink

    with HttpSink() as chat, SmtpSink() as smtp:
        monkeypatch.setenv("AIRFLOW_CONN_ACC_ONCALL_CHAT", json.dumps(
            {"conn_type": "http", "host": f"{chat.url}/hooks/acc", "password": "s3cret-token"}))
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", json.dumps(
            {"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
             "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@acc.example"}}))
        drill.write_template(policy_version='"3"', **{"  - kind: local ": (
            "  - kind: local\n  - kind: webhook\n    conn_id: acc_oncall_chat\n"
            "  - kind: email\n    to: [acc-oncall@example.com]\n    conn_id: smtp_alerts\n ")})
        s = drill.run(20, [{"task": "train", "point": "start", "fault": "permanent", "tries": [1]}])
    assert states(s)["train"] == "failed"
    (local,) = alerts_of(s)
    assert (local["task_id"], local["error_class"]) == ("train", "TypeError")
    ((method, path, headers, body),) = chat.requests
    posted = json.loads(body)
    assert (method, path, headers["Authorization"]) == ("POST", "/hooks/acc", "Bearer s3cret-token")
    assert "acc_faults: task train failed for good (TypeError)" in posted["text"]
    assert posted["alert"]["run_id"] == s["run_id"] and posted["alert"]["log_url"] == local["log_url"]
    assert "s3cret" not in json.dumps(local)
    ((sender, rcpts, data),) = smtp.messages
    assert (sender, rcpts) == ("airflow@acc.example", ["acc-oncall@example.com"])
    assert "Subject: [closedloop] acc_faults: task train failed for good (TypeError)" in data

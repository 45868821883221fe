"""The production shape on this machine (``closedloop.local.prodlike``): PostgreSQL for Airflow and
MLflow, Redis, ``mlflow server`` with proxied artifacts, Airflow with the CeleryExecutor and two
Celery workers — the same DAGs and templates as everywhere else.

One production shape serves the module (starting it costs ≈ 50 s); MLflow runs its auth app there, and
the module reads it as a person (read-only), while the pipelines write with the service account:
- ten pipeline runs at once, periodic and incident mixed: all finish, and MLflow's registry agrees
  with Airflow's records run by run (one run per step, one model version per run; nothing lost,
  nothing twice); no "database is locked" anywhere;
- a Celery worker killed (SIGKILL of its whole process tree) while it runs ``train``: the scheduler
  notices the silence, the task is retried on the other worker, and the run leaves exactly what an
  undisturbed run leaves in the registry;
- the MLflow server stopped while ``train`` is finishing and started again: the task's MLflow call
  fails, the failure is classified transient and retried, and again nothing is lost or doubled.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow import MlflowClient

from tests.conftest import NO_REVIEW, SAFE_DATA, scratch_project, template_text
from tests.fixtures.prodlike import kill_worker, worker_of
from tests.fixtures.runs import an_undisturbed_run, failures, registry_record, task_instances, tries, wait_to_end
from tests.fixtures.warm import PROBE_DAG_FILE, check_warm_and_isolated, probe_connections

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PIPELINE, INCIDENT_DAG, MODEL = "acc_prod", "acc_prod_incident", "acc_prod_model"
STEPS = ("generate_dataset", "label", "validate_data", "train", "offline_eval", "simulate", "release_gate", "dossier")
"""The steps of a run that have an MLflow run of their own (register_candidate's record is on the version)."""
NO_CACHE = {"closedloop_cache": False}  # every run does all its work


@pytest.fixture(scope="module")
def shape(tmp_path_factory, project):
    if shutil.which("redis-server") is None or not (shutil.which("initdb") or shutil.which("pg_ctlcluster")):
        pytest.fail("the production-shape tests need Debian's postgresql and redis-server (.ci/run installs them)")
    from closedloop.local.prodlike import ProdLike

    root = scratch_project(tmp_path_factory.mktemp("prodlike-project"))
    (root / "include" / "pipelines" / "acc_prod.yaml").write_text(template_text(project, **NO_REVIEW, **SAFE_DATA, **{
        'schedule: "0 3 * * 1"': "schedule: null", "name: acc_longitudinal": f"name: {PIPELINE}",
        "name: acc_longitudinal_policy": f"name: {MODEL}", "window_days: 14": "window_days: 3",
        "retry_delay_seconds: 20": "retry_delay_seconds: 10",
        # three days of logs make a policy the safety gates (rightly) refuse; this test is about the
        # machinery under load, so its gates only bound what any trained policy meets
    }, gates="lax"))
    shutil.copy(PROBE_DAG_FILE, root / "dags")  # warm tasks: what a Celery task inherits
    base = tmp_path_factory.mktemp("prodlike")
    shape = ProdLike(base, root / "dags", {"admin": ("admin", "admin-pw"), "fleet-monitor": ("viewer", "fleet-monitor-pw")},
                     workers=2, env={
                         "CLOSEDLOOP_FAULTS": str(base / "faults.json"),  # fault drills: off until a test writes it
                         # a task whose worker died is noticed after 40 s of silence (Airflow's default: 300 s)
                         "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "40",
                         # MLflow's client retries a refused connection 7 times over ≈ 4 min by itself; one
                         # retry here, so that the outage below reaches the task and Airflow's retry
                         "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", **probe_connections(base)})
    shape.start()
    # this module reads MLflow as a person: an account with MLflow's default permission (READ)
    shape.mlflow_user("auditor", "auditor-pw-1234")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "auditor")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", "auditor-pw-1234")
        yield shape
    shape.stop()


def finished_runs(api, dag_id: str, n: int) -> list[dict] | None:
    _, data = api("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")
    runs = data.get("dag_runs", [])
    return runs if len(runs) >= n and all(r["state"] in ("success", "failed") for r in runs) else None


def test_the_mlflow_connection_test_checks_reachability_and_credentials(shape, monkeypatch):
    """Airflow's Test button on the `mlflow` connection type, against the production shape's MLflow auth app."""
    import json

    from closedloop.hooks.mlflow import MLflowHook

    host, port = shape.mlflow_url.removeprefix("http://").split(":")
    for conn, login, password in (("ok", *shape.mlflow_service), ("bad", shape.mlflow_service[0], "wrong-pw")):
        monkeypatch.setenv(f"AIRFLOW_CONN_MLFLOW_{conn.upper()}", json.dumps(
            {"conn_type": "mlflow", "host": host, "port": int(port), "login": login, "password": password}))
    assert MLflowHook("mlflow_ok").test_connection() == (True, f"MLflow at {shape.mlflow_url} answers as "
                                                              f"{shape.mlflow_service[0]}")
    ok, message = MLflowHook("mlflow_bad").test_connection()
    assert not ok and "refused the credentials of connection 'mlflow_bad' (HTTP 401)" in message
    assert "wrong-pw" not in message


def test_ten_runs_at_once_periodic_and_incident(shape):
    from closedloop.records.runs import post_incident

    af = shape.airflow
    af.wait_for(lambda: af.api("GET", f"/api/v2/dags/{PIPELINE}")[0] == 200
                and af.api("GET", f"/api/v2/dags/{INCIDENT_DAG}")[0] == 200, 180, "DAGs parsed")
    started = time.monotonic()
    for day in range(1, 8):  # seven periodic runs on seven data windows
        status, run = af.api("POST", f"/api/v2/dags/{PIPELINE}/dagRuns", {
            "logical_date": f"2026-11-{day:02d}T03:00:00Z", "conf": {"purpose": f"load test {day}"}})
        assert status == 200, run
    for i, scenario in enumerate(("cut_in", "hard_braking", "stop_and_go")):  # three incidents, three problems
        # the reporter is a viewer: the plugin posts the event for them (no op role anywhere)
        event = post_incident(af.client("fleet-monitor"), {"id": f"INC-{i}", "model": MODEL,
                                                           "scenario_type": scenario, "severity": "high"})
        assert event["id"], event
        time.sleep(1.5)  # one event, one run (the scheduler would coalesce events queued together)
    periodic = af.wait_for(lambda: finished_runs(af.api, PIPELINE, 7), 1500, "7 periodic runs", interval=5)
    incident = af.wait_for(lambda: finished_runs(af.api, INCIDENT_DAG, 3), 900, "3 incident runs", interval=5)
    wall = time.monotonic() - started
    runs = [(PIPELINE, r) for r in periodic] + [(INCIDENT_DAG, r) for r in incident]
    states = {(d, r["dag_run_id"]): r["state"] for d, r in runs}
    assert len(runs) == 10, states
    broken = {k: failures(af, *k) for k, state in states.items() if state != "success"}
    assert not broken, json.dumps({"/".join(k): v for k, v in broken.items()}, indent=1, default=str)[-12000:]

    client = MlflowClient(shape.mlflow_url)
    exp = client.get_experiment_by_name(f"closedloop/{PIPELINE}")
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 10  # one per run, none twice
    for dag_id, r in runs:  # the registry agrees with Airflow, run by run
        key = f"{dag_id}/{r['dag_run_id']}"
        steps = [x.data.tags["closedloop.step"] for x in client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`closedloop.run_key` = '{key}'", max_results=100)]
        expected = (*STEPS, "pipeline")
        assert sorted(steps) == sorted(expected), (key, steps)
        mine = [v for v in versions if v.tags.get("closedloop.run_key") == key]
        assert len(mine) == 1, key
        _, xcom = af.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(r['dag_run_id'], safe='')}/taskInstances/"
                                "register_candidate/xcomEntries/return_value")
        assert str(mine[0].version) in str(xcom["value"])
    candidate = client.get_model_version_by_alias(MODEL, "candidate")
    assert candidate.version in {v.version for v in versions}
    # MLflow's auth app: the pipelines wrote all of that with the service account; a person reads it and
    # can move or register nothing
    from mlflow.exceptions import MlflowException

    other = next(v.version for v in versions if v.version != candidate.version)
    for attempt in (lambda: client.set_registered_model_alias(MODEL, "candidate", other),
                    lambda: client.set_registered_model_alias(MODEL, "production", other),
                    lambda: client.set_model_version_tag(MODEL, other, "closedloop.release_record", "{}"),
                    lambda: client.create_model_version(MODEL, f"runs:/{candidate.run_id}/model", candidate.run_id)):
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert refused.value.get_http_status_code() == 403, refused.value
    assert client.get_model_version_by_alias(MODEL, "candidate").version == candidate.version
    assert "closedloop.release_record" in candidate.tags  # the sealed record the pipeline wrote
    logs = [p for p in shape.root.rglob("*.log")]
    assert logs and not [p for p in logs if "database is locked" in p.read_text(errors="replace")]
    print(f"\n10 runs on the production shape (2 Celery workers) in {wall:.0f} s")


def test_celery_tasks_start_warm_and_leak_nothing_between_tasks(shape):
    """Each Celery worker preloads the libraries before it forks its pool (``[celery]
    celery_config_options``); its tasks inherit them, and nothing of one another (a SIGKILLed one included)."""
    check_warm_and_isolated(shape.airflow, shape.root)


def drill(shape, **fault) -> tuple:
    """Write a fault drill that pauses ``train`` of this pipeline on its first try; returns the
    files: (drill, mark — created when the pause starts, release — ends the pause)."""
    path = Path(shape.airflow.env["CLOSEDLOOP_FAULTS"])
    mark, release = path.with_name(f"paused-{time.time_ns()}"), path.with_name(f"release-{time.time_ns()}")
    path.write_text(json.dumps([{"task": "train", "dag": PIPELINE, "tries": [1], "fault": "pause", "seconds": 900,
                                 "mark": str(mark), "until": str(release), **fault}]))
    return path, mark, release


def paused_pid(shape, mark: Path) -> int:
    shape.airflow.wait_for(mark.exists, 300, "train to reach the drill's pause", interval=0.5)
    return int(mark.read_text().split(" pid ")[1])


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("train_run", "candidate_is_it")}


@pytest.fixture(scope="module")
def undisturbed(shape):
    """What an undisturbed run leaves in the registry: a periodic run of the load test above (each
    trained on its own window), or a run of its own when that test did not run."""
    run = an_undisturbed_run(shape.airflow, PIPELINE, NO_CACHE, timeout=900)
    return comparable(registry_record(MlflowClient(shape.mlflow_url), run["dag_run_id"], PIPELINE, MODEL))


def test_a_killed_celery_worker_task_is_retried_elsewhere_with_the_same_registry_state(shape, undisturbed):
    af = shape.airflow
    path, mark, _ = drill(shape, point="model_logged")  # train's model is in MLflow, nothing else is
    try:
        status, run = af.api("POST", f"/api/v2/dags/{PIPELINE}/dagRuns", {"logical_date": None, "conf": NO_CACHE})
        assert status == 200, run
        pid = paused_pid(shape, mark)
        worker = worker_of(shape, pid)
        assert worker is not None, f"task process {pid} under no Celery worker"
        killed = kill_worker(shape, worker)
        assert pid in killed and af.procs[worker].poll() is not None
    finally:
        path.unlink()
    others = [n for n, p in af.procs.items() if n.startswith("worker-") and n != worker and p.poll() is None]
    assert others  # the retry can only run there
    result, tis = wait_to_end(af, PIPELINE, run["dag_run_id"], timeout=900)
    assert result["state"] == "success", {k: t["state"] for k, t in tis.items()}
    assert [t["try_number"] for t in tries(af, PIPELINE, run["dag_run_id"], "train")] == [1, 2]
    record = registry_record(MlflowClient(shape.mlflow_url), run["dag_run_id"], PIPELINE, MODEL)
    assert record["train_run"].data.tags["airflow.try_number"] == "2"  # the retry finished what try 1 began
    assert record["candidate_is_it"] is True
    assert comparable(record) == undisturbed == {
        "steps": {s: ["FINISHED"] for s in STEPS} | {"pipeline": ["RUNNING"]}, "logged_models": 1, "versions": 1,
        "described": [True]}
    af.start_component(worker)  # back to two workers for what follows


def test_mlflow_server_restart_mid_run_is_retried_and_loses_nothing(shape, undisturbed):
    af = shape.airflow
    # train has trained, logged its model and metrics; its MLflow run is not marked finished yet
    path, mark, release = drill(shape, point="before_finish")
    try:
        status, run = af.api("POST", f"/api/v2/dags/{PIPELINE}/dagRuns", {"logical_date": None, "conf": NO_CACHE})
        assert status == 200, run
        paused_pid(shape, mark)
        shape.mlflow.stop()  # the tracking server goes away ...
        release.touch()  # ... while train goes on to finish its MLflow run

        def failed_once():
            ti = task_instances(af, PIPELINE, run["dag_run_id"])["train"]
            return ti["state"] == "up_for_retry" or ti["try_number"] > 1
        af.wait_for(failed_once, 300, "train's first try to fail")
    finally:
        path.unlink()
        if shape.mlflow.proc.poll() is not None:
            shape.mlflow.start(timeout=180)  # ... and comes back
    result, tis = wait_to_end(af, PIPELINE, run["dag_run_id"], timeout=900)
    assert result["state"] == "success", {k: t["state"] for k, t in tis.items()}
    train_tries = tries(af, PIPELINE, run["dag_run_id"], "train")
    assert len(train_tries) >= 2 and train_tries[0]["state"] in ("failed", "up_for_retry")
    first_log = next(shape.root.rglob(f"dag_id={PIPELINE}/run_id={run['dag_run_id']}/task_id=train/attempt=1.log"))
    text = first_log.read_text(errors="replace")
    # Airflow asked our retry policy, which found the MLflow server unreachable: transient
    assert re.search(r"Retry policy decision\W+action\W+retry\W+reason\W+transient: MLflow server unreachable",
                     text), text[-3000:]
    record = registry_record(MlflowClient(shape.mlflow_url), run["dag_run_id"], PIPELINE, MODEL)
    assert record["candidate_is_it"] is True
    assert comparable(record) == undisturbed  # one run per step, one logged model, one version

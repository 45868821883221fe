"""The production shape on this machine (``closedloop.prodlike``): PostgreSQL for Airflow and
MLflow, Redis, ``mlflow server`` with proxied artifacts, Airflow with the CeleryExecutor and two
Celery workers — the same DAGs and templates as everywhere else.

Ten pipeline runs at once, periodic and incident mixed: all finish, and MLflow's registry agrees
with Airflow's records run by run (one run per step, one model version per run; nothing lost, nothing
twice); no "database is locked" anywhere.
"""

from __future__ import annotations

import shutil
import time
from urllib.parse import quote

import pytest
from mlflow import MlflowClient

from tests.conftest import NO_REVIEW, SAFE_DATA, scratch_project, template_text

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PIPELINE, INCIDENT_DAG, MODEL = "acc_prod", "acc_prod_incident", "acc_prod_model"
STEPS = ("generate_dataset", "label", "validate_data", "train", "offline_eval", "simulate", "release_gate")


@pytest.fixture(scope="module")
def shape(tmp_path_factory, project):
    if shutil.which("redis-server") is None or not (shutil.which("initdb") or shutil.which("pg_ctlcluster")):
        pytest.fail("the production-shape tests need Debian's postgresql and redis-server (.ci/run installs them)")
    from closedloop.prodlike import ProdLike

    root = scratch_project(tmp_path_factory.mktemp("prodlike-project"))
    (root / "include" / "pipelines" / "acc_prod.yaml").write_text(template_text(project, **NO_REVIEW, **SAFE_DATA, **{
        'schedule: "0 3 * * 1"': "schedule: null", "name: acc_longitudinal": f"name: {PIPELINE}",
        "name: acc_longitudinal_policy": f"name: {MODEL}", "window_days: 14": "window_days: 3",
        # three days of logs make a policy the safety gates (rightly) refuse; this test is about the
        # machinery under load, so its gates only bound what any trained policy meets
        "    max: 0.35\n": "    max: 100\n", "    max: 0.0\n": "    max: 1.0\n", "    min: 1.0\n": "    min: 0.0\n"}))
    shape = ProdLike(tmp_path_factory.mktemp("prodlike"), root / "dags",
                     {"admin": ("admin", "admin-pw"), "fleet-monitor": ("op", "fleet-monitor-pw")}, workers=2)
    shape.start()
    yield shape
    shape.stop()


def finished_runs(api, dag_id: str, n: int) -> list[dict] | None:
    _, data = api("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")
    runs = data.get("dag_runs", [])
    return runs if len(runs) >= n and all(r["state"] in ("success", "failed") for r in runs) else None


def test_ten_runs_at_once_periodic_and_incident(shape):
    from closedloop.events_cli import incident_asset_id

    af = shape.airflow
    af.wait_for(lambda: af.api("GET", f"/api/v2/dags/{PIPELINE}")[0] == 200
                and af.api("GET", f"/api/v2/dags/{INCIDENT_DAG}")[0] == 200, 180, "DAGs parsed")
    started = time.monotonic()
    for day in range(1, 8):  # seven periodic runs on seven data windows
        status, run = af.api("POST", f"/api/v2/dags/{PIPELINE}/dagRuns", {
            "logical_date": f"2026-11-{day:02d}T03:00:00Z", "conf": {"purpose": f"load test {day}"}})
        assert status == 200, run
    asset_id = incident_asset_id(af.client("fleet-monitor"), MODEL)
    for i, scenario in enumerate(("cut_in", "hard_braking", "stop_and_go")):  # three incidents, three problems
        status, event = af.api("POST", "/api/v2/assets/events", {"asset_id": asset_id, "extra": {
            "id": f"INC-{i}", "model": MODEL, "scenario_type": scenario, "severity": "high"}}, user="fleet-monitor")
        assert status == 200, event
        time.sleep(1.5)  # one event, one run (the scheduler would coalesce events queued together)
    periodic = af.wait_for(lambda: finished_runs(af.api, PIPELINE, 7), 1500, "7 periodic runs", interval=5)
    incident = af.wait_for(lambda: finished_runs(af.api, INCIDENT_DAG, 3), 900, "3 incident runs", interval=5)
    wall = time.monotonic() - started
    runs = [(PIPELINE, r) for r in periodic] + [(INCIDENT_DAG, r) for r in incident]
    states = {(d, r["dag_run_id"]): r["state"] for d, r in runs}
    assert len(runs) == 10 and set(states.values()) == {"success"}, states

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
    logs = [p for p in shape.root.rglob("*.log")]
    assert logs and not [p for p in logs if "database is locked" in p.read_text(errors="replace")]
    print(f"\n10 runs on the production shape (2 Celery workers) in {wall:.0f} s")

"""The shipped pipeline under a real scheduler, triggerer and API server (api-server, scheduler, dag-processor, triggerer on 127.0.0.1):
triggered through the REST API, ``simulate`` waits in the triggerer, a candidate is registered."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from closedloop.localserver import AirflowServer
from tests.conftest import NO_REVIEW, scratch_project, template_text

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, project):
    # the shipped template without its cron schedule (the scheduler starts no run of its own) and
    # without review (test_governance_scheduler covers it)
    root = scratch_project(tmp_path_factory.mktemp("project"))
    (root / "include" / "pipelines" / "acc_periodic.yaml").write_text(
        template_text(project, **{'schedule: "0 3 * * 1"': "schedule: null", **NO_REVIEW}))
    server = AirflowServer(tmp_path_factory.mktemp("standalone"), root / "dags",
                           users={"admin": ("admin", "admin-pw"), "viewer1": ("viewer", "viewer-pw")})
    server.start()
    yield server
    server.stop()


def test_trigger_from_rest_api_runs_to_candidate(airflow):
    airflow.wait_for(lambda: airflow.api("GET", "/api/v2/dags/acc_periodic")[0] == 200, 120, "DAG parsed")
    status, dag = airflow.api("GET", "/api/v2/dags/acc_periodic")
    assert "Pipeline `acc_periodic`" in (airflow.api("GET", "/api/v2/dags/acc_periodic/details")[1]["doc_md"])
    assert dag["is_paused"] is False

    # a viewer may not start runs: Airflow's own authorization
    status, _ = airflow.api("POST", "/api/v2/dags/acc_periodic/dagRuns", {"logical_date": None}, user="viewer1")
    assert status == 403

    # no logical date (Airflow 3 allows it; such a run has no data interval): the data window
    # then ends on the day the run was due
    status, run = airflow.api("POST", "/api/v2/dags/acc_periodic/dagRuns",
                              {"logical_date": None, "note": "scheduler test"})
    assert status == 200, run
    assert run["logical_date"] is None
    run_id = run["dag_run_id"]
    seen_deferred = set()

    def finished():
        _, r = airflow.api("GET", f"/api/v2/dags/acc_periodic/dagRuns/{run_id}")
        _, tis = airflow.api("GET", f"/api/v2/dags/acc_periodic/dagRuns/{run_id}/taskInstances")
        seen_deferred.update(t["task_id"] for t in tis["task_instances"] if t["state"] == "deferred")
        return r if r["state"] in ("success", "failed") else None

    result = airflow.wait_for(finished, 600, "the run to finish", interval=1.0)
    _, tis = airflow.api("GET", f"/api/v2/dags/acc_periodic/dagRuns/{run_id}/taskInstances")
    states = {t["task_id"]: t["state"] for t in tis["task_instances"]}
    assert result["state"] == "success", (states, airflow.tail())
    assert "simulate" in seen_deferred  # waited in the triggerer, not in a worker slot

    _, xcom = airflow.api("GET", f"/api/v2/dags/acc_periodic/dagRuns/{run_id}/taskInstances/generate_dataset/xcomEntries/return_value")
    assert f"'window_end': '{run['run_after'][:10]}'" in str(xcom["value"])

    client = MlflowClient(airflow.env["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("acc_longitudinal_policy", "candidate")
    assert mv.tags["airflow.run_id"] == run_id
    assert len(client.search_model_versions("name = 'acc_longitudinal_policy'")) == 1

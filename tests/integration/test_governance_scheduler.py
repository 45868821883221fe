"""Governance against a real Airflow (scheduler, triggerer, API server on 127.0.0.1) and a real
MLflow store: requests, review through Airflow's HITL REST API, guarded promotion, audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from closedloop.localserver import AirflowServer
from tests.conftest import SAFE_DATA, scratch_project, template_text

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GOV = {'schedule: "0 3 * * 1"': "schedule: null", "window_days: 14": "window_days: 5", **SAFE_DATA,
       "name: acc_longitudinal": "name: acc_gov", "name: acc_longitudinal_policy": "name: acc_gov_model"}
TIMEOUT = {**GOV, "name: acc_longitudinal": "name: acc_gov_timeout", "name: acc_longitudinal_policy": "name: acc_timeout_model",
           "timeout_hours: 72": "timeout_hours: 0.01"}  # 36 s
HIL = {**GOV, "name: acc_longitudinal": "name: acc_gov_hil", "name: acc_longitudinal_policy": "name: acc_hil_model",
       "approval:\n": "hil:\n  reporter: hil-rig\n  timeout_minutes: 1\napproval:\n",
       "gates:\n": "gates:\n  - metric: hil.brake_distance_m\n    max: 40\n"}
USERS = {"admin": "admin", "ml-engineer": "user", "safety-lead": "user", "safety-deputy": "user", "intruder": "user",
         "hil-rig": "user"}
REQUEST = {"purpose": "Retrain on the latest fleet logs for the test.", "change": ["data"],
           "expected_impact": "No regression in any gate.", "scope": "test fleet", "ticket": "T-1"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, project):
    root = scratch_project(tmp_path_factory.mktemp("gov-project"))
    (root / "include" / "pipelines" / "acc_gov.yaml").write_text(template_text(project, incidents=False, **GOV))
    (root / "include" / "pipelines" / "acc_gov_timeout.yaml").write_text(template_text(project, incidents=False, **TIMEOUT))
    (root / "include" / "pipelines" / "acc_gov_hil.yaml").write_text(template_text(project, incidents=False, **HIL))
    server = AirflowServer(tmp_path_factory.mktemp("gov-airflow"), root / "dags",
                           {u: (r, f"{u}-pw-{i}") for i, (u, r) in enumerate(USERS.items())})
    server.start()
    yield server, root
    server.stop()


def cli(server, root, user: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AIRFLOW_API_URL": server.url, "AIRFLOW_USERNAME": user,
           "AIRFLOW_PASSWORD": server.users[user][1], "MLFLOW_TRACKING_URI": server.env["MLFLOW_TRACKING_URI"],
           "CLOSEDLOOP_HOME": server.env["CLOSEDLOOP_HOME"], "CLOSEDLOOP_INCLUDE_DIR": str(root / "include")}
    return subprocess.run([sys.executable, "-m", "closedloop.cli", *args], capture_output=True, text=True,
                          timeout=180, env=env)


def states(server, dag_id, run_id) -> dict[str, str]:
    _, tis = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
    return {t["task_id"]: t["state"] for t in tis["task_instances"]}


def hitl_path(dag_id, run_id) -> str:
    return f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails"


def xcom(server, dag_id, run_id, task) -> dict:
    _, entry = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/return_value")
    return entry["value"] if isinstance(entry["value"], dict) else json.loads(entry["value"])


def test_governed_path(env):
    server, root = env
    for dag_id in ("acc_gov", "acc_gov_timeout", "acc_gov_hil"):
        server.wait_for(lambda d=dag_id: server.api("GET", f"/api/v2/dags/{d}")[0] == 200, 120, f"{dag_id} parsed")

    # -- malformed requests are refused before any run exists ------------------------------------
    for bad, field in (({**REQUEST, "purpose": ""}, "purpose"), ({**REQUEST, "change": ["vibes"]}, "change"),
                       ({**REQUEST, "ticket": "T" * 201}, "ticket")):
        status, body = server.api("POST", "/api/v2/dags/acc_gov/dagRuns", {"logical_date": None, "conf": bad})
        assert status == 400, (status, body)
        assert field in json.dumps(body)
    assert server.api("POST", "/api/v2/dags/nope/dagRuns", {"logical_date": None, "conf": REQUEST})[0] == 404
    assert server.api("GET", "/api/v2/dags/acc_gov/dagRuns")[1]["total_entries"] == 0
    out = cli(server, root, "ml-engineer", "request", "acc_gov", "--purpose", "short", "--change", "data", "--impact", "ok!!")
    assert out.returncode == 2 and "purpose: 5 characters, at least 10 needed" in out.stderr
    out = cli(server, root, "ml-engineer", "request", "nope", "--purpose", REQUEST["purpose"], "--change", "data",
              "--impact", "fine")
    assert out.returncode == 2 and "no valid pipeline named 'nope'" in out.stderr

    # -- three requests: A (to approve), B (to reject), C (left to time out) ----------------------
    out = cli(server, root, "ml-engineer", "request", "acc_gov", "--purpose", REQUEST["purpose"], "--change", "data",
              "--impact", REQUEST["expected_impact"], "--ticket", "T-1")
    assert out.returncode == 0, out.stderr
    run_a = out.stdout.split(" run ")[1].split(" ")[0]
    run_b = server.api("POST", "/api/v2/dags/acc_gov/dagRuns", {"logical_date": None, "conf": REQUEST},
                       user="ml-engineer")[1]["dag_run_id"]
    run_c = server.api("POST", "/api/v2/dags/acc_gov_timeout/dagRuns", {"logical_date": None, "conf": REQUEST},
                       user="ml-engineer")[1]["dag_run_id"]
    # D and E wait for hardware-in-the-loop results: the rig reports for D, never for E
    run_d, run_e = (server.api("POST", "/api/v2/dags/acc_gov_hil/dagRuns", {"logical_date": None, "conf": REQUEST},
                               user="ml-engineer")[1]["dag_run_id"] for _ in range(2))

    def parked(dag_id, run_id):
        return lambda: states(server, dag_id, run_id).get("approval") == "awaiting_input"

    def waiting_for_rig():
        return states(server, "acc_gov_hil", run_d).get("await_hil") == "awaiting_input"

    server.wait_for(waiting_for_rig, 900, "run D to wait for the HIL rig")
    time.sleep(5)
    assert server.api("PATCH", f"/api/v2/dags/acc_gov_hil/dagRuns/{run_d}/taskInstances/await_hil/-1/hitlDetails",
                      {"chosen_options": ["Report"], "params_input": {"results": {"brake_distance_m": 1}}},
                      user="ml-engineer")[0] == 403  # only the rig's account may report
    out = cli(server, root, "hil-rig", "hil", "report", "acc_gov_hil", run_d, "--metric", "brake_distance_m=31.5")
    assert out.returncode == 0, out.stderr
    server.wait_for(parked("acc_gov_hil", run_d), 600, "run D to reach review after the HIL report")

    server.wait_for(parked("acc_gov", run_a), 900, "run A to wait for review")
    server.wait_for(parked("acc_gov", run_b), 900, "run B to wait for review")
    time.sleep(5)  # a person takes seconds; an instant answer races the scheduler in Airflow 3.3

    # -- who may decide: Airflow refuses outsiders and the requester ------------------------------
    approve = {"chosen_options": ["Approve"], "params_input": {}}
    assert server.api("PATCH", hitl_path("acc_gov", run_a), approve, user="intruder")[0] == 403
    assert server.api("PATCH", hitl_path("acc_gov", run_a), approve, user="ml-engineer")[0] == 403
    out = cli(server, root, "ml-engineer", "approve", "acc_gov", run_a)
    assert out.returncode == 1 and "not an assigned reviewer" in out.stderr

    out = cli(server, root, "safety-lead", "approve", "acc_gov", run_a, "--comment", "looks safe")
    assert out.returncode == 0, out.stderr
    out = cli(server, root, "safety-deputy", "reject", "acc_gov", run_b, "--comment", "not this week")
    assert out.returncode == 0, out.stderr

    def done(dag_id, run_id):
        return lambda: server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")[1]["state"] in ("success", "failed")

    time.sleep(5)
    assert cli(server, root, "safety-lead", "reject", "acc_gov_hil", run_d).returncode == 0
    for dag_id, run_id in (("acc_gov", run_a), ("acc_gov", run_b), ("acc_gov_timeout", run_c),
                           ("acc_gov_hil", run_d), ("acc_gov_hil", run_e)):
        server.wait_for(done(dag_id, run_id), 900, f"{run_id} to finish")

    # -- HIL: D's report went through the gates; E got no report and stopped before the gates ----
    gate_d = xcom(server, "acc_gov_hil", run_d, "release_gate")
    hil_row = next(r for r in gate_d["report"] if r["metric"] == "hil.brake_distance_m")
    assert hil_row["value"] == 31.5 and hil_row["passed"] is True
    se = states(server, "acc_gov_hil", run_e)
    assert se["await_hil"] == "failed" and se["release_gate"] == "upstream_failed"
    assert se["register_candidate"] == "upstream_failed"

    # -- approve → promoted; reject → not promoted, clean end; timeout → not promoted, alerted ----
    sa, sb, sc = (states(server, "acc_gov", run_a), states(server, "acc_gov", run_b),
                  states(server, "acc_gov_timeout", run_c))
    assert sa["promote"] == "success" and sa["approval"] == "success"
    assert sb["approval"] == "success" and sb["promote"] == "skipped"
    assert sc["approval"] == "success" and sc["promote"] == "skipped"
    for dag_id, run_id in (("acc_gov", run_a), ("acc_gov", run_b), ("acc_gov_timeout", run_c)):
        assert server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")[1]["state"] == "success"

    client = MlflowClient(server.env["MLFLOW_TRACKING_URI"])
    va = xcom(server, "acc_gov", run_a, "register_candidate")["version"]
    vb = xcom(server, "acc_gov", run_b, "register_candidate")["version"]
    vc = xcom(server, "acc_gov_timeout", run_c, "register_candidate")["version"]
    assert str(client.get_model_version_by_alias("acc_gov_model", "production").version) == va
    tags_a = client.get_model_version("acc_gov_model", va).tags
    assert tags_a["closedloop.review.decision"] == "approved" and tags_a["closedloop.review.reviewer"] == "safety-lead"
    assert tags_a["closedloop.review.comment"] == "looks safe"
    assert tags_a["closedloop.request.requester"] == "ml-engineer"
    assert tags_a["closedloop.request.purpose"] == REQUEST["purpose"]
    assert client.get_model_version("acc_gov_model", vb).tags["closedloop.review.decision"] == "rejected"
    assert client.get_model_version("acc_timeout_model", vc).tags["closedloop.review.decision"] == "timeout"
    assert "production" not in client.get_registered_model("acc_timeout_model").aliases
    alerts = [json.loads(x) for x in (server.root / "closedloop" / "alerts.jsonl").read_text().splitlines()]
    timeouts = [a for a in alerts if a["kind"] == "review_timeout"]
    assert len(timeouts) == 1 and timeouts[0]["run_id"] == run_c and "not promoted" in timeouts[0]["message"]

    # -- forged approval tags on B: promote refuses, Airflow says Reject --------------------------
    for k, v in {"closedloop.review.decision": "approved", "closedloop.review.reviewer": "safety-lead"}.items():
        client.set_model_version_tag("acc_gov_model", vb, k, v)
    out = cli(server, root, "admin", "promote", "acc_gov_model", vb)
    assert out.returncode == 1 and "the review decision was ['Reject']" in out.stderr, out.stderr
    # -- replay: point B's lineage at run A (approved for A): refused, A registered another version
    client.set_model_version_tag("acc_gov_model", vb, "airflow.run_id", run_a)
    out = cli(server, root, "admin", "promote", "acc_gov_model", vb)
    assert out.returncode == 1 and f"that run registered version {va}, not {vb}" in out.stderr, out.stderr
    assert str(client.get_model_version_by_alias("acc_gov_model", "production").version) == va
    # -- promoting the approved version again through the CLI is idempotent ----------------------
    out = cli(server, root, "admin", "promote", "acc_gov_model", va)
    assert out.returncode == 0 and "already; nothing changed" in out.stdout, out.stderr

    # -- audit: request, gates, decision, alias changes, in order ---------------------------------
    out = cli(server, root, "admin", "audit", "acc_gov_model", va)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    order = [text.index(s) for s in ("1. request", "requester: ml-engineer", "2. release gates: passed",
                                     "PASS  sim.hard_braking.collision_rate", "3. review",
                                     "decision: approved by safety-lead", "comment:  looks safe", "4. events",
                                     "review.approved", "alias.production")]
    assert order == sorted(order)
    assert cli(server, root, "admin", "audit", "acc_gov_model", "99").returncode == 2

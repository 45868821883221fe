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

from closedloop.local.server import AirflowServer
from closedloop.records.airflow_api import xcom_value
from closedloop.steps import governance as gov
from tests.conftest import ONE_APPROVAL, SAFE_DATA, scratch_project, template_text

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GOV = {'schedule: "0 3 * * 1"': "schedule: null", "window_days: 14": "window_days: 5", **SAFE_DATA,
       "name: acc_longitudinal": "name: acc_gov", "name: acc_longitudinal_policy": "name: acc_gov_model",
       # approvals expire after 3 minutes here (replays are tested), the alias watcher looks every 5 s
       "timeout_hours: 72": "timeout_hours: 72\n  valid_hours: 0.05\n  alias_poll_seconds: 5", **ONE_APPROVAL,
       # a recall retrains only acc_trust here (each retrain is a whole pipeline run)
       "owner: acc-ml-team\n": "owner: acc-ml-team\nrecall: {retrain: false}\n"}
VALID_SECONDS = 0.05 * 3600
TIMEOUT = {**GOV, "name: acc_longitudinal": "name: acc_gov_timeout", "name: acc_longitudinal_policy": "name: acc_timeout_model",
           "timeout_hours: 72": "timeout_hours: 0.01"}  # 36 s; the alias watcher polls every 30 s for it
HIL = {**GOV, "name: acc_longitudinal": "name: acc_gov_hil", "name: acc_longitudinal_policy": "name: acc_hil_model",
       "approval:\n": "hil:\n  reporter: hil-rig\n  timeout_minutes: 1\napproval:\n",
       "gates:\n": "gates:\n  - metric: hil.brake_distance_m\n    max: 40\n",
       # the two-person rule: two approval tasks, two different people
       "timeout_hours: 72": "timeout_hours: 72\n  valid_hours: 0.05\n  required: 2"}
REL = {**GOV, "name: acc_longitudinal": "name: acc_rel", "name: acc_longitudinal_policy": "name: acc_rel_model"}
TRUST = {**GOV, "name: acc_longitudinal": "name: acc_trust", "name: acc_longitudinal_policy": "name: acc_trust_model",
         "owner: acc-ml-team\n": "owner: acc-ml-team\nrecall: {retrain: true}\n"}
SOLO = {**GOV, "name: acc_longitudinal": "name: acc_gov_solo", "name: acc_longitudinal_policy": "name: acc_solo_model",
        "approvers: [safety-lead, safety-deputy]": "approvers: [safety-lead]"}
USERS = {"admin": "admin", "ml-engineer": "user", "safety-lead": "user", "safety-deputy": "user", "intruder": "user",
         "hil-rig": "user", "fleet-monitor": "viewer"}  # the deployment's roles: nobody but the admin has op
EXPIRED: dict = {}
"""Run A of the governed path: its promote is cleared again once its approval expired (the module's last test,
so the wait for the expiry overlaps the other tests)."""
REQUEST = {"purpose": "Retrain on the latest fleet logs for the test.", "change": ["data"],
           "expected_impact": "No regression in any gate.", "scope": "test fleet", "ticket": "T-1"}


DEPLOY_DAG = """
from airflow.sdk import DAG, Asset, task

with DAG("deploy_acc_rel", schedule=[Asset("closedloop://models/acc_rel_model/production")], catchup=False):
    @task
    def deploy(triggering_asset_events=None):
        return [dict(e.extra) for events in triggering_asset_events.values() for e in events]

    deploy()
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory, project):
    root = scratch_project(tmp_path_factory.mktemp("gov-project"))
    (root / "include" / "pipelines" / "acc_gov.yaml").write_text(template_text(project, gates="point", incidents=False, **GOV))
    (root / "include" / "pipelines" / "acc_gov_timeout.yaml").write_text(template_text(project, gates="point", incidents=False, **TIMEOUT))
    (root / "include" / "pipelines" / "acc_gov_hil.yaml").write_text(template_text(project, gates="point", incidents=False, **HIL))
    (root / "include" / "pipelines" / "acc_gov_solo.yaml").write_text(template_text(project, gates="point", incidents=False, **SOLO))
    (root / "include" / "pipelines" / "acc_rel.yaml").write_text(template_text(project, gates="point", incidents=False, **REL))
    (root / "include" / "pipelines" / "acc_trust.yaml").write_text(template_text(project, gates="point", incidents=False, **TRUST))
    # a deployment DAG of the release process, scheduled on the model's production asset: it keeps
    # the events that started it (what it would deploy)
    (root / "dags" / "deploy_acc_rel.py").write_text(DEPLOY_DAG)
    work = tmp_path_factory.mktemp("gov-airflow")
    # run D's second approval fails once while it records the reviewer's answer (as if MLflow dropped
    # the connection): the retry must record that answer, not ask again
    # (transient); its first approval's process is SIGKILLed at the same point (a lost worker)
    (work / "faults.json").write_text(json.dumps([
        {"task": "approval_2", "dag": "acc_gov_hil", "fault": "transient", "point": "decision_received", "tries": [1]},
        {"task": "approval", "dag": "acc_gov_hil", "fault": "kill", "point": "decision_received", "tries": [1]}]))
    server = AirflowServer(work, root / "dags", {u: (r, f"{u}-pw-{i}") for i, (u, r) in enumerate(USERS.items())},
                           env={"CLOSEDLOOP_FAULTS": str(work / "faults.json")})
    server.start()
    yield server, root
    server.stop()


def cli(server, root, user: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AIRFLOW_API_URL": server.url, "AIRFLOW_USERNAME": user,
           "AIRFLOW_PASSWORD": server.users[user][1], "MLFLOW_TRACKING_URI": server.env["MLFLOW_TRACKING_URI"],
           "CLOSEDLOOP_HOME": server.env["CLOSEDLOOP_HOME"], "CLOSEDLOOP_INCLUDE_DIR": str(root / "include"),
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "closedloop.cli", *args], capture_output=True, text=True,
                          timeout=180, env=env)


def states(server, dag_id, run_id) -> dict[str, str]:
    _, tis = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
    return {t["task_id"]: t["state"] for t in tis["task_instances"]}


def hitl_path(dag_id, run_id) -> str:
    return f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails"


def xcom(server, dag_id, run_id, task):
    _, entry = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/return_value")
    return xcom_value(entry)


def test_governed_path(env):
    server, root = env
    for dag_id in ("acc_gov", "acc_gov_timeout", "acc_gov_hil", "acc_gov_solo"):
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
    # -- a request only its requester could approve is refused by the run's first task ----------
    run_s = server.api("POST", "/api/v2/dags/acc_gov_solo/dagRuns", {"logical_date": None, "conf": REQUEST},
                       user="safety-lead")[1]["dag_run_id"]
    # F: a requester edits the recorded candidate while F waits for review; G: requested by an approver
    run_f = server.api("POST", "/api/v2/dags/acc_gov/dagRuns", {"logical_date": None, "conf": REQUEST},
                       user="ml-engineer")[1]["dag_run_id"]
    run_g = server.api("POST", "/api/v2/dags/acc_gov/dagRuns", {"logical_date": None, "conf": REQUEST},
                       user="safety-lead")[1]["dag_run_id"]
    # D and E wait for hardware-in-the-loop results: the rig reports for D, never for E
    run_d, run_e = (server.api("POST", "/api/v2/dags/acc_gov_hil/dagRuns", {"logical_date": None, "conf": REQUEST},
                               user="ml-engineer")[1]["dag_run_id"] for _ in range(2))

    def parked(dag_id, run_id):
        return lambda: states(server, dag_id, run_id).get("approval") == "awaiting_input"

    def waiting_for_rig():
        return states(server, "acc_gov_hil", run_d).get("await_hil") == "awaiting_input"

    server.wait_for(waiting_for_rig, 900, "run D to wait for the HIL rig")
    assert server.api("PATCH", f"/api/v2/dags/acc_gov_hil/dagRuns/{run_d}/taskInstances/await_hil/-1/hitlDetails",
                      {"chosen_options": ["Report"], "params_input": {"results": {"brake_distance_m": 1}}},
                      user="ml-engineer")[0] == 403  # only the rig's account may report
    out = cli(server, root, "hil-rig", "hil", "report", "acc_gov_hil", run_d, "--metric", "brake_distance_m=31.5")
    assert out.returncode == 0, out.stderr
    server.wait_for(parked("acc_gov_hil", run_d), 600, "run D to reach review after the HIL report")

    server.wait_for(parked("acc_gov", run_a), 900, "run A to wait for review")
    server.wait_for(parked("acc_gov", run_b), 900, "run B to wait for review")
    server.wait_for(parked("acc_gov", run_f), 900, "run F to wait for review")
    server.wait_for(parked("acc_gov", run_g), 900, "run G to wait for review")
    # answered at once: the CLI waits until a review is parked, and an answer that races Airflow's own
    # bookkeeping is recovered by the approval's retry (it takes the answer, never asks again)

    # -- the reviewer is shown exactly one thing: model and version in the subject, digest, gates --
    client = MlflowClient(server.env["MLFLOW_TRACKING_URI"])
    rec_a = xcom(server, "acc_gov", run_a, "register_candidate")
    _, detail = server.api("GET", hitl_path("acc_gov", run_a))
    assert detail["subject"] == f"Release acc_gov_model version {rec_a['version']}? (acc_gov)"
    from closedloop.runtime.signing import digest

    assert digest(rec_a) in detail["body"] and rec_a["artifact_digest"] in detail["body"]
    assert "gates passed" in detail["body"] and "| **PASS** | `sim.hard_braking.collision_rate` | <= 0 |" in detail["body"]
    assert "No decision within 72 h (3 days) counts as a rejection" in detail["body"]
    assert "| **N/A** | `sim.regression.collision_rate` |" in detail["body"]  # nothing to judge yet: never a PASS
    alerts = [json.loads(x) for x in (server.root / "closedloop" / "alerts.jsonl").read_text().splitlines()]
    opened = {a["run_id"]: a for a in alerts if a["kind"] == "review_requested"}
    assert f"acc_gov_model version {rec_a['version']} waits for review" in opened[run_a]["message"]
    assert opened[run_a]["link"].endswith(f"/dags/acc_gov/runs/{run_a}/tasks/approval/required_actions")

    # -- G: requested by safety-lead, an approver: Airflow assigns only the other approver -------
    _, detail_g = server.api("GET", hitl_path("acc_gov", run_g))
    assert [u["id"] for u in detail_g["assigned_users"]] == ["safety-deputy"]
    assert server.api("PATCH", hitl_path("acc_gov", run_g), {"chosen_options": ["Approve"], "params_input": {}},
                      user="safety-lead")[0] == 403

    # -- F: a requester registers a version out of band and points F's recorded candidate at it ---
    rec_f = xcom(server, "acc_gov", run_f, "register_candidate")
    oob = client.create_model_version("acc_gov_model", f"runs:/{rec_f['training_run_id']}/not-the-gated-model",
                                      rec_f["training_run_id"])
    for k, v in client.get_model_version("acc_gov_model", rec_f["version"]).tags.items():
        client.set_model_version_tag("acc_gov_model", oob.version, k, v)  # every tag copied, record included
    edited = {**rec_f, "version": str(oob.version), "model_uri": f"models:/acc_gov_model/{oob.version}"}
    status, body = server.api("PATCH", f"/api/v2/dags/acc_gov/dagRuns/{run_f}/taskInstances/register_candidate/"
                              "xcomEntries/return_value", {"value": edited, "map_index": -1}, user="ml-engineer")
    assert status == 200, (status, body)  # Airflow lets a requester edit XCom: it is no evidence
    assert xcom(server, "acc_gov", run_f, "register_candidate")["version"] == str(oob.version)

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
    approved_at = time.monotonic()
    out = cli(server, root, "safety-lead", "approve", "acc_gov", run_f, "--comment", "the record looked fine")
    assert out.returncode == 0, out.stderr

    def done(dag_id, run_id):
        return lambda: server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")[1]["state"] in ("success", "failed")

    # D needs two approvals: safety-lead, then somebody else (Airflow refuses safety-lead a second time)
    assert cli(server, root, "safety-lead", "approve", "acc_gov_hil", run_d).returncode == 0
    server.wait_for(lambda: states(server, "acc_gov_hil", run_d).get("approval_2") == "awaiting_input", 600,
                    "run D's second approval")
    second = f"/api/v2/dags/acc_gov_hil/dagRuns/{run_d}/taskInstances/approval_2/-1/hitlDetails"
    _, detail_d = server.api("GET", second)
    assert "approval 2 of 2" in detail_d["subject"] and "Already approved by: safety-lead" in detail_d["body"]
    assert server.api("PATCH", second, {"chosen_options": ["Approve"], "params_input": {}}, user="safety-lead")[0] == 403
    assert server.api("PATCH", second, {"chosen_options": ["Approve"], "params_input": {"comment": "second pair"}},
                      user="safety-deputy")[0] == 200
    for dag_id, run_id in (("acc_gov", run_a), ("acc_gov", run_b), ("acc_gov_timeout", run_c),
                           ("acc_gov_hil", run_d), ("acc_gov_hil", run_e), ("acc_gov", run_f)):
        server.wait_for(done(dag_id, run_id), 900, f"{run_id} to finish")
    # the CLI tells a decided review from a run that does not exist (exit 1: refused; 2: not found)
    out = cli(server, root, "safety-deputy", "approve", "acc_gov", run_b, "--wait", "0")
    assert out.returncode == 1 and "was already decided (approval: " in out.stderr, out.stderr
    out = cli(server, root, "safety-deputy", "approve", "acc_gov", "manual__1999-01-01T00:00:00+00:00", "--wait", "0")
    assert out.returncode == 2 and "acc_gov has no run 'manual__1999-01-01T00:00:00+00:00'" in out.stderr, out.stderr
    # G is approved by the other approver only now that A is production: G's review saw no production
    assert cli(server, root, "safety-deputy", "approve", "acc_gov", run_g).returncode == 0
    server.wait_for(done("acc_gov", run_g), 900, f"{run_g} to finish")

    def refusal(dag_id, run_id, task="promote") -> str:
        _, entry = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/error")
        return xcom_value(entry)["message"]

    # -- F: the edited record is refused by the first governed step that reads it after the edit:
    #    the dossier (the first step after the approvals), or the approval itself when it was retried
    #    (Airflow's race with an answer given at once); nothing reached production ---------------------
    f_states = states(server, "acc_gov", run_f)
    where = next((t for t in ("approval", "dossier", "promote") if f_states.get(t) == "failed"), None)
    assert where and f_states["promote"] in ("failed", "upstream_failed"), f_states
    assert "the result of task 'register_candidate': the seal does not match the content" in \
        refusal("acc_gov", run_f, where)
    # -- G: approved by the other approver, but production moved since G's review opened ----------
    assert states(server, "acc_gov", run_g)["promote"] == "failed"
    assert "production moved since the review opened (was none, is" in refusal("acc_gov", run_g)

    # -- the solo request never computed: its first task refused it -------------------------------
    server.wait_for(done("acc_gov_solo", run_s), 300, "the solo request to fail")
    solo = states(server, "acc_gov_solo", run_s)
    assert solo["generate_dataset"] == "failed" and solo["label"] == "upstream_failed"
    assert "refusing the request of 'safety-lead' before any compute" in refusal("acc_gov_solo", run_s,
                                                                                "generate_dataset")
    # -- D: two approvals by two people reached production, each recorded ----------------------
    sd = states(server, "acc_gov_hil", run_d)
    assert (sd["approval"], sd["approval_2"], sd["promote"]) == ("success", "success", "success")
    vd = xcom(server, "acc_gov_hil", run_d, "register_candidate")["version"]
    assert str(MlflowClient(server.env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(
        "acc_hil_model", "production").version) == vd
    audit_d = cli(server, root, "admin", "audit", "acc_hil_model", vd).stdout
    assert "approval: approved by safety-lead" in audit_d and "approval_2: approved by safety-deputy" in audit_d
    # ... the second although recording it failed once: try 2 opened no review (nobody was asked
    # again) and recorded the answer given to try 1, once
    _, ti2 = server.api("GET", f"/api/v2/dags/acc_gov_hil/dagRuns/{run_d}/taskInstances/approval_2")
    assert ti2["try_number"] == 2 and ti2["state"] == "success"
    # (try 1 ended either in the drill or, answered at once, in Airflow's race with its parking: either
    # way the answer stays on the task instance and try 2 took it)
    _, current = server.api("GET", second)
    assert current["responded_by_user"]["id"] == "safety-deputy" and current["response_received"]
    _, log2 = server.api("GET", f"/api/v2/dags/acc_gov_hil/dagRuns/{run_d}/taskInstances/approval_2/logs/2"
                                "?full_content=true")
    assert "safety-deputy already answered ['Approve']" in json.dumps(log2) and "not asking again" in json.dumps(log2)
    _, ti1 = server.api("GET", f"/api/v2/dags/acc_gov_hil/dagRuns/{run_d}/taskInstances/approval")
    assert ti1["try_number"] == 2 and ti1["state"] == "success"  # killed while recording, then retried
    _, log1 = server.api("GET", f"/api/v2/dags/acc_gov_hil/dagRuns/{run_d}/taskInstances/approval/logs/2"
                                "?full_content=true")
    assert "safety-lead already answered ['Approve']" in json.dumps(log1)
    decided = [k for k in MlflowClient(server.env["MLFLOW_TRACKING_URI"]).get_model_version("acc_hil_model", vd).tags
               if k.startswith("closedloop.audit.") and ".review.approved" in k]
    assert len(decided) == 2, decided  # one entry per answer: approval and approval_2

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

    # -- promote through the CLI (closedloop_registry): only sealed evidence counts ---------------
    for k, v in {"closedloop.review.decision": "approved", "closedloop.review.reviewer": "safety-lead"}.items():
        client.set_model_version_tag("acc_gov_model", vb, k, v)  # forged convenience tags on rejected B
    out = cli(server, root, "admin", "promote", "acc_gov_model", vb)
    assert out.returncode == 1 and "the review decision was 'rejected'" in out.stderr, out.stderr
    tags_a = client.get_model_version("acc_gov_model", va).tags
    for k in (gov.RECORD_TAG, gov.APPROVAL_TAG + "approval"):  # A's sealed evidence copied onto B ...
        client.set_model_version_tag("acc_gov_model", vb, k, tags_a[k])
    out = cli(server, root, "admin", "promote", "acc_gov_model", vb)
    assert out.returncode == 1 and f"the release record on it is for acc_gov_model version {va}" in out.stderr
    client.set_model_version_tag("acc_timeout_model", vc, gov.RECORD_TAG, tags_a[gov.RECORD_TAG])  # ... another model
    client.set_model_version_tag("acc_timeout_model", vc, gov.APPROVAL_TAG + "approval",
                                 tags_a[gov.APPROVAL_TAG + "approval"])
    out = cli(server, root, "admin", "promote", "acc_timeout_model", vc)
    assert out.returncode == 1 and "no governed pipeline has model 'acc_timeout_model'" not in out.stderr
    assert f"the release record on it is for acc_gov_model version {va}" in out.stderr, out.stderr
    assert str(client.get_model_version_by_alias("acc_gov_model", "production").version) == va
    assert "production" not in client.get_registered_model("acc_timeout_model").aliases
    # B's own sealed record back (its run's XCom holds it), so only the alias move below is unexplained
    client.set_model_version_tag("acc_gov_model", vb, gov.RECORD_TAG,
                                 json.dumps(xcom(server, "acc_gov", run_b, "register_candidate")))
    out = cli(server, root, "ml-engineer", "promote", "acc_gov_model", va)  # the approved one: idempotent
    assert out.returncode == 0 and "already; nothing changed" in out.stdout, out.stderr

    # -- rollback: a person's request through Airflow; credentials and the right role needed -----
    no_login = cli(server, root, "ml-engineer", "rollback", "acc_gov_model", "--reason", "x",
                   env={"AIRFLOW_PASSWORD": "wrong"})
    assert no_login.returncode == 1 and "Airflow refused the login" in no_login.stderr
    out = cli(server, root, "ml-engineer", "rollback", "acc_gov_model", "--reason", "I prefer the old one")
    assert out.returncode == 1 and "'ml-engineer' may not roll back acc_gov_model" in out.stderr, out.stderr
    out = cli(server, root, "safety-lead", "rollback", "acc_gov_model", "--reason", "wet-road regression")
    assert out.returncode == 1 and "no 'previous-production' version" in out.stderr, out.stderr

    # -- an alias moved directly in MLflow: detected within a poll, alerted, restored -----------
    client.set_registered_model_alias("acc_gov_model", "production", vb)

    def alarmed(text: str):
        lines = (server.root / "closedloop" / "alerts.jsonl").read_text().splitlines()
        return [a for a in map(json.loads, lines) if a["kind"] == "alias_unexplained" and text in a["message"]]
    (alarm,) = server.wait_for(lambda: alarmed(f"acc_gov_model@production → version {vb}"), 180,
                               "the alias watcher to alert")
    assert f"put version {va} there" in alarm["message"] and "closedloop audit --verify acc_gov_model" in alarm["message"]
    # the record copied onto the timeout model's candidate above was noticed too
    assert alarmed(f"acc_timeout_model@candidate → version {vc}, whose release record is for acc_gov_model")
    out = cli(server, root, "ml-engineer", "audit", "--verify", "acc_gov_model")
    assert out.returncode == 1 and f"UNEXPLAINED: acc_gov_model@production → version {vb}" in out.stdout
    out = cli(server, root, "ml-engineer", "audit", "--verify", "acc_gov_model", "--restore", "--reason", "x")
    assert out.returncode == 1 and "'ml-engineer' may not restore" in out.stderr
    out = cli(server, root, "safety-lead", "audit", "--verify", "acc_gov_model", "--restore", "--reason",
              "moved by hand in MLflow")
    assert out.returncode == 0 and f"production is version {va} again (was {vb})" in out.stdout, out.stderr
    assert cli(server, root, "ml-engineer", "audit", "--verify", "acc_gov_model").returncode == 0

    # (the replay of A's promote after its approval expired: the module's last test, when it has)
    EXPIRED.update(run_a=run_a, va=va, approved_at=approved_at)

    # -- reviewer shopping: the requester clears B's rejected approval (and promote) to be asked again:
    #    the cleared task takes the answer already given (Reject), asks nobody, promotes nothing ---
    status, body = server.api("POST", "/api/v2/dags/acc_gov/clearTaskInstances", {
        "dry_run": False, "dag_run_id": run_b, "task_ids": ["approval"], "include_downstream": True,
        "only_failed": False, "reset_dag_runs": True}, user="ml-engineer")
    assert status == 200, (status, body)
    server.wait_for(lambda: states(server, "acc_gov", run_b)["approval"] in ("success", "failed")
                    and server.api("GET", f"/api/v2/dags/acc_gov/dagRuns/{run_b}")[1]["state"] in ("success", "failed"),
                    600, "B's cleared approval to run again")
    _, again_b = server.api("GET", f"/api/v2/dags/acc_gov/dagRuns/{run_b}/taskInstances/approval")
    assert again_b["try_number"] >= 2 and states(server, "acc_gov", run_b)["promote"] == "skipped"
    _, log_b = server.api("GET", f"/api/v2/dags/acc_gov/dagRuns/{run_b}/taskInstances/approval/logs/"
                                 f"{again_b['try_number']}?full_content=true")
    assert "safety-deputy already answered ['Reject']" in json.dumps(log_b)
    assert str(client.get_model_version_by_alias("acc_gov_model", "production").version) == va

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


@pytest.fixture(scope="module")
def released(env) -> tuple[str, str]:
    """The hand-off's own pipeline (acc_rel), so its test runs alone and in any order: two requests
    at once; safety-lead approves the first (→ production), the second waits for review (a candidate
    to compare with production). Returns the two runs."""
    server, root = env
    server.wait_for(lambda: server.api("GET", "/api/v2/dags/acc_rel")[0] == 200, 120, "acc_rel parsed")
    first, second = (server.api("POST", "/api/v2/dags/acc_rel/dagRuns", {"logical_date": None, "conf": REQUEST},
                                user="ml-engineer")[1]["dag_run_id"] for _ in range(2))
    for run in (first, second):
        server.wait_for(lambda r=run: states(server, "acc_rel", r).get("approval") == "awaiting_input", 900,
                        f"acc_rel run {run} to wait for review")
    out = cli(server, root, "safety-lead", "approve", "acc_rel", first, "--comment", "ready for release")
    assert out.returncode == 0, out.stderr
    server.wait_for(lambda: states(server, "acc_rel", first)["promote"] in ("success", "failed"), 600,
                    "the first acc_rel run's promotion")
    assert states(server, "acc_rel", first)["promote"] == "success"
    return first, second


def test_the_hand_off_to_release_review_card_and_model_card(env, released):
    """The promotion's asset event started the deployment DAG with the signed
    release record; the review card of a later candidate, read in a real browser, shows the numbers
    MLflow holds for it and for production; the production version's model card names its data,
    metrics and approver."""
    from closedloop.runtime.signing import Binding
    from tests.browser import Browser, chromium_path

    server, root = env
    promoted_run, waiting_run = released
    client = MlflowClient(server.env["MLFLOW_TRACKING_URI"])
    prod = client.get_model_version_by_alias("acc_rel_model", "production")
    assert prod.tags["airflow.run_id"] == promoted_run
    # -- the production asset event started the deployment DAG under the scheduler ---------------
    runs = server.wait_for(lambda: server.api("GET", "/api/v2/dags/deploy_acc_rel/dagRuns?state=success")[1]
                           .get("dag_runs"), 300, "the deployment DAG to run on the promotion")
    events = [e for r in runs for e in xcom(server, "deploy_acc_rel", r["dag_run_id"], "deploy")]
    first = next(e for e in events if e.get("changed"))
    assert first["model"] == "acc_rel_model" and first["version"] == str(prod.version)
    # a consumer verifies with the deployment's pinned key (a key in a model tag is a convenience, never trust)
    from closedloop.runtime.signing import trusted_keys

    verifier = trusted_keys(home=server.env["CLOSEDLOOP_HOME"])
    assert verifier.published() == client.get_registered_model("acc_rel_model").tags[gov.PUBLIC_KEY_TAG]
    record = verifier.unseal(first["release_record"], Binding("acc_rel", prod.tags["airflow.run_id"],
                                                              "register_candidate"), what="the release record")
    assert record["version"] == str(prod.version) and record["artifact_digest"] == first["release_record"]["artifact_digest"]
    from closedloop.errors import EvidenceError

    forged = {**first["release_record"], "version": "999"}
    with pytest.raises(EvidenceError):  # a consumer refuses an event whose record was edited
        verifier.unseal(forged, None, what="the release record")
    # -- the review card of a candidate that is not production, compared with production ---------
    other = next(v for v in client.search_model_versions("name = 'acc_rel_model'")
                 if v.tags.get("airflow.run_id") == waiting_run)
    gate_of = {v: client.get_run(client.get_model_version("acc_rel_model", v).tags["closedloop.gate_run_id"]).data.metrics
               for v in (other.version, prod.version)}
    _, plugins = server.api("GET", "/api/v2/plugins")
    views = [v for p in plugins["plugins"] if p["name"] == "closedloop" for v in p["external_views"]]
    assert any(v["destination"] == "dag_run" and "{RUN_ID}" in v["href"] for v in views)  # the DAG-run tab
    import urllib.request
    from urllib.parse import urlencode

    req = urllib.request.Request(server.url + "/closedloop/api/review?" + urlencode(
        {"dag_id": "acc_rel", "run_id": other.tags["airflow.run_id"]}))
    req.add_header("Authorization", f"Bearer {server.client('safety-deputy').token()}")
    with urllib.request.urlopen(req, timeout=120) as r:
        card = json.load(r)
    assert card["compared_with"]["version"] == str(prod.version)
    if chromium_path() is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    from urllib.parse import quote

    with Browser() as b:
        b.set_cookie(server.url, "_token", server.client("safety-deputy").token())
        b.goto(f"{server.url}/closedloop/review?dag_id=acc_rel&run_id={quote(other.tags['airflow.run_id'], safe='')}")
        assert b.eval("document.getElementById('version').textContent") == str(other.version)
        assert f"production version {prod.version}" in b.eval("document.getElementById('compared').textContent")
        for metric in ("sim.collision_rate", "sim.hard_braking.min_ttc_s", "offline.rmse"):
            row = f"document.querySelector('#metrics tr[data-metric=\"{metric}\"]')"
            shown = [float(b.eval(f"{row}.querySelector('.{c}').textContent")) for c in ("c", "p")]
            assert shown == pytest.approx([gate_of[other.version][metric], gate_of[prod.version][metric]], rel=1e-3)
        assert b.eval("document.querySelectorAll('#charts svg rect').length") > 0  # per-scenario bars drawn
        assert b.eval("document.querySelectorAll('#gates tr.pass, #gates tr.na').length") == len(card["gates"])
        assert b.eval("document.querySelectorAll('#gates tr.fail').length") == 0
        # every gate shows its limit beside the value (the reviewer judges against the threshold)
        for g in card["gates"]:
            row = f"document.querySelector('#gates tr[data-metric=\"{g['metric']}\"]')"
            assert b.eval(f"{row}.querySelector('.limit').textContent") not in ("", "-")
    # -- the model card of the production version, in the registry --------------------------------
    text = client.get_model_version("acc_rel_model", prod.version).description
    assert f"# acc_rel_model version {prod.version}\n" in text
    written = next(line for line in text.splitlines() if line.startswith("Aliases when this card was written: "))
    assert "production" in written.split(": ", 1)[1].split(", "), written  # maybe still the candidate too
    assert prod.tags["closedloop.dataset_version"] in text and "## Metrics per scenario" in text
    assert f"approved by {prod.tags['closedloop.review.reviewer']}" in text


def test_the_deployments_own_roles_cannot_break_the_trust_chain(env, tmp_path):
    """Each way through found with the rights the deployment hands its people, tried with those rights
    (REST as that person, the MLflow client, the CLI): a key planted as a connection, review state
    forged in a request's text, previous-production moved in MLflow, a cleared rollback, markup in a
    record a page shows. Production ends unchanged each time, with the reason."""
    from closedloop.runtime.signing import Binding, Signer, digest

    server, root = env
    server.wait_for(lambda: server.api("GET", "/api/v2/dags/acc_trust")[0] == 200, 120, "acc_trust parsed")
    client = MlflowClient(server.env["MLFLOW_TRACKING_URI"])

    def production():
        return str(client.get_model_version_by_alias("acc_trust_model", "production").version)

    def parked(run_id):
        return lambda: states(server, "acc_trust", run_id).get("approval") == "awaiting_input"

    def settled(run_id, task="promote"):
        return lambda: states(server, "acc_trust", run_id).get(task) in ("success", "failed", "skipped")

    def refusal(dag_id, run_id, task="promote") -> str:
        _, entry = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/error")
        return (xcom_value(entry) or {}).get("message", "")

    # -- 1. the incident reporter (viewer) can neither plant a key nor starve the incident pool ----------
    forged = Signer.generate()
    conn = {"connection_id": "closedloop_signing", "conn_type": "generic", "password": forged.seed_b64()}
    assert server.api("POST", "/api/v2/connections", conn, user="fleet-monitor")[0] == 403
    assert server.api("PATCH", "/api/v2/pools/default_pool?update_mask=slots", {"name": "default_pool", "slots": 0},
                      user="fleet-monitor")[0] == 403
    assert server.api("POST", "/api/v2/variables", {"key": "x", "value": "y"}, user="fleet-monitor")[0] == 403

    # -- R1 and R2 at once; R2's purpose carries lines that look like the pipeline's own ---------------
    run1 = server.api("POST", "/api/v2/dags/acc_trust/dagRuns", {"logical_date": None, "conf": REQUEST},
                      user="ml-engineer")[1]["dag_run_id"]
    server.wait_for(parked(run1), 900, "R1 to wait for review")
    v1 = xcom(server, "acc_trust", run1, "register_candidate")["version"]
    lie = {**REQUEST, "purpose": f"Retrain on the latest logs.\n- Production now: version {v1}\n"
                                 "- Release record: `sha256:0000`\n<img src=x onerror=alert(1)>"}
    run2 = server.api("POST", "/api/v2/dags/acc_trust/dagRuns", {"logical_date": None, "conf": lie},
                      user="ml-engineer")[1]["dag_run_id"]
    server.wait_for(parked(run2), 900, "R2 to wait for review")
    _, detail2 = server.api("GET", hitl_path("acc_trust", run2))
    body = detail2["body"]
    # the pipeline's lines once each; the requester's text quoted, every markup character escaped
    assert [line for line in body.splitlines() if line.startswith(("- Production now:", "- Release record:"))] == [
        f"- Release record: `{digest(xcom(server, 'acc_trust', run2, 'register_candidate'))}`",
        "- Production now: none yet"]
    assert f"> \\- Production now: version {v1}" in body and "> \\<img src=x onerror=alert\\(1\\)\\>" in body
    # the model card (the registry's description) quotes the request the same way
    card2 = client.get_model_version("acc_trust_model", xcom(server, "acc_trust", run2, "register_candidate")["version"])
    assert f"> \\- Production now: version {v1}" in card2.description
    assert not any(line.startswith("- Production now") for line in card2.description.splitlines())
    assert cli(server, root, "safety-lead", "approve", "acc_trust", run1).returncode == 0
    server.wait_for(settled(run1), 600, "R1's promotion")
    assert production() == v1
    assert cli(server, root, "safety-deputy", "approve", "acc_trust", run2).returncode == 0
    server.wait_for(settled(run2), 600, "R2's promotion")
    assert "production moved since the review opened (was none, is" in refusal("acc_trust", run2)
    # -- 5. the requester clears R2's approval: the retry takes the sealed record of what the review showed
    #       (production: none), not the forged line; promote refuses again --------------------------------
    status, _ = server.api("POST", "/api/v2/dags/acc_trust/clearTaskInstances", {
        "dry_run": False, "dag_run_id": run2, "task_ids": ["approval"], "include_downstream": True,
        "only_failed": False, "reset_dag_runs": True}, user="ml-engineer")
    assert status == 200
    server.wait_for(lambda: server.api("GET", f"/api/v2/dags/acc_trust/dagRuns/{run2}")[1]["state"]
                    in ("success", "failed") and states(server, "acc_trust", run2)["promote"] in ("failed", "skipped",
                                                                                              "upstream_failed"),
                    600, "R2's cleared approval and promote")
    _, again = server.api("GET", f"/api/v2/dags/acc_trust/dagRuns/{run2}/taskInstances/approval")
    assert again["try_number"] >= 2
    assert "production moved since the review opened (was none, is" in refusal("acc_trust", run2)
    assert production() == v1

    # -- 1. a key planted as the signing connection (by anyone who can write connections) is no trust ---
    assert server.api("POST", "/api/v2/connections", conn, user="admin")[0] in (200, 201)
    v2 = xcom(server, "acc_trust", run2, "register_candidate")["version"]
    record = json.loads(client.get_model_version("acc_trust_model", v2).tags[gov.RECORD_TAG])
    body_ = {k: v for k, v in record.items() if k != "_seal"}
    resealed = forged.seal(body_, Binding("acc_trust", run2, "register_candidate"))
    client.set_model_version_tag("acc_trust_model", v2, gov.RECORD_TAG, json.dumps(resealed))
    for task, who in (("approval", "safety-lead"), ("approval_2", "safety-deputy")):
        statement = {"kind": "approval", "model": "acc_trust_model", "version": v2, "record_digest": digest(body_),
                     "decision": "approved", "chosen_options": ["Approve"], "responder": who,
                     "responded_at": __import__("datetime").datetime.now(__import__("datetime").UTC).isoformat(),
                     "production_at_review": v1, "task_id": task}
        client.set_model_version_tag("acc_trust_model", v2, gov.APPROVAL_TAG + task, json.dumps(
            forged.seal({"statement": statement}, Binding("acc_trust", run2, task))))
    out = cli(server, root, "admin", "promote", "acc_trust_model", v2)
    assert out.returncode == 1 and f"sealed with key '{forged.verifier.key_id}', which is not a pinned key" in out.stderr
    assert production() == v1

    # -- a second governed promotion: R3 (production v1 → v3, previous-production v1) -----------------
    run3 = server.api("POST", "/api/v2/dags/acc_trust/dagRuns", {"logical_date": None, "conf": REQUEST},
                      user="ml-engineer")[1]["dag_run_id"]
    server.wait_for(parked(run3), 900, "R3 to wait for review")
    assert cli(server, root, "safety-lead", "approve", "acc_trust", run3).returncode == 0
    server.wait_for(settled(run3), 600, "R3's promotion")
    v3 = xcom(server, "acc_trust", run3, "register_candidate")["version"]
    assert states(server, "acc_trust", run3)["promote"] == "success", refusal("acc_trust", run3)  # signed despite the planted key
    assert production() == v3

    # -- 3. previous-production pointed at an ungated version in MLflow: detected, never rolled back to --
    rec1 = xcom(server, "acc_trust", run1, "register_candidate")
    oob = client.create_model_version("acc_trust_model", f"runs:/{rec1['training_run_id']}/not-gated",
                                      rec1["training_run_id"])
    client.set_registered_model_alias("acc_trust_model", "previous-production", oob.version)
    out = cli(server, root, "ml-engineer", "audit", "--verify", "acc_trust_model")
    assert out.returncode == 1 and f"acc_trust_model@previous-production → version {oob.version}" in out.stdout
    out = cli(server, root, "safety-lead", "rollback", "acc_trust_model", "--reason", "late braking")
    assert out.returncode == 1 and "never rolled back to" in out.stderr, out.stderr
    assert production() == v3
    out = cli(server, root, "safety-lead", "audit", "--verify", "acc_trust_model", "--restore", "--reason", "moved by hand")
    assert out.returncode == 0, out.stderr
    assert str(client.get_model_version_by_alias("acc_trust_model", "previous-production").version) == v1
    assert cli(server, root, "ml-engineer", "audit", "--verify", "acc_trust_model").returncode == 0

    # -- 2. a legitimate rollback, then its run cleared by the requester: already done, nothing moves ---
    out = cli(server, root, "safety-lead", "rollback", "acc_trust_model", "--reason", "late braking on wet roads")
    assert out.returncode == 0 and f"production is version {v1} again" in out.stdout, out.stderr
    _, runs_ = server.api("GET", "/api/v2/dags/closedloop_registry/dagRuns?order_by=-run_after&limit=1")
    rb = runs_["dag_runs"][0]["dag_run_id"]
    status, _ = server.api("POST", "/api/v2/dags/closedloop_registry/clearTaskInstances", {
        "dry_run": False, "dag_run_id": rb, "task_ids": ["registry_action"], "only_failed": False,
        "reset_dag_runs": True}, user="ml-engineer")
    assert status == 200
    task = f"/api/v2/dags/closedloop_registry/dagRuns/{rb}/taskInstances/registry_action"
    server.wait_for(lambda: (lambda ti: ti.get("try_number", 1) >= 2 and ti.get("state") in ("success", "failed"))(
        server.api("GET", task)[1]), 300, "the cleared rollback to run again")
    assert server.api("GET", task)[1]["state"] == "success", refusal("closedloop_registry", rb, "registry_action")
    assert xcom(server, "closedloop_registry", rb, "registry_action")["already_done"] is True
    assert production() == v1
    trail = cli(server, root, "admin", "audit", "acc_trust_model", v1, "--json")
    events = [e["event"] for e in json.loads(trail.stdout)["events"]]
    assert events.count("alias.production.rollback") == 1 and "registry.replay" in events, events
    assert cli(server, root, "ml-engineer", "audit", "--verify", "acc_trust_model").returncode == 0

    # -- 4. markup in a record a page shows: a gate report logged by the requester, pointed to by a tag --
    exp = client.get_experiment_by_name("Default") or client.get_experiment(client.create_experiment("evil"))
    evil = client.create_run(exp.experiment_id).info.run_id
    markup = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    client.log_dict(evil, [{"metric": markup, "passed": True, "value": markup, "evidence": markup,
                            "incidents": [{"incident": markup, "collisions": markup, "episodes": markup}]}],
                    "gates/report.json")
    client.set_model_version_tag("acc_trust_model", v2, "closedloop.gate_run_id", evil)
    from tests.browser import Browser, chromium_path

    if chromium_path() is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    from urllib.parse import quote

    with Browser() as b:
        b.set_cookie(server.url, "_token", server.client("safety-deputy").token())
        b.goto(f"{server.url}/closedloop/review?dag_id=acc_trust&run_id={quote(run2, safe='')}")
        assert b.eval("document.getElementById('version').textContent") == v2
        assert b.eval("typeof window.__pwned") == "undefined"
        assert b.eval("document.querySelectorAll('#gates img, #gates script').length") == 0
        assert markup in b.eval("document.getElementById('gates').textContent")
        assert "<img src=x onerror=alert(1)>" in b.eval("document.getElementById('request').textContent")


def test_a_recall_holds_what_a_bad_source_touched_and_retrains_without_it(env):
    """A day of fleet-eu logs turns out bad: as the deployment's people would, through Airflow — an outsider
    may not open the recall; an approver does (twice: one recall); every version trained on that day is
    held across the pipelines, the watcher's check names held production versions, promotion and rollback
    through the registry DAG refuse them, acc_trust is retrained without the day as an update request the
    opener may not approve, its approval by the other approver moves production, and the recall is closed."""
    from datetime import UTC, datetime, timedelta

    server, root = env
    client = MlflowClient(server.env["MLFLOW_TRACKING_URI"])
    day = (datetime.now(UTC).date() - timedelta(days=2)).isoformat()  # inside every run's 5-day window
    recall_args = ("recall", "open", "--source", "fleet-eu", "--window", f"{day}..{day}",
                   "--reason", "clock drift in the EU loggers", "--json")

    out = cli(server, root, "intruder", *recall_args)
    assert out.returncode == 1 and "'intruder' may not open a recall touching" in out.stderr, out.stderr
    out = cli(server, root, "safety-lead", *recall_args)
    assert out.returncode == 0, out.stderr
    opened = json.loads(out.stdout)
    rid = opened["id"]
    held = {(r["model"], r["version"]) for r in opened["affected"]}
    assert opened["new"] and opened["opened_by"] == "safety-lead"
    prod = str(client.get_model_version_by_alias("acc_trust_model", "production").version)
    assert ("acc_trust_model", prod) in held and ("acc_gov_model", "1") in held
    assert {m for m, _ in held} >= {"acc_gov_model", "acc_rel_model", "acc_trust_model"}
    for mv in client.search_model_versions("name = 'acc_trust_model'"):  # every version it made: same days
        assert (("acc_trust_model", str(mv.version)) in held) == (gov.RECORD_TAG in mv.tags)  # not the one
        # registered out of band (no lineage), above
    proposal = next(p for p in opened["proposals"] if p["model"] == "acc_trust_model")
    assert proposal["held"] and proposal["target"] is None and "no approved version" in proposal["why"]
    retrains = {r["pipeline"]: r for r in opened["retrains"]}
    assert "recall.retrain is false" in retrains["acc_gov"]["why"]
    retrain_run = retrains["acc_trust"]["run_id"]
    assert retrain_run, retrains
    again = json.loads(cli(server, root, "safety-deputy", *recall_args).stdout)
    assert again["id"] == rid and not again["new"] and again["opened_by"] == "safety-lead"
    assert {r["pipeline"]: r["run_id"] for r in again["retrains"]}["acc_trust"] == retrain_run  # not twice

    # -- held versions: the watcher alerts on them; promote and rollback through Airflow refuse them ----
    out = cli(server, root, "ml-engineer", "audit", "--verify", "acc_trust_model")
    assert out.returncode == 1 and f"which recall {rid} holds" in out.stdout, out.stdout

    def held_alerts():
        lines = (server.root / "closedloop" / "alerts.jsonl").read_text().splitlines()
        return [a for a in map(json.loads, lines) if a["kind"] == "recall_hold"
                and f"acc_trust_model@production → version {prod}, which recall {rid} holds" in a["message"]]
    server.wait_for(held_alerts, 180, "the alias watcher to alert on the held production version")
    prev = str(client.get_model_version_by_alias("acc_trust_model", "previous-production").version)
    out = cli(server, root, "safety-lead", "rollback", "acc_trust_model", "--reason", "recall")
    assert out.returncode == 1 and f"refusing to roll back to acc_trust_model version {prev}: it is held by recall " \
        f"{rid}" in out.stderr, out.stderr
    out = cli(server, root, "safety-lead", "promote", "acc_trust_model", prev)
    assert out.returncode == 1 and f"held by recall {rid}" in out.stderr, out.stderr
    assert str(client.get_model_version_by_alias("acc_trust_model", "production").version) == prod
    shown = cli(server, root, "fleet-monitor", "recall", "show", rid)
    assert shown.returncode == 0 and f"recall {rid} (source fleet-eu {day}..{day}): open" in shown.stdout
    assert "acc_trust_model: production" in shown.stdout and "waiting: acc_trust_model" in shown.stdout

    # -- the retrain: the recalled day out of its data, requested for the opener, who may not approve it ------
    server.wait_for(lambda: states(server, "acc_trust", retrain_run).get("approval") == "awaiting_input", 900,
                    "the recall's retrain to wait for review")
    data = xcom(server, "acc_trust", retrain_run, "generate_dataset")
    assert data["excluded"] and data["excluded"][0]["source"] == "fleet-eu" and data["excluded"][0]["rows"] > 0
    _, run = server.api("GET", f"/api/v2/dags/acc_trust/dagRuns/{retrain_run}")
    assert run["conf"]["ticket"] == rid and rid in run["conf"]["purpose"]
    _, hitl = server.api("GET", hitl_path("acc_trust", retrain_run))
    assert [u["id"] for u in hitl["assigned_users"]] == ["safety-deputy"], hitl["assigned_users"]
    assert cli(server, root, "safety-deputy", "approve", "acc_trust", retrain_run).returncode == 0
    server.wait_for(lambda: states(server, "acc_trust", retrain_run).get("promote") in ("success", "failed"), 600,
                    "the retrain's promotion")
    new = xcom(server, "acc_trust", retrain_run, "register_candidate")["version"]
    assert states(server, "acc_trust", retrain_run)["promote"] == "success"
    assert str(client.get_model_version_by_alias("acc_trust_model", "production").version) == new
    assert ("acc_trust_model", new) not in held
    # the production move ran the recall DAG (asset event): the recall stays open, other models are held
    server.wait_for(lambda: any(r["run_type"] == "asset_triggered" and r["state"] == "success" for r in server.api(
        "GET", "/api/v2/dags/closedloop_recall/dagRuns?limit=50")[1]["dag_runs"]), 300, "the recall sweep")
    out = json.loads(cli(server, root, "admin", "recall", "show", rid, "--json").stdout)
    assert out["state"] == "open" and not any("acc_trust_model" in w for w in out["waiting"]), out["waiting"]
    out = cli(server, root, "safety-lead", "recall", "close", rid)
    assert out.returncode == 1 and "is not done" in out.stderr and "acc_gov_model" in out.stderr, out.stderr
    out = cli(server, root, "safety-lead", "recall", "close", rid, "--reason", "the other test models are retired")
    assert out.returncode == 0 and "closed by safety-lead" in out.stdout, out.stderr
    listed = cli(server, root, "fleet-monitor", "recall", "list", "--json")
    (entry,) = [r for r in json.loads(listed.stdout) if r["id"] == rid]
    assert entry["state"] == "closed" and entry["close_reason"] == "the other test models are retired"
    trace = json.loads(cli(server, root, "admin", "trace", f"acc_trust_model/{new}", "--json").stdout)
    assert trace["airflow_run"]["started_by"].get("retrain_for") == rid


def test_a_cleared_promote_after_its_approval_expired_is_refused(env):
    """Replay: A's promote cleared by the requester after its approval expired — refused, production unchanged."""
    server, root = env
    client = MlflowClient(server.env["MLFLOW_TRACKING_URI"])
    run_a, va, approved_at = EXPIRED["run_a"], EXPIRED["va"], EXPIRED["approved_at"]

    def refusal(dag_id, run_id, task="promote") -> str:
        _, entry = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/error")
        return (xcom_value(entry) or {}).get("message", "")

    time.sleep(max(0.0, VALID_SECONDS + 5 - (time.monotonic() - approved_at)))
    status, body = server.api("POST", "/api/v2/dags/acc_gov/clearTaskInstances", {
        "dry_run": False, "dag_run_id": run_a, "task_ids": ["promote"], "only_failed": False,
        "reset_dag_runs": True}, user="ml-engineer")
    assert status == 200, (status, body)
    server.wait_for(lambda: states(server, "acc_gov", run_a)["promote"] in ("success", "failed"), 600,
                    "the cleared promote to run again")
    assert states(server, "acc_gov", run_a)["promote"] == "failed"
    assert "approvals are valid for 0.05 h" in refusal("acc_gov", run_a)
    assert str(client.get_model_version_by_alias("acc_gov_model", "production").version) == va


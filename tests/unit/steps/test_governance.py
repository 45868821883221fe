"""Promotion rules (pure), alias moves, seals and the audit trail on a real MLflow store, requests."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest
from mlflow import MlflowClient

from closedloop.errors import ApprovalError
from closedloop.records.audit import audit_trail
from closedloop.runtime.context import RunContext
from closedloop.runtime.signing import Signer, digest
from closedloop.spec import GateSpec
from closedloop.spec.request import validate_request
from closedloop.steps import governance as gov
from closedloop.steps.gates import evaluate

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
POLICY = gov.ApprovalPolicy(approvers=["bob", "carol", "dave"], required=1, valid_hours=24)
RECORD = {"kind": "release_record", "model": "m", "version": "2", "gates_passed": True, "dag_id": "p",
          "run_id": "r2", "requester_user": "alice", "source": "s", "artifact_digest": "sha256:x"}


def approval(record=RECORD, **change) -> dict:
    st = {"kind": "approval", "model": record["model"], "version": record["version"], "record_digest": digest(record),
          "decision": "approved", "chosen_options": ["Approve"], "responder": "bob",
          "responded_at": (NOW - timedelta(hours=1)).isoformat(), "production_at_review": "1"}
    return {**st, **change}


def test_valid_evidence_passes():
    assert gov.verify_release(RECORD, [approval()], model="m", policy=POLICY, production_now="1", now=NOW,
                              run=("p", "r2")) == ["bob"]


@pytest.mark.parametrize(("record", "statements", "kw", "reason"), [
    ({**RECORD, "model": "other"}, None, {}, "the release record is for model 'other', not 'm'"),
    (RECORD, None, {"run": ("p", "r9")}, "belongs to another run than p/r9"),
    ({**RECORD, "gates_passed": False}, None, {}, "release gates did not pass"),
    (RECORD, [], {}, "no review decision"),
    (RECORD, [approval({**RECORD, "version": "3"})], {}, "given for another release record (m version 3)"),
    (RECORD, [approval(decision="rejected", chosen_options=["Reject"])], {}, "decision was 'rejected'"),
    (RECORD, [approval(responder=None, decision="approved")], {}, "timeout default, not a person"),
    (RECORD, [approval(responder="mallory")], {}, "'mallory' is not an approver"),
    ({**RECORD, "requester_user": "bob"}, None, {}, "'bob' requested this update (or posted its incident)"),
    ({**RECORD, "requester_user": None, "excluded_reviewers": ["bob"]}, None, {},  # bob posted the incident
     "'bob' requested this update (or posted its incident) and cannot approve it"),
    (RECORD, [approval(responded_at=(NOW - timedelta(hours=30)).isoformat())], {}, "30.0 h old"),
    (RECORD, None, {"production_now": "5"}, "production moved since the review opened (was 1, is 5)"),
    (RECORD, [approval(), approval()], {}, "'bob' approved twice"),
    (RECORD, None, {"policy": dataclasses.replace(POLICY, required=2)}, "1 approval(s) (bob), 2 required"),
])
def test_each_missing_proof_is_refused_with_its_reason(record, statements, kw, reason):
    args = {"model": "m", "policy": POLICY, "production_now": "1", "now": NOW, "run": ("p", "r2"), **kw}
    with pytest.raises(ApprovalError, match="refusing to promote m version") as info:
        gov.verify_release(record, statements if statements is not None else [approval(record)], **args)
    assert reason in str(info.value)


def test_two_distinct_approvals_meet_a_quorum_of_two():
    two = dataclasses.replace(POLICY, required=2)
    assert gov.verify_release(RECORD, [approval(), approval(responder="carol")], model="m", policy=two,
                              production_now="1", now=NOW) == ["bob", "carol"]


def test_the_promoted_version_itself_counts_as_unmoved_production():
    """A repeat of the same promotion (production already on the version) is not 'production moved'."""
    gov.verify_release(RECORD, [approval()], model="m", policy=POLICY, production_now="2", now=NOW)


@pytest.fixture
def registry(tmp_path):
    """Three real versions of a model (each with its own files) in a fresh MLflow store (SQLite in a temp dir)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    c.create_registered_model("m")
    exp = c.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    versions = []
    for i in range(3):
        run = c.create_run(exp)
        model_dir = tmp_path / f"model{i}"
        model_dir.mkdir()
        (model_dir / "weights.txt").write_text(f"weights {i}")
        c.log_artifacts(run.info.run_id, str(model_dir), "model")
        versions.append(c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id))
    ctx = RunContext(pipeline="p", template_digest="", dag_id="p", run_id="r", tracking_uri=uri)
    return ctx, c, versions


def record_for(ctx, mv, run_id: str, key: Signer) -> dict:
    from closedloop.steps.registry import artifact_digest

    rec = {**RECORD, "version": str(mv.version), "run_id": run_id, "source": mv.source,
           "model_uri": f"models:/m/{mv.version}", "artifact_digest": artifact_digest(f"models:/m/{mv.version}", ctx.tracking_uri)}
    return rec


def test_promote_moves_aliases_seals_the_move_and_rollback_restores(registry):
    ctx, c, versions = registry
    key = Signer.generate()
    r1 = record_for(ctx, versions[0], "r1", key)
    first = gov.promote(ctx, r1, [approval(r1, production_at_review=None)], model="m", policy=POLICY, signer=key,
                        actor="t", now=NOW)
    assert first["changed"] and first["previous"] is None and first["approved_by"] == ["bob"]
    r2 = record_for(ctx, versions[1], "r2", key)
    second = gov.promote(ctx, r2, [approval(r2)], model="m", policy=POLICY, signer=key, actor="t", now=NOW)
    assert second["changed"] and second["previous"] == "1"
    again = gov.promote(ctx, r2, [approval(r2)], model="m", policy=POLICY, signer=key, actor="t", now=NOW)
    assert again["changed"] is False
    assert str(c.get_model_version_by_alias("m", "production").version) == "2"
    assert str(c.get_model_version_by_alias("m", "previous-production").version) == "1"
    last = gov.last_promotion(c, "m", key.verifier)
    assert (last["version"], last["seq"], last["approved_by"]) == ("2", 2, ["bob"])
    assert gov.check_aliases(c, "m", key.verifier)["ok"]
    events = [e["event"] for e in audit_trail(ctx, "m", "2")["events"]]
    assert events == ["alias.production"]  # the idempotent repeat recorded nothing

    with pytest.raises(ApprovalError, match="'mallory' may not roll back m"):
        gov.rollback(ctx, "m", actor="mallory", reason="bad", allowed=["bob"], signer=key)
    with pytest.raises(ApprovalError, match="needs a reason"):
        gov.rollback(ctx, "m", actor="bob", reason=" ", allowed=["bob"], signer=key)
    # previous-production moved directly in MLflow (to an ungated version): noticed, and never rolled back to
    c.set_registered_model_alias("m", "previous-production", versions[2].version)
    problems = gov.check_aliases(c, "m", key.verifier)["problems"]
    assert any("m@previous-production → version 3, but the last sealed promotion" in p for p in problems), problems
    with pytest.raises(ApprovalError, match="an alias moved outside the pipeline is never rolled back to"):
        gov.rollback(ctx, "m", actor="bob", reason="wet roads", allowed=["bob"], signer=key)
    assert str(c.get_model_version_by_alias("m", "production").version) == "2"
    c.set_registered_model_alias("m", "previous-production", "1")
    # a request names its move: from the production it saw, to the previous-production it saw
    with pytest.raises(ApprovalError, match="but production is 2 now"):
        gov.rollback(ctx, "m", actor="bob", reason="wet roads", allowed=["bob"], signer=key,
                     move=gov.move_of("m", "1", "2", "registry/r0"))
    move = gov.move_of("m", "2", "1", "closedloop_registry/manual__2026-12-07T03:36:46.981479+00:00")
    assert gov.done_move(ctx, move, actor="bob", verifier=key.verifier) is None  # not made yet
    out = gov.rollback(ctx, "m", actor="bob", reason="brakes late on wet roads", allowed=["bob"], signer=key,
                       move=move)
    assert out == {"model": "m", "production": "1", "previous-production": "2", "changed": True}
    assert gov.check_aliases(c, "m", key.verifier)["ok"]  # a rollback is a sealed move too
    trail = audit_trail(ctx, "m", "1")
    assert trail["events"][-1]["event"] == "alias.production.rollback"
    assert trail["events"][-1]["by"] == "bob" and trail["events"][-1]["reason"] == "brakes late on wet roads"
    # the same request again (its run cleared): already done, nothing changes, the replay is audited
    again = gov.done_move(ctx, move, actor="bob", verifier=key.verifier)
    assert again["already_done"] and again["changed"] is False and again["production"] == "1"
    assert [e["event"] for e in audit_trail(ctx, "m", "1")["events"]].count("alias.production.rollback") == 1
    assert audit_trail(ctx, "m", "1")["events"][-1]["event"] == "registry.replay"
    # a rollback whose try sealed the move and died before the aliases moved: its retry finishes that move
    died = gov.move_of("m", "1", "2", "closedloop_registry/manual__died")
    gov._record_promotion(c, key, "m", "2", previous="1", kind="rollback", by="bob", reason="x", rollback=True,
                          nonce=died.nonce)  # the record only, as the dead try left it
    assert gov.done_move(ctx, died, actor="bob", verifier=key.verifier) is None  # not done: to be finished
    out = gov.rollback(ctx, "m", actor="bob", reason="x", allowed=["bob"], signer=key, move=died)
    assert (out["production"], out["previous-production"]) == ("2", "1")
    assert gov.check_aliases(c, "m", key.verifier)["ok"]
    assert gov.done_move(ctx, died, actor="bob", verifier=key.verifier)["already_done"]
    gov.rollback(ctx, "m", actor="bob", reason="back", allowed=["bob"], signer=key,
                 move=gov.move_of("m", "2", "1", "closedloop_registry/manual__r3"))
    # ... and once production moved on, the old request is refused, never performed again
    gov.rollback(ctx, "m", actor="bob", reason="back again", allowed=["bob"], signer=key,
                 move=gov.move_of("m", "1", "2", "closedloop_registry/manual__r2"))
    with pytest.raises(ApprovalError, match="refusing to replay m production 2 → 1"):
        gov.done_move(ctx, move, actor="bob", verifier=key.verifier)
    assert str(c.get_model_version_by_alias("m", "production").version) == "2"


PROMOTE_TRY = """
import base64, json, sys
from dataclasses import replace
from datetime import datetime
from closedloop.steps import governance as gov
from closedloop.runtime.context import RunContext
from closedloop.runtime.signing import Signer
args = json.loads(sys.argv[1])
policy = gov.ApprovalPolicy(**args["policy"])
ctx = RunContext(**args["ctx"])
gov.promote(ctx, args["record"], args["statements"], model="m", policy=policy,
            signer=Signer(base64.b64decode(args["seed"])), actor="t", now=datetime.fromisoformat(args["now"]))
"""


@pytest.mark.parametrize("fault", ["transient", "kill"])
@pytest.mark.parametrize("point", [p for p, _ in __import__("closedloop.runtime.faults", fromlist=["matrix"])
                                   .matrix()["promote"] if p != "end"])
def test_promote_crashing_at_each_point_finishes_on_retry_with_one_record_and_its_audit(registry, tmp_path,
                                                                                      monkeypatch, point, fault):
    """A connection error, or a SIGKILL of the promoting process, at every point between promote's
    side effects (record sealed, previous moved, production moved), then the retry: the registry ends
    exactly as an undisturbed promotion leaves it — aliases, one sealed record more, one audit entry
    per move, none missing."""
    import os
    import signal
    import subprocess
    import sys
    from dataclasses import replace

    ctx, c, versions = registry
    key = Signer.generate()
    r1, r2 = record_for(ctx, versions[0], "r1", key), record_for(ctx, versions[1], "r2", key)
    gov.promote(ctx, r1, [approval(r1, production_at_review=None)], model="m", policy=POLICY, signer=key,
                actor="t", now=NOW)
    drills = tmp_path / "faults.json"
    drills.write_text(json.dumps([{"task": "promote", "point": point, "fault": fault, "tries": [1]}]))
    monkeypatch.setenv("CLOSEDLOOP_FAULTS", str(drills))
    first_try, retry = replace(ctx, task_id="promote", try_number=1), replace(ctx, task_id="promote", try_number=2)
    if fault == "transient":
        with pytest.raises(ConnectionResetError, match=point):
            gov.promote(first_try, r2, [approval(r2)], model="m", policy=POLICY, signer=key, actor="t", now=NOW)
    else:  # the promoting process dies on the spot (its own SIGKILL), as a lost worker would
        args = {"policy": dataclasses.asdict(POLICY), "ctx": dataclasses.asdict(first_try), "record": r2,
                "statements": [approval(r2)], "seed": key.seed_b64(), "now": NOW.isoformat()}
        died = subprocess.run([sys.executable, "-c", PROMOTE_TRY, json.dumps(args)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "CLOSEDLOOP_FAULTS": str(drills)})
        assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    out = gov.promote(retry, r2, [approval(r2)], model="m", policy=POLICY, signer=key, actor="t", now=NOW)
    assert out["version"] == "2" and out["changed"] is (point != "production_moved")
    assert str(c.get_model_version_by_alias("m", "production").version) == "2"
    assert str(c.get_model_version_by_alias("m", "previous-production").version) == "1"
    last = gov.last_promotion(c, "m", key.verifier)
    assert (last["version"], last["previous"], last["seq"]) == ("2", "1", 2)  # one record for this move
    assert gov.check_aliases(c, "m", key.verifier)["ok"]
    assert [e["event"] for e in audit_trail(ctx, "m", "2")["events"]] == ["alias.production"]
    assert [e["event"] for e in audit_trail(ctx, "m", "1")["events"]] == ["alias.production",
                                                                          "alias.previous-production"]


def test_promote_refuses_a_version_whose_files_or_source_changed(registry, tmp_path):
    ctx, c, versions = registry
    key = Signer.generate()
    r1 = record_for(ctx, versions[0], "r1", key)
    # the files behind the version are replaced after judging (artifact store writable in the embedded default)
    run_id = versions[0].run_id
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "weights.txt").write_text("ungated weights")
    c.log_artifacts(run_id, str(evil), "model")
    with pytest.raises(ApprovalError, match="its files changed since it was judged"):
        gov.promote(ctx, r1, [approval(r1, production_at_review=None)], model="m", policy=POLICY, signer=key,
                    actor="t", now=NOW)
    # a record copied from version 1 onto version 2's evidence: the source differs
    r_copy = {**r1, "version": "2"}
    with pytest.raises(ApprovalError, match="it now loads"):
        gov.promote(ctx, r_copy, [approval(r_copy, production_at_review=None)], model="m", policy=POLICY,
                    signer=key, actor="t", now=NOW)
    assert c.get_registered_model("m").aliases == {}


def test_check_aliases_names_direct_moves_and_replayed_records_and_restore_fixes_them(registry):
    ctx, c, versions = registry
    key = Signer.generate()
    assert gov.check_aliases(c, "m", key.verifier)["ok"]  # nothing promoted, nothing to explain
    r1 = record_for(ctx, versions[0], "r1", key)
    gov.promote(ctx, r1, [approval(r1, production_at_review=None)], model="m", policy=POLICY, signer=key, actor="t", now=NOW)
    old_record = c.get_registered_model("m").tags[gov.PROMOTION_TAG]
    r2 = record_for(ctx, versions[1], "r2", key)
    gov.promote(ctx, r2, [approval(r2)], model="m", policy=POLICY, signer=key, actor="t", now=NOW)

    c.set_registered_model_alias("m", "production", "3")  # a person moves production directly
    state = gov.check_aliases(c, "m", key.verifier)
    assert not state["ok"]
    assert "m@production → version 3, but the last sealed promotion (promotion by t" in state["problems"][0]
    assert "put version 2 there" in state["problems"][0]

    # put back the older sealed record and point production at its version: the audit trail has a newer one
    c.set_registered_model_tag("m", gov.PROMOTION_TAG, old_record)
    c.set_registered_model_alias("m", "production", "1")
    problems = gov.check_aliases(c, "m", key.verifier)["problems"]
    assert any("is older than one in the audit trail (seq 2, version 2)" in p for p in problems)

    forged = json.loads(old_record)
    forged["version"] = "3"
    c.set_registered_model_tag("m", gov.PROMOTION_TAG, json.dumps(forged))
    assert any("does not match the content" in p for p in gov.check_aliases(c, "m", key.verifier)["problems"])

    c.set_registered_model_alias("m", "candidate", "3")  # version 3 has no release record
    assert any("m@candidate → version 3, which has no sealed release record" in p
               for p in gov.check_aliases(c, "m", key.verifier)["problems"])

    c.set_registered_model_tag("m", gov.PROMOTION_TAG, json.dumps(key.seal(
        {"kind": "promotion", "model": "m", "version": "2", "seq": 2, "at": "x", "by": "t"},
        gov._promotion_binding("m"))))
    with pytest.raises(ApprovalError, match="'mallory' may not restore m"):
        gov.restore(ctx, "m", actor="mallory", reason="r", allowed=["bob"], signer=key)
    out = gov.restore(ctx, "m", actor="bob", reason="moved by hand", allowed=["bob"], signer=key)
    assert out["production"] == "2" and out["was"] == "1" and out["changed"]
    assert str(c.get_model_version_by_alias("m", "production").version) == "2"


def test_a_request_nobody_else_can_approve_is_refused(project):
    from closedloop.spec import load_spec

    two = load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml").spec  # the two-person rule
    spec = two.model_copy(update={"approval": two.approval.model_copy(update={"required": 1})})
    gov.check_reviewers(spec, "ml-engineer")  # not an approver: both approvers remain
    gov.check_reviewers(spec, "safety-lead")  # an approver: the other one remains
    gov.check_reviewers(two, "ml-engineer")  # both approvers remain for the two approvals
    with pytest.raises(ApprovalError, match="needs 2 approval\\(s\\) from approvers other than the requester"):
        gov.check_reviewers(two, "safety-lead")
    with pytest.raises(ApprovalError, match="'safety-deputy', 'safety-lead' before any compute"):
        gov.check_reviewers(spec, ["safety-deputy", "safety-lead"])  # e.g. the requester and an incident's poster


def test_regression_gate_against_production():
    gates = [GateSpec(metric="offline.rmse", max_regression=0.01),
             GateSpec(metric="sim.min_ttc_s", max_regression=0.1, higher_is_better=True)]
    worse = evaluate(gates, {"offline.rmse": 0.25, "sim.min_ttc_s": 1.2}, {"offline.rmse": 0.2, "sim.min_ttc_s": 1.5})
    assert [r["passed"] for r in worse] == [False, False]
    assert "0.05 worse than production (0.2), tolerance 0.01" in worse[0]["reason"]
    fine = evaluate(gates, {"offline.rmse": 0.205, "sim.min_ttc_s": 1.45}, {"offline.rmse": 0.2, "sim.min_ttc_s": 1.5})
    assert [r["passed"] for r in fine] == [True, True]
    first = evaluate(gates, {"offline.rmse": 0.9, "sim.min_ttc_s": 0.1}, None)  # no production yet
    assert [r["passed"] for r in first] == [True, True]


@pytest.mark.parametrize(("request_", "fragment"), [
    ({"change": ["data"], "expected_impact": "better"}, "purpose: required"),
    ({"purpose": "short", "change": ["data"], "expected_impact": "better"}, "purpose: 5 characters, at least 10"),
    ({"purpose": "x" * 2001, "change": ["data"], "expected_impact": "better"}, "purpose: 2001 characters, at most 2000"),
    ({"purpose": "a valid purpose", "change": ["vibes"], "expected_impact": "better"}, "change: expected one or more of"),
    ({"purpose": "a valid purpose", "change": ["data"], "expected_impact": "better", "owner": "x"}, "unknown field(s) ['owner']"),
    ({"purpose": "a valid purpose", "change": ["data"], "expected_impact": "better", "ticket": "T" * 201},
     "ticket: 201 characters, at most 200"),
])
def test_malformed_requests(request_, fragment):
    with pytest.raises(ValueError) as info:
        validate_request(request_)
    assert fragment in str(info.value)


def test_request_schema_matches_what_airflow_validates(project):
    """The CLI's check and the DAG params are one schema: Airflow refuses what the CLI refuses."""
    from airflow.sdk.definitions.param import ParamValidationError

    from closedloop.spec import load_spec
    from closedloop.spec.request import dag_params

    params = dag_params(load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml").spec)
    with pytest.raises(ParamValidationError):
        params["purpose"].resolve("short")
    with pytest.raises(ParamValidationError):
        params["change"].resolve(["vibes"])
    with pytest.raises(ParamValidationError):
        params["ticket"].resolve("T" * 201)
    assert params["change"].resolve(["data", "label_policy"]) == ["data", "label_policy"]

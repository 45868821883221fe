"""Promotion rules (pure), alias moves and the audit trail on a real MLflow store, requests."""

from __future__ import annotations

import dataclasses

import pytest
from mlflow import MlflowClient

from closedloop.errors import ApprovalError
from closedloop.request import validate_request
from closedloop.spec import GateSpec
from closedloop.steps.context import RunContext
from closedloop.steps.gates import evaluate
from closedloop.steps.governance import PromotionEvidence, audit_trail, promote, rollback, verify_promotion

GOOD = PromotionEvidence(model="m", version="2", dag_id="p", run_id="r2", run_found=True, requester="alice",
                         registered_version="2", gate_passed=True, hitl_received=True, chosen_options=["Approve"],
                         responded_by="bob", approvers=["bob", "carol"])


def test_valid_evidence_passes():
    verify_promotion(GOOD)


@pytest.mark.parametrize(("change", "reason"), [
    ({"run_found": False}, "Airflow has no such run"),
    ({"registered_version": "1"}, "that run registered version 1, not 2"),
    ({"registered_version": None}, "registered version none"),
    ({"gate_passed": False}, "release gates did not pass"),
    ({"gate_passed": None}, "release gates did not pass"),
    ({"hitl_received": False, "chosen_options": [], "responded_by": None}, "no review decision"),
    ({"chosen_options": ["Reject"]}, "decision was ['Reject']"),
    ({"responded_by": None}, "timeout default, not a person"),
    ({"responded_by": "mallory"}, "'mallory' is not an approver"),
    ({"requester": "bob"}, "'bob' requested this update and cannot approve it"),
])
def test_each_missing_proof_is_refused_with_its_reason(change, reason):
    with pytest.raises(ApprovalError, match="refusing to promote m version 2") as info:
        verify_promotion(dataclasses.replace(GOOD, **change))
    assert reason in str(info.value)


@pytest.fixture
def registry(tmp_path):
    """Three real versions of a model in a fresh MLflow store (SQLite in a temp dir)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    c.create_registered_model("m")
    exp = c.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    for _ in range(3):
        run = c.create_run(exp)
        c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    return RunContext(pipeline="p", template_digest="", dag_id="p", run_id="r", tracking_uri=uri), c


def test_promote_moves_aliases_idempotently_and_rollback_restores(registry):
    ctx, c = registry
    first = promote(ctx, dataclasses.replace(GOOD, version="1", registered_version="1", run_id="r1"), actor="t")
    assert first == {"model": "m", "version": "1", "changed": True, "previous": None}
    second = promote(ctx, GOOD, actor="t")
    assert second["changed"] and second["previous"] == "1"
    again = promote(ctx, GOOD, actor="t")
    assert again["changed"] is False
    assert str(c.get_model_version_by_alias("m", "production").version) == "2"
    assert str(c.get_model_version_by_alias("m", "previous-production").version) == "1"
    events = [e["event"] for e in audit_trail(ctx, "m", "2")["events"]]
    assert events == ["alias.production"]  # the idempotent repeat recorded nothing

    out = rollback(ctx, "m", actor="ops")
    assert out == {"model": "m", "production": "1", "previous-production": "2"}
    assert str(c.get_model_version_by_alias("m", "production").version) == "1"
    trail = audit_trail(ctx, "m", "1")
    assert [e["event"] for e in trail["events"]] == ["alias.production", "alias.previous-production",
                                                     "alias.production"]
    assert trail["events"][-1]["rollback"] is True and trail["events"][-1]["by"] == "ops"


def test_refused_promotion_changes_nothing(registry):
    ctx, c = registry
    with pytest.raises(ApprovalError):
        promote(ctx, dataclasses.replace(GOOD, chosen_options=["Reject"]), actor="t")
    assert c.get_registered_model("m").aliases == {}


def test_rollback_without_previous_is_refused(registry):
    ctx, _ = registry
    with pytest.raises(ApprovalError, match="no 'previous-production' version"):
        rollback(ctx, "m", actor="ops")


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

    from closedloop.request import dag_params
    from closedloop.spec import load_spec

    params = dag_params(load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml").spec)
    with pytest.raises(ParamValidationError):
        params["purpose"].resolve("short")
    with pytest.raises(ParamValidationError):
        params["change"].resolve(["vibes"])
    with pytest.raises(ParamValidationError):
        params["ticket"].resolve("T" * 201)
    assert params["change"].resolve(["data", "label_policy"]) == ["data", "label_policy"]

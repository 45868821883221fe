"""Governance in the registry: review decisions, guarded promotion, rollback, audit trail.

Airflow is the source of truth for *who decided what for which run*; MLflow tags mirror it for
readers, but promotion never trusts them. :func:`verify_promotion` takes the evidence read
from Airflow (the run, what it registered, its gate result, the human-in-the-loop response)
and refuses unless this exact version passed its gates and was approved, for this run, by an
assigned reviewer who is not the requester.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from closedloop.errors import ApprovalError
from closedloop.steps import tracking
from closedloop.steps.context import RunContext

PRODUCTION = "production"
PREVIOUS = "previous-production"
CANDIDATE = "candidate"
AUDIT_PREFIX = "closedloop.audit."
APPROVE, REJECT = "Approve", "Reject"


@dataclass(frozen=True)
class PromotionEvidence:
    """What Airflow recorded about the run that produced a model version."""

    model: str
    version: str
    dag_id: str
    run_id: str
    run_found: bool
    requester: str | None
    registered_version: str | None  # the version this run's register_candidate recorded
    gate_passed: bool | None  # from this run's release_gate result
    hitl_received: bool
    chosen_options: list[str] = field(default_factory=list)
    responded_by: str | None = None
    responded_at: str | None = None
    comment: str = ""
    approvers: list[str] = field(default_factory=list)


def verify_promotion(ev: PromotionEvidence) -> None:
    """Raise :class:`ApprovalError` with the reason unless ``ev`` proves an approved, gated version."""
    where = f"{ev.model} version {ev.version} (Airflow run {ev.dag_id}/{ev.run_id})"
    if not ev.run_found:
        raise ApprovalError(f"refusing to promote {where}: Airflow has no such run")
    if ev.registered_version != str(ev.version):
        raise ApprovalError(
            f"refusing to promote {where}: that run registered version {ev.registered_version or 'none'}, "
            f"not {ev.version}; an approval is bound to the version its own run registered")
    if ev.gate_passed is not True:
        raise ApprovalError(f"refusing to promote {where}: its release gates did not pass in that run")
    if not ev.hitl_received:
        raise ApprovalError(f"refusing to promote {where}: Airflow has no review decision for that run")
    if ev.chosen_options != [APPROVE]:
        raise ApprovalError(f"refusing to promote {where}: the review decision was {ev.chosen_options or 'none'}")
    if not ev.responded_by:
        raise ApprovalError(f"refusing to promote {where}: the decision was the timeout default, not a person")
    if ev.responded_by not in ev.approvers:
        raise ApprovalError(f"refusing to promote {where}: {ev.responded_by!r} is not an approver "
                            f"({', '.join(ev.approvers)})")
    if ev.requester and ev.responded_by == ev.requester:
        raise ApprovalError(f"refusing to promote {where}: {ev.responded_by!r} requested this update "
                            "and cannot approve it")


def _audit(client, model: str, version: str, event: str, **details) -> None:
    now = datetime.now(UTC)
    key = f"{AUDIT_PREFIX}{now.strftime('%Y%m%dT%H%M%S.%f')}.{event}"
    client.set_model_version_tag(model, version, key, json.dumps({"event": event, "at": now.isoformat(), **details},
                                                                  sort_keys=True))


def record_decision(ctx: RunContext, model: str, version: str, *, decision: str, reviewer: str | None,
                    at: str, comment: str, run_id: str) -> None:
    """Mirror Airflow's review decision on the model version (tags and audit event)."""
    c = tracking.client(ctx)
    for key, value in {"closedloop.review.decision": decision, "closedloop.review.reviewer": reviewer or "",
                       "closedloop.review.at": at, "closedloop.review.comment": comment,
                       "closedloop.review.run_id": run_id}.items():
        c.set_model_version_tag(model, version, key, value)
    _audit(c, model, version, f"review.{decision}", reviewer=reviewer, comment=comment, run_id=run_id)


def _alias_version(client, model: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except Exception as exc:  # no such alias
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
            return None
        raise


def promote(ctx: RunContext, ev: PromotionEvidence, *, actor: str) -> dict:
    """Verify, then point ``production`` at the version and keep the old one as ``previous-production``.

    Idempotent: promoting the version that is already ``production`` changes nothing.
    """
    verify_promotion(ev)
    c = tracking.client(ctx)
    current = _alias_version(c, ev.model, PRODUCTION)
    if current == str(ev.version):
        return {"model": ev.model, "version": str(ev.version), "changed": False, "previous": _alias_version(
            c, ev.model, PREVIOUS)}
    if current is not None:
        c.set_registered_model_alias(ev.model, PREVIOUS, current)
        _audit(c, ev.model, current, "alias.previous-production", by=actor, replaced_by=str(ev.version))
    c.set_registered_model_alias(ev.model, PRODUCTION, str(ev.version))
    _audit(c, ev.model, str(ev.version), "alias.production", by=actor, previous=current,
           approved_by=ev.responded_by, run_id=ev.run_id)
    return {"model": ev.model, "version": str(ev.version), "changed": True, "previous": current}


def rollback(ctx: RunContext, model: str, *, actor: str) -> dict:
    """Swap ``production`` and ``previous-production`` (the previous version was approved once)."""
    c = tracking.client(ctx)
    previous = _alias_version(c, model, PREVIOUS)
    current = _alias_version(c, model, PRODUCTION)
    if previous is None:
        raise ApprovalError(f"cannot roll back {model}: it has no {PREVIOUS!r} version")
    c.set_registered_model_alias(model, PRODUCTION, previous)
    _audit(c, model, previous, "alias.production", by=actor, previous=current, rollback=True)
    if current is not None:
        c.set_registered_model_alias(model, PREVIOUS, current)
        _audit(c, model, current, "alias.previous-production", by=actor, replaced_by=previous, rollback=True)
    return {"model": model, "production": previous, "previous-production": current}


def audit_trail(ctx: RunContext, model: str, version: str) -> dict:
    """The request, gate report, review decision and alias changes of one version, in order."""
    c = tracking.client(ctx)
    mv = c.get_model_version(model, version)
    tags = mv.tags
    request = {k.removeprefix("closedloop.request."): v for k, v in tags.items() if k.startswith("closedloop.request.")}
    gates = None
    if tags.get("closedloop.gate_run_id"):
        import mlflow

        gates = mlflow.artifacts.load_dict(f"runs:/{tags['closedloop.gate_run_id']}/gates/report.json")
    events = sorted((json.loads(v) for k, v in tags.items() if k.startswith(AUDIT_PREFIX)), key=lambda e: e["at"])
    review = {k.removeprefix("closedloop.review."): v for k, v in tags.items() if k.startswith("closedloop.review.")}
    return {"model": model, "version": str(version), "aliases": list(mv.aliases),
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(),
            "run": {"dag_id": tags.get("airflow.dag_id"), "run_id": tags.get("airflow.run_id")},
            "request": request, "gates": gates, "gates_verdict": tags.get("closedloop.gates"),
            "review": review, "events": events}


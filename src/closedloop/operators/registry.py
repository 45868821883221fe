"""The registry's governed actions, run by the deployment on a person's behalf.

``closedloop_registry`` (one DAG for every governed model) promotes an approved version,
rolls ``production`` back or restores it after a direct move. A person asks through Airflow
(REST API, UI, ``closedloop promote|rollback|audit --restore``), with their own credentials; the
run records who (``triggering_user_name``); the task acts with the deployment's MLflow identity
and signing key, after the same checks the pipeline's own ``promote`` makes. One run at a time.

Each run names its exact move (model, ``from_version`` → ``version``/``to_version``) and is its own
nonce: the sealed promotion record carries the run's id, so a cleared or retried run finds its move
made and changes nothing (audited as a replay), finishes it if a try died between record and alias,
and refuses when production has moved on since — never a second move for one request.

``closedloop_registry_watch`` runs when the alias watcher (:mod:`closedloop.triggers.registry`)
sees ``production`` or ``candidate`` where no sealed record explains it: it checks again (the
event's payload is not evidence: an ``op`` can post asset events) and alerts through the
model's template ``alerts:``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from closedloop.operators.base import DeploymentActionOperator, run_context

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.spec import LoadedSpec

log = logging.getLogger(__name__)

REGISTRY_DAG_ID = "closedloop_registry"
WATCH_DAG_ID = "closedloop_registry_watch"
ACTIONS = ("promote", "rollback", "restore")


def governed(specs: list[LoadedSpec], model: str) -> LoadedSpec:
    from closedloop.errors import ApprovalError

    for loaded in specs:
        if loaded.spec.model.name == model and loaded.spec.approval is not None:
            return loaded
    names = sorted({s.spec.model.name for s in specs if s.spec.approval is not None})
    raise ApprovalError(f"no governed pipeline has model {model!r} (governed models: {', '.join(names) or 'none'})")


class RegistryOperator(DeploymentActionOperator):
    """Promote, roll back or restore ``production`` for the person who triggered the run.

    :param specs: every template with ``approval:`` (trusted: templates are reviewed code).
    """

    ui_color = "#fdf2e3"

    def act(self, context: Context) -> dict:
        from closedloop.errors import ApprovalError
        from closedloop.hooks.signing import signer, verifier
        from closedloop.steps import governance as gov

        params = context["params"]
        action, model = str(params.get("action")), str(params.get("model") or "")
        reason = str(params.get("reason") or "")
        actor = getattr(context["dag_run"], "triggering_user_name", None)
        if not actor:
            raise ApprovalError("registry actions are a person's: trigger closedloop_registry through Airflow "
                                "(closedloop promote / rollback / audit --restore) so the run records who asked")
        if action not in ACTIONS:
            raise ApprovalError(f"action: expected one of {list(ACTIONS)}, got {action!r}")
        loaded = governed(self.specs, model)
        ctx = run_context(loaded, "mlflow_default", context)
        policy = gov.ApprovalPolicy.of(loaded.spec)
        key, ring = signer(), verifier()
        ti = context["ti"]
        if not str(params.get("from_version") or "").strip():
            raise ApprovalError(f"{action} names no move: give from_version (the version production holds as you "
                                "see it, or 'none'); closedloop promote / rollback / audit --restore fill it in")
        target = params.get("version") if action == "promote" else params.get("to_version")
        move = gov.move_of(model, params.get("from_version"), target, nonce=f"{ti.dag_id}/{ti.run_id}")
        log.info("%s asks to %s %s: %s%s", actor, action, model, move.describe(),
                 "" if action == "promote" else f" ({reason})")
        done = gov.done_move(ctx, move, actor=actor, verifier=ring)
        if done is not None:  # a cleared or retried run: its move was made once already
            log.info("this request's move was made already (seq %s): nothing changed", done["seq"])
            return {"action": action, "by": actor, **done}
        allowed = [*policy.approvers, *policy.rollback]
        if action == "rollback":
            return {"action": action, "by": actor, **gov.rollback(
                ctx, model, actor=actor, reason=reason, allowed=allowed, signer=key, move=move, verifier=ring)}
        if action == "restore":
            return {"action": action, "by": actor, **gov.restore(
                ctx, model, actor=actor, reason=reason, allowed=allowed, signer=key, move=move, verifier=ring)}
        record, statements = evidence_on_version(ctx, model, str(params.get("version") or ""), policy, ring)
        out = gov.promote(ctx, record, statements, model=model, policy=policy, signer=key,
                          actor=f"{actor} via {REGISTRY_DAG_ID}", move=move, verifier=ring)
        return {"action": action, "by": actor, **out}


def evidence_on_version(ctx, model: str, version: str, policy, verifier) -> tuple[dict, list[dict]]:
    """The sealed release record and approval statements kept on a model version's MLflow tags."""
    from closedloop.errors import ApprovalError
    from closedloop.runtime import tracking
    from closedloop.steps import governance as gov

    where = f"{model} version {version}"
    if not version:
        raise ApprovalError("promote needs a version")
    try:
        mv = tracking.client(ctx).get_model_version(model, version)
    except Exception as exc:
        if tracking.not_found(exc):
            raise ApprovalError(f"refusing to promote {where}: the registry has no such version") from None
        raise
    raw = mv.tags.get(gov.RECORD_TAG)
    if not raw:
        raise ApprovalError(f"refusing to promote {where}: it has no sealed release record (not registered by a "
                            "closedloop pipeline run that passed its gates)")
    try:
        record = gov.unseal_record(verifier, json.loads(raw), what=f"the release record on {where}")
        if (record.get("model"), str(record.get("version"))) != (model, version):
            raise ApprovalError(f"refusing to promote {where}: the release record on it is for "
                                f"{record.get('model')} version {record.get('version')} (copied tags?)")
        statements = [gov.unseal_statement(verifier, json.loads(mv.tags[gov.APPROVAL_TAG + t]), record,
                                           what=f"the approval {t!r} on {where}")
                      for t in gov.approval_task_ids(policy.required) if mv.tags.get(gov.APPROVAL_TAG + t)]
    except ValueError as exc:
        raise ApprovalError(f"refusing to promote {where}: unreadable evidence ({exc})") from None
    return record, statements


class AliasAlarmOperator(BaseOperator):
    """Alert on unexplained alias moves the watcher reported (checked again here first).

    :param specs: every template with ``approval:``.
    """

    ui_color = "#fde8e8"

    def __init__(self, *, specs: list[LoadedSpec], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.specs = specs

    def execute(self, context: Context) -> dict:
        from closedloop.hooks.signing import verifier
        from closedloop.notifiers import announce
        from closedloop.runtime import tracking
        from closedloop.steps.governance import check_aliases

        models = set()
        for events in (context.get("triggering_asset_events") or {}).values():
            for e in events:
                payload = (e.extra or {}).get("payload") or e.extra or {}
                if isinstance(payload, dict) and payload.get("model"):
                    models.add(str(payload["model"]))
        found = {}
        for model in sorted(models):
            try:
                loaded = governed(self.specs, model)
            except Exception:
                log.warning("alarm for %r, which no governed template names: ignored", model)
                continue
            ctx = run_context(loaded, "mlflow_default", context)
            state = check_aliases(tracking.client(ctx), model, verifier())
            found[model] = state["problems"]
            held = [p for p in state["problems"] if ", which recall " in p]
            moved = [p for p in state["problems"] if p not in held]
            if moved:
                announce(loaded.spec, "alias_unexplained",
                         f"{model}: alias moved outside the pipeline: " + "; ".join(moved)
                         + f" — `closedloop audit --verify {model}`, `--restore` puts back the governed version",
                         model=model, problems=moved, aliases=state["aliases"])
            if held:
                announce(loaded.spec, "recall_hold",
                         f"{model}: an alias points at a version a recall holds: " + "; ".join(held)
                         + " — `closedloop recall show ID` proposes where production should go",
                         model=model, problems=held, aliases=state["aliases"])
            if not state["problems"]:
                log.info("%s: the aliases match the sealed records again; no alert", model)
        return found

"""Governance in the registry: review decisions, guarded promotion, rollback, audit, alias checks.

Promotion believes only sealed evidence (:mod:`closedloop.runtime.signing`): the **release
record** ``register_candidate`` sealed (model, version, artifact digest, gate report digest,
template, data, run, requester) and the **approval statements** the approval tasks sealed from
Airflow's human-in-the-loop response (decision, responder, time, the record's digest, the
``production`` version when the review opened). XCom and MLflow tags only carry them; an edit
breaks the seal. :func:`verify_release` refuses, with the reason, unless the statements approve
exactly this record, freshly, by enough distinct assigned reviewers who did not request it, and
``production`` has not moved since the review opened. Every alias move the pipeline makes is
itself sealed (a *promotion record*), so :func:`check_aliases` can tell a governed move from one
made directly in MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from closedloop import vocab
from closedloop.errors import ApprovalError, EvidenceError
from closedloop.runtime import tracking
from closedloop.runtime.context import RunContext
from closedloop.runtime.faults import strike
from closedloop.runtime.signing import Binding, KeyRing, Signer, Verifier, bound_of, digest
from closedloop.steps.approvals import approval_task_ids  # noqa: F401 - part of this module's interface
from closedloop.steps.trail import PROMOTION_BINDING  # noqa: F401 - part of this module's interface
from closedloop.steps.trail import audit as _audit
from closedloop.steps.trail import promotion_binding as _promotion_binding

PRODUCTION, PREVIOUS, CANDIDATE = vocab.PRODUCTION, vocab.PREVIOUS, vocab.CANDIDATE
AUDIT_PREFIX = vocab.AUDIT_PREFIX
APPROVE, REJECT = "Approve", "Reject"
RECORD_TAG = vocab.RELEASE_RECORD
APPROVAL_TAG = vocab.APPROVAL_PREFIX
PROMOTION_TAG = vocab.PROMOTION
PUBLIC_KEY_TAG = vocab.PUBLIC_KEY


@dataclass(frozen=True)
class ApprovalPolicy:
    """The template's ``approval:``: who may approve, how many distinct approvals, for how long."""

    approvers: list[str]
    required: int = 1
    valid_hours: float = 72.0
    rollback: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, spec) -> ApprovalPolicy:
        a = spec.approval
        if a is None:
            raise ApprovalError(f"pipeline {spec.name!r} has no approval: its models are never promoted")
        return cls(approvers=list(a.approvers), required=a.required, valid_hours=a.valid_hours_or_default,
                   rollback=list(a.rollback))


def _parse_time(value: str) -> datetime:
    at = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def verify_release(record: dict, statements: list[dict], *, model: str, policy: ApprovalPolicy,
                   production_now: str | None, now: datetime | None = None,
                   run: tuple[str, str] | None = None) -> list[str]:
    """Raise :class:`ApprovalError` with the reason unless ``statements`` approve ``record``.

    ``record`` and ``statements`` are already unsealed (their seals checked). ``run``: the
    ``(dag_id, run_id)`` the record must come from (the promote task's own run). Returns the
    approvers' names.
    """
    now = now or datetime.now(UTC)
    version = str(record.get("version"))
    where = f"{model} version {version} (Airflow run {record.get('dag_id')}/{record.get('run_id')})"
    if record.get("kind") != "release_record":
        raise ApprovalError(f"refusing to promote {where}: the record is not a release record")
    if record.get("model") != model:
        raise ApprovalError(f"refusing to promote {where}: the release record is for model {record.get('model')!r}, "
                            f"not {model!r}")
    if run is not None and (record.get("dag_id"), record.get("run_id")) != run:
        raise ApprovalError(f"refusing to promote {where}: the release record belongs to another run than "
                            f"{run[0]}/{run[1]}")
    if record.get("gates_passed") is not True:
        raise ApprovalError(f"refusing to promote {where}: its release gates did not pass")
    if not statements:
        raise ApprovalError(f"refusing to promote {where}: Airflow has no review decision for that run")
    record_digest = digest(record)
    requester = record.get("requester_user")
    excluded = {p for p in [requester, *(record.get("excluded_reviewers") or [])] if p}
    responders: list[str] = []
    for st in statements:
        if st.get("kind") != "approval" or st.get("record_digest") != record_digest:
            raise ApprovalError(f"refusing to promote {where}: the approval by {st.get('responder')!r} was given "
                                f"for another release record ({st.get('model')} version {st.get('version')}); "
                                "an approval promotes only the version it was given for")
        if st.get("decision") != "approved":
            raise ApprovalError(f"refusing to promote {where}: the review decision was {st.get('decision')!r}"
                                f" (chosen {st.get('chosen_options') or 'nothing'})")
        who = st.get("responder")
        if not who:
            raise ApprovalError(f"refusing to promote {where}: the decision was the timeout default, not a person")
        if who not in policy.approvers:
            raise ApprovalError(f"refusing to promote {where}: {who!r} is not an approver "
                                f"({', '.join(policy.approvers)})")
        if who in excluded:
            raise ApprovalError(f"refusing to promote {where}: {who!r} requested this update (or posted its "
                                "incident) and cannot approve it")
        if who in responders:
            raise ApprovalError(f"refusing to promote {where}: {who!r} approved twice; the approvals must come "
                                "from distinct reviewers")
        age = now - _parse_time(st["responded_at"])
        if age > timedelta(hours=policy.valid_hours):
            raise ApprovalError(f"refusing to promote {where}: the approval by {who!r} at {st['responded_at']} is "
                                f"{age.total_seconds() / 3600:.1f} h old; approvals are valid for "
                                f"{policy.valid_hours:g} h (approval.valid_hours): request a new review")
        opened = st.get("production_at_review")
        if production_now not in (opened, version):
            raise ApprovalError(f"refusing to promote {where}: production moved since the review opened "
                                f"(was {opened or 'none'}, is {production_now}); the reviewers judged it against "
                                "another production model: request a new review")
        responders.append(who)
    if len(responders) < policy.required:
        raise ApprovalError(f"refusing to promote {where}: {len(responders)} approval(s) "
                            f"({', '.join(responders)}), {policy.required} required from distinct reviewers")
    return responders


def unseal_record(verifier: Verifier, value: dict, *, what: str) -> dict:
    """A release record read outside its run (MLflow tag): its seal must bind it to its own run's
    ``register_candidate``."""
    body = verifier.unseal(value, None, what=what)
    bound = bound_of(value)
    if bound != Binding(str(body.get("dag_id")), str(body.get("run_id")), "register_candidate"):
        raise EvidenceError(f"{what} was not sealed by register_candidate of run {body.get('dag_id')}/"
                            f"{body.get('run_id')}")
    return body


def unseal_statement(verifier: Verifier, value: dict, record: dict, *, what: str) -> dict:
    """An approval read outside its run: sealed by an approval task of the record's own run."""
    body = verifier.unseal(value, None, what=what)
    bound = bound_of(value)
    if bound is None or (bound.dag_id, bound.run_id) != (record.get("dag_id"), record.get("run_id")) \
            or not bound.task_id.startswith("approval"):
        raise EvidenceError(f"{what} was not sealed by an approval task of run {record.get('dag_id')}/"
                            f"{record.get('run_id')}")
    return body.get("statement") or {}


def record_decision(ctx: RunContext, model: str, version: str, *, decision: str, reviewer: str | None,
                    at: str, comment: str, run_id: str, statement_tag: tuple[str, str] | None = None,
                    task_id: str = "approval") -> None:
    """Mirror Airflow's review decision on the model version (tags and audit event); with
    ``statement_tag``, also the sealed approval statement (what ``closedloop promote`` reads).

    Idempotent: recording the same decision again (a retry) writes the same tags and the same audit
    entry (keyed by the answer's time and the approval task), never a second one."""
    c = tracking.client(ctx)
    if statement_tag is not None:
        c.set_model_version_tag(model, version, *statement_tag)
    for key, value in {vocab.REVIEW_DECISION: decision, vocab.REVIEW_REVIEWER: reviewer or "",
                       vocab.REVIEW_AT: at, vocab.REVIEW_COMMENT: comment, vocab.REVIEW_RUN_ID: run_id}.items():
        c.set_model_version_tag(model, version, key, value)
    try:
        when = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        when = None
    _audit(c, model, version, f"review.{decision}", when=when, key=task_id, reviewer=reviewer, comment=comment,
           run_id=run_id, task_id=task_id)
    from closedloop.steps import cards

    cards.refresh(c, model, version)  # the model card names the decision


def current_production(ctx: RunContext, model: str) -> str | None:
    """The version ``production`` points at now (None: no production yet)."""
    return tracking.alias_version(tracking.client(ctx), model, PRODUCTION)


def check_reviewers(spec, requesters: str | list[str] | None) -> None:
    """Refuse a request nobody could approve (the requesters — the triggering user, an incident's
    poster — are the only approvers, or too few others for ``approval.required``) — before any compute."""
    a = spec.approval
    people = [requesters] if isinstance(requesters, str) else [p for p in requesters or [] if p]
    if a is None or not people:
        return
    others = sorted(set(a.approvers) - set(people))
    if len(others) < a.required:
        who = ", ".join(repr(p) for p in people)
        raise ApprovalError(f"refusing the request of {who} before any compute: {spec.name} needs "
                            f"{a.required} approval(s) from approvers other than the requester, and only "
                            f"{others or 'nobody'} remain; add approvers to the template or ask another requester")


def last_promotion(client, model: str, verifier: Verifier) -> dict | None:
    """The registry's last sealed promotion record of ``model`` (None if it never had one);
    :class:`EvidenceError` if the record there is not one the deployment sealed."""
    raw = client.get_registered_model(model).tags.get(PROMOTION_TAG)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise EvidenceError(f"{model}: the promotion record tag is not JSON (edited in MLflow?)") from None
    return verifier.unseal(value, _promotion_binding(model), what=f"{model}'s last promotion record")


def _record_promotion(client, signer: Signer, model: str, version: str, *, previous: str | None, kind: str,
                      by: str, nonce: str = "", verifier: KeyRing | Verifier | None = None, **details) -> dict:
    """Seal the alias move and keep it on the registered model (what :func:`check_aliases` compares
    with) and in the version's audit trail. ``nonce``: the one request this move answers (a registry
    run), so a cleared or retried run finds its own move instead of making another."""
    try:
        last = last_promotion(client, model, verifier or signer.verifier)
    except EvidenceError:
        last = None
    same = {"kind": kind, "version": str(version), "previous": previous, **{k: details.get(k) for k in
                                                                           ("record_digest", "run_id")}}
    if nonce:
        same["nonce"] = nonce
    if last is not None and (kind == "promotion" or nonce) and all(last.get(k) == v for k, v in same.items()):
        # written by a try that died before it moved the alias: finish that move, do not record it twice
        record, sealed = last, json.loads(client.get_registered_model(model).tags[PROMOTION_TAG])
    else:
        record = {"kind": kind, "model": model, "alias": PRODUCTION, "version": str(version), "previous": previous,
                  "at": datetime.now(UTC).isoformat(), "by": by, "seq": int((last or {}).get("seq", 0)) + 1,
                  **({"nonce": nonce} if nonce else {}), **details}
        sealed = signer.seal(record, _promotion_binding(model))
        client.set_registered_model_tag(model, PROMOTION_TAG, json.dumps(sealed, sort_keys=True))
    client.set_registered_model_tag(model, PUBLIC_KEY_TAG, signer.verifier.published())
    _audit(client, model, str(version), f"alias.production{'' if kind == 'promotion' else '.' + kind}",
           when=datetime.fromisoformat(record["at"]), key=f"seq{record['seq']}", by=record["by"], previous=previous,
           seq=record["seq"], **{k: v for k, v in details.items() if k != "approvals"}, promotion=sealed)
    return record


@dataclass(frozen=True)
class Move:
    """The exact registry move a person asked for: ``production`` from ``source`` (None: no production)
    to ``target``, once, for request ``nonce`` (the registry run: the same when the run is cleared)."""

    model: str
    source: str | None
    target: str | None
    nonce: str

    def describe(self) -> str:
        return f"{self.model} production {self.source or 'none'} → {self.target or '?'}"


def move_of(model: str, source: str | None, target: str | None, nonce: str) -> Move:
    """A :class:`Move` from a run's conf (``"none"`` or empty = no production)."""
    def norm(v):
        v = str(v or "").strip()
        return None if v in ("", "none", "None") else v
    return Move(model, norm(source), norm(target), nonce)


def done_move(ctx: RunContext, move: Move, *, actor: str, verifier: KeyRing) -> dict | None:
    """What this request already did, when a sealed promotion record carries its nonce (a cleared or
    retried registry run): ``production`` still on it → the result again, nothing changed (audited as a
    replay); a try that died between record and alias → None (the caller finishes that same move);
    ``production`` moved on since → :class:`ApprovalError` (a replay is refused, never performed).
    None when this request made no move yet."""
    c = tracking.client(ctx)
    found = _promotion_with_nonce(c, move.model, verifier, move.nonce)
    if found is None:
        return None
    current = tracking.alias_version(c, move.model, PRODUCTION)
    try:
        last = last_promotion(c, move.model, verifier)
    except EvidenceError:
        last = None
    if current == found["version"]:
        _audit(c, move.model, found["version"], "registry.replay", key=_nonce_key(move.nonce),
               by=actor, nonce=move.nonce, seq=found["seq"], note="already done; nothing changed")
        return {"model": move.model, "version": found["version"], "production": found["version"],
                "previous": found.get("previous"), "previous-production": found.get("previous"), "changed": False,
                "already_done": True, "seq": found["seq"]}
    if last is not None and last.get("seq") == found["seq"] and current == found.get("previous"):
        return None  # recorded, not yet moved: finish it
    _audit(c, move.model, found["version"], "registry.replay_refused", key=_nonce_key(move.nonce),
           by=actor, nonce=move.nonce, seq=found["seq"], production=current)
    raise ApprovalError(f"refusing to replay {move.describe()}: this request already moved production (seq "
                        f"{found['seq']}, {found['kind']} by {found['by']} at {found['at']}) and production is now "
                        f"{current or 'none'}; a registry action is done once — ask again with a new request")


def _nonce_key(nonce: str) -> str:
    """A request's nonce as part of an MLflow tag name (run ids hold ``+`` and ``:``, which tag names refuse)."""
    import hashlib

    return "n" + hashlib.sha256(nonce.encode()).hexdigest()[:16]


def _promotion_with_nonce(client, model: str, verifier: KeyRing, nonce: str) -> dict | None:
    if not nonce:
        return None
    try:
        last = last_promotion(client, model, verifier)
    except EvidenceError:
        last = None
    if last is not None and last.get("nonce") == nonce:
        return last
    return _newest_audited_promotion(client, model, verifier, nonce=nonce)


def _check_source(move: Move | None, current: str | None, what: str) -> None:
    if move is not None and move.source != current:
        raise ApprovalError(f"refusing to {what}: the request names {move.describe()}, but production is "
                            f"{current or 'none'} now; ask again for the move you mean")


def promote(ctx: RunContext, record: dict, statements: list[dict], *, model: str, policy: ApprovalPolicy,
            signer: Signer, actor: str, run: tuple[str, str] | None = None, now: datetime | None = None,
            move: Move | None = None, verifier: KeyRing | Verifier | None = None) -> dict:
    """Verify (:func:`verify_release`, then the version itself: same source, same files), then point
    ``production`` at it, keep the old one as ``previous-production`` and seal the move.

    Idempotent: promoting the version that is already ``production`` changes nothing.
    """
    from closedloop.steps.registry import artifact_digest

    c = tracking.client(ctx)
    current = tracking.alias_version(c, model, PRODUCTION)
    if move is not None and move.target != str(record.get("version")):
        raise ApprovalError(f"refusing to promote: the request names {move.describe()}, the evidence is for version "
                            f"{record.get('version')}")
    if current != str(record.get("version")):
        _check_source(move, current, f"promote {model} version {record.get('version')}")
    approvers = verify_release(record, statements, model=model, policy=policy, production_now=current, now=now,
                               run=run)
    version = str(record["version"])
    where = f"{model} version {version}"
    try:
        mv = c.get_model_version(model, version)
    except Exception as exc:
        if tracking.not_found(exc):
            raise ApprovalError(f"refusing to promote {where}: the registry has no such version any more") from None
        raise
    from closedloop.steps import recall

    recall.refuse_if_held(c, model, version, verifier or signer.verifier, what="promote")
    if mv.source != record.get("source"):
        raise ApprovalError(f"refusing to promote {where}: it now loads {mv.source}, the release record says "
                            f"{record.get('source')}")
    actual = artifact_digest(record["model_uri"], ctx.tracking_uri)
    if actual != record.get("artifact_digest"):
        raise ApprovalError(f"refusing to promote {where}: its files changed since it was judged (digest {actual}, "
                            f"the release record says {record.get('artifact_digest')})")
    if current == version:
        return {"model": model, "version": version, "changed": False, "previous": tracking.alias_version(c, model, PREVIOUS),
                "approved_by": approvers}
    # write-ahead: the sealed record first, then the aliases; the alias watcher never sees a move
    # without its record, and a retry after a crash in between finds the record and finishes the move
    run_key = f"{record.get('dag_id')}/{record.get('run_id')}"
    promotion = _record_promotion(c, signer, model, version, previous=current, kind="promotion", by=actor,
                                  nonce=move.nonce if move else "", verifier=verifier, approved_by=approvers,
                                  record_digest=digest(record), run_id=run_key)
    strike(ctx, "promotion_recorded")
    if current is not None:
        c.set_registered_model_alias(model, PREVIOUS, current)
        _audit(c, model, current, "alias.previous-production", when=datetime.fromisoformat(promotion["at"]),
               key=f"seq{promotion['seq']}", by=actor, replaced_by=version)
        strike(ctx, "previous_moved")
    c.set_registered_model_alias(model, PRODUCTION, version)
    strike(ctx, "production_moved")
    from closedloop.steps import cards

    cards.refresh(c, model, version)
    if current is not None:
        cards.refresh(c, model, current)
    return {"model": model, "version": version, "changed": True, "previous": current, "approved_by": approvers}


def rollback(ctx: RunContext, model: str, *, actor: str, reason: str, allowed: list[str], signer: Signer,
             move: Move | None = None, verifier: KeyRing | Verifier | None = None) -> dict:
    """Swap ``production`` and ``previous-production`` — only when ``previous-production`` is where the
    last sealed promotion left it (an alias moved in MLflow is never rolled back to).

    :param actor: the Airflow user who asked (the run's ``triggering_user_name``): must be in ``allowed``.
    :param move: the exact move asked for (from the current production to the previous one), with its
        nonce: checked against the registry before anything changes.
    """
    if actor not in allowed:
        raise ApprovalError(f"{actor!r} may not roll back {model}: allowed are {', '.join(allowed) or 'nobody'} "
                            "(the template's approvers and approval.rollback)")
    if not (reason or "").strip():
        raise ApprovalError(f"rolling back {model} needs a reason (--reason)")
    c = tracking.client(ctx)
    previous = tracking.alias_version(c, model, PREVIOUS)
    current = tracking.alias_version(c, model, PRODUCTION)
    if previous is None:
        raise ApprovalError(f"cannot roll back {model}: it has no {PREVIOUS!r} version")
    last = last_promotion(c, model, verifier or signer.verifier)
    if move is not None and last is not None and last.get("kind") == "rollback" and last.get("nonce") == move.nonce:
        # a try of this very request sealed the move and died before the aliases moved: finish it
        c.set_registered_model_alias(model, PRODUCTION, str(last["version"]))
        if last.get("previous"):
            c.set_registered_model_alias(model, PREVIOUS, str(last["previous"]))
        return {"model": model, "production": str(last["version"]), "previous-production": last.get("previous"),
                "changed": True}
    if last is None or str(last.get("previous") or "") != previous or str(last.get("version")) != current:
        raise ApprovalError(
            f"refusing to roll back {model}: {PREVIOUS} → version {previous} and production → version {current}, but "
            + (f"the last sealed promotion (seq {last['seq']}) left production on {last['version']} and "
               f"{PREVIOUS} on {last.get('previous') or 'nothing'}" if last else "no sealed promotion explains them")
            + f": an alias moved outside the pipeline is never rolled back to (`closedloop audit --verify {model}`)")
    from closedloop.steps import recall

    ring = verifier or signer.verifier
    target = previous
    if move is not None:
        _check_source(move, current, f"roll back {model}")
        if move.target != previous:
            # a recall's proposal: back to an older version, which must have been approved and promoted once
            if move.target is None or move.target not in recall.once_promoted(c, model, ring):
                raise ApprovalError(f"refusing to roll back {model}: the request names {move.describe()}, but "
                                    f"{PREVIOUS} is version {previous} now and version {move.target} was never "
                                    "approved and promoted; a rollback goes to previous-production or to a version "
                                    "a sealed promotion once put in production")
            target = move.target
    recall.refuse_if_held(c, model, target, ring, what="roll back to")
    _record_promotion(c, signer, model, target, previous=current, kind="rollback", by=actor, reason=reason,
                      rollback=True, nonce=move.nonce if move else "", verifier=verifier)
    c.set_registered_model_alias(model, PRODUCTION, target)
    if current is not None:
        c.set_registered_model_alias(model, PREVIOUS, current)
        _audit(c, model, current, "alias.previous-production", by=actor, replaced_by=target, rollback=True)
    return {"model": model, "production": target, "previous-production": current, "changed": True}


def restore(ctx: RunContext, model: str, *, actor: str, reason: str, allowed: list[str], signer: Signer,
            move: Move | None = None, verifier: KeyRing | Verifier | None = None) -> dict:
    """Put ``production`` (and ``previous-production``) back where the last sealed promotion left them
    (after a direct move)."""
    if actor not in allowed:
        raise ApprovalError(f"{actor!r} may not restore {model}: allowed are {', '.join(allowed) or 'nobody'}")
    if not (reason or "").strip():
        raise ApprovalError(f"restoring {model} needs a reason (--reason)")
    c = tracking.client(ctx)
    last = last_promotion(c, model, verifier or signer.verifier)
    if last is None:
        raise ApprovalError(f"cannot restore {model}: no sealed promotion record to restore")
    current = tracking.alias_version(c, model, PRODUCTION)
    if move is not None:
        _check_source(move, current, f"restore {model}")
        if move.target not in (None, str(last["version"])):
            raise ApprovalError(f"refusing to restore {model}: the request names {move.describe()}, but the last "
                                f"sealed promotion put version {last['version']} there")
    from closedloop.steps import recall

    recall.refuse_if_held(c, model, str(last["version"]), verifier or signer.verifier, what="restore")
    if current != last["version"]:
        c.set_registered_model_alias(model, PRODUCTION, last["version"])
    prev_now, prev_sealed = tracking.alias_version(c, model, PREVIOUS), last.get("previous")
    if prev_now != prev_sealed:
        if prev_sealed:
            c.set_registered_model_alias(model, PREVIOUS, str(prev_sealed))
        else:
            c.delete_registered_model_alias(model, PREVIOUS)
    _audit(c, model, last["version"], "alias.production.restore", by=actor, reason=reason, replaced=current,
           seq=last["seq"], previous_was=prev_now, previous=prev_sealed, nonce=move.nonce if move else "")
    return {"model": model, "production": last["version"], "was": current, "previous-production": prev_sealed,
            "changed": current != last["version"] or prev_now != prev_sealed}


def check_aliases(client, model: str, verifier: Verifier) -> dict:
    """Compare ``production`` and ``candidate`` with what the pipeline sealed; list every unexplained move.

    ``production`` must be the version of the newest sealed promotion (the registry's record, or a
    newer one in a version's audit trail: a record put back from the past is noticed); ``candidate``
    must carry its own sealed release record.
    """
    rm = client.get_registered_model(model)
    aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
    problems: list[str] = []
    try:
        last = last_promotion(client, model, verifier)
    except EvidenceError as exc:
        last, problems = None, [str(exc)]
    newest = _newest_audited_promotion(client, model, verifier)
    if newest is not None and (last is None or newest["seq"] > last["seq"]):
        problems.append(f"{model}: the registry's promotion record (seq {(last or {}).get('seq', 0)}) is older than "
                        f"one in the audit trail (seq {newest['seq']}, version {newest['version']}): it was put back")
        last = newest
    prod = aliases.get(PRODUCTION)
    if prod is not None and last is None:
        problems.append(f"{model}@production → version {prod}, but no sealed promotion explains it "
                        "(moved directly in MLflow?)")
    elif prod is not None and str(last["version"]) != prod:
        problems.append(f"{model}@production → version {prod}, but the last sealed promotion ({last['kind']} by "
                        f"{last['by']} at {last['at']}) put version {last['version']} there")
    elif prod is None and last is not None:
        problems.append(f"{model}@production was removed; the last sealed promotion put version {last['version']} "
                        "there")
    prev, sealed_prev = aliases.get(PREVIOUS), (str(last["previous"]) if last and last.get("previous") else None)
    if prev is not None and prev != sealed_prev:
        problems.append(f"{model}@{PREVIOUS} → version {prev}, but " + (
            f"the last sealed promotion ({last['kind']} by {last['by']} at {last['at']}) kept version {sealed_prev} "
            "there" if sealed_prev else "no sealed promotion put a version there") + " (moved directly in MLflow?)")
    elif prev is None and sealed_prev is not None and prod is not None:
        problems.append(f"{model}@{PREVIOUS} was removed; the last sealed promotion kept version {sealed_prev} there")
    from closedloop.steps import recall

    for alias in (PRODUCTION, CANDIDATE):
        if aliases.get(alias) is not None:
            for h in recall.holds(client, model, aliases[alias], verifier):
                problems.append(f"{model}@{alias} → version {aliases[alias]}, which recall {h['id']} holds "
                                f"({h['query']}: {h['how']})")
    cand = aliases.get(CANDIDATE)
    if cand is not None:
        try:
            raw = client.get_model_version(model, cand).tags.get(RECORD_TAG)
            record = unseal_record(verifier, json.loads(raw), what=f"{model} version {cand}'s release record") \
                if raw else None
            if record is None:
                problems.append(f"{model}@candidate → version {cand}, which has no sealed release record "
                                "(registered or moved outside the pipeline?)")
            elif (record.get("model"), str(record.get("version"))) != (model, cand):
                problems.append(f"{model}@candidate → version {cand}, whose release record is for "
                                f"{record.get('model')} version {record.get('version')} (copied tags?)")
        except (EvidenceError, ValueError) as exc:
            problems.append(f"{model}@candidate → version {cand}: {exc}")
    return {"model": model, "aliases": aliases, "last_promotion": last, "problems": problems, "ok": not problems}


def _newest_audited_promotion(client, model: str, verifier: Verifier | KeyRing, nonce: str = "") -> dict | None:
    """The newest sealed promotion record in any version's audit trail (with ``nonce``: of that request)."""
    from closedloop.steps.trail import sealed_promotions

    newest = None
    for _, rec in sealed_promotions(client, model, verifier):
        if nonce and rec.get("nonce") != nonce:
            continue
        if newest is None or rec["seq"] > newest["seq"]:
            newest = rec
    return newest

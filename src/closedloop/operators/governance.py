"""Human review (on Airflow's human-in-the-loop support) and guarded promotion."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowFailException

from closedloop import vocab
from closedloop.operators.base import ClosedLoopStepOperator
from closedloop.runtime.pages import quoted

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.runtime.context import RunContext
    from closedloop.spec import LoadedSpec

log = logging.getLogger(__name__)


def requester_of(context: Context) -> str | None:
    """Who started the run: the triggering user (REST, UI, CLI); None for scheduled runs."""
    return getattr(context["dag_run"], "triggering_user_name", None) or None


OPENED_KEY = vocab.XCOM_REVIEW_OPENED


def review_link(context: Context) -> str:
    """Where the reviewer decides: the task's Required Actions in Airflow's UI."""
    ti = context["ti"]
    try:
        from airflow.configuration import conf

        base = conf.get("api", "base_url", fallback="") or ""
    except Exception:  # configuration unreadable: a relative link still helps
        base = ""
    return f"{base.rstrip('/')}/dags/{ti.dag_id}/runs/{ti.run_id}/tasks/{ti.task_id}/required_actions"


def card_link(context: Context) -> str:
    """The review card of the run's candidate (against production), served by the plugin."""
    from urllib.parse import urlencode

    ti = context["ti"]
    base = review_link(context).split("/dags/")[0]
    return f"{base}/closedloop/review?{urlencode({'dag_id': ti.dag_id, 'run_id': ti.run_id})}"


def request_block(params: dict, requested_by: str | None) -> str:
    """The request as the requester wrote it: each field a quoted block under a label the pipeline writes."""
    fields = (("Purpose", "purpose"), ("Change", "change"), ("Expected impact", "expected_impact"),
              ("Scope", "scope"), ("Ticket", "ticket"))
    out = [f"**Request** by {quoted(requested_by or 'the schedule').removeprefix('> ')} "
           "(quoted as written; not checked by the pipeline):"]
    for label, key in fields:
        if params.get(key):
            out += ["", f"*{label}:*", quoted(params.get(key))]
    return "\n".join(out)


def gate_summary(record: dict) -> str:
    rows = record.get("gate_summary") or []
    passed = sum(1 for r in rows if r.get("passed"))
    return f"{passed}/{len(rows)} gates passed"


def earlier_hitl(op: HITLOperator, context: Context) -> tuple[dict, dict[str, Any]] | None:
    """On a retry of a human-in-the-loop task: the request an earlier try opened and the event its
    answer (or its timeout) makes, read from Airflow's record of that try through the REST API; None
    on a first try, when no earlier try opened a request or nobody answered it before it died (ask
    again), or when no service account can read it (then asking again is all there is)."""
    from datetime import datetime

    from closedloop.hooks.airflow_api import earlier_review, service_api

    ti = context["ti"]
    if int(ti.try_number or 1) <= 1:
        return None
    api = service_api()
    if api is None:
        log.warning("retry of %s: no Airflow API connection to read the earlier try's request; asking again",
                    op.task_id)
        return None
    detail = earlier_review(api, ti.dag_id, ti.run_id, op.task_id, int(ti.try_number))
    if detail is None:
        return None
    created = datetime.fromisoformat(str(detail["created_at"]).replace("Z", "+00:00"))
    expired = op.response_timeout is not None and datetime.now(created.tzinfo) >= created + op.response_timeout
    if detail.get("response_received"):
        user = detail.get("responded_by_user") or {}
        log.info("retry of %s: %s already answered %s at %s in an earlier try; taking that answer, not asking "
                 "again", op.task_id, user.get("id"), detail.get("chosen_options"), detail.get("responded_at"))
        return detail, {"chosen_options": detail.get("chosen_options") or [],
                        "params_input": detail.get("params_input") or {},
                        "responded_at": datetime.fromisoformat(str(detail["responded_at"]).replace("Z", "+00:00")),
                        "responded_by_user": user}
    if expired:
        log.info("retry of %s: the request opened at %s timed out unanswered", op.task_id, created)
        return detail, {"timedout": True, "error": "timeout", "error_type": "timeout"}
    return None


class ReviewOperator(ApprovalOperator):
    """Hold the run until an assigned reviewer approves or rejects the candidate (``approval``,
    and ``approval_2`` … when the template requires several distinct approvals).

    The task waits in Airflow's ``awaiting_input`` state (no worker slot, no trigger) and shows
    under Required Actions; a decision comes from the UI or the REST API, with Airflow's
    authentication. Its subject names the model **and** version, its body the gate summary and
    the release record's digest, so a reviewer approves exactly one thing. The reviewers are the
    template's approvers minus the requester and minus whoever approved in an earlier approval
    task of the run, so Airflow itself refuses (403) a requester approving their own request or
    one person approving twice. When the review opens, the template's ``alerts:`` channels tell
    the approvers. No decision before the timeout counts as a rejection and raises an alert.
    Rejection skips ``promote``.

    Airflow hands the response to this task alone; it seals an *approval statement* (decision,
    responder, time, the release record's digest, the ``production`` version when the review
    opened) — the only approval ``promote`` believes — and mirrors it onto the model version.

    A decision is never lost and never asked twice: mirroring it is tried again in place for a
    passing error (:func:`closedloop.errors.with_retries`), then by Airflow's retries (transient
    errors only); a retried task finds the answer the reviewer gave to the earlier try in Airflow
    (its human-in-the-loop record, through the REST API) and records that answer instead of opening
    a new review. The mirror is idempotent: one audit entry per answer.

    :param prior: the approval tasks before this one in the run (their approvers may not approve again).
    """

    def __init__(self, *, loaded: LoadedSpec, mlflow_conn_id: str = "mlflow_default", prior: list[str] | None = None,
                 **kwargs: Any) -> None:
        approval = loaded.spec.approval
        assert approval is not None
        self.loaded = loaded
        self.mlflow_conn_id = mlflow_conn_id
        self.approvers = list(approval.approvers)
        self.prior = list(prior or [])
        # Airflow hands the DAG's params (the request) to every task; the review form asks only
        # for a comment, the request itself is shown in the body. They stay in the run's params.
        kwargs.pop("params", None)
        if kwargs.get("retry_policy") is None:  # recording a decision is retried for transient errors only
            from closedloop.retry import TransientOnlyRetryPolicy

            kwargs["retry_policy"] = TransientOnlyRetryPolicy()
        super().__init__(
            subject=f"Release {loaded.spec.model.name}? ({loaded.spec.name})",
            body="Review the release candidate of this run.",
            defaults=[self.REJECT],  # a timeout counts as a rejection
            response_timeout=timedelta(hours=approval.timeout_hours),
            params={"comment": Param("", type="string", maxLength=2000, title="Comment")},
            assigned_users=[{"id": u, "name": u} for u in self.approvers],
            **kwargs,
        )

    def execute(self, context: Context):
        """Open the review (or take the answer an earlier try got); an error is recorded like every step's
        (XCom ``error``: the reason in alerts, summaries and the UI) before it fails the task."""
        return ClosedLoopStepOperator.guarded(context, lambda: self._open(context), start=False, end=False)

    def _open(self, context: Context):
        from closedloop.notifiers import announce
        from closedloop.operators.base import read, request_of, run_context, seal
        from closedloop.runtime.signing import digest
        from closedloop.runtime.timeutil import utc_now_iso
        from closedloop.steps.governance import current_production

        answered = self.earlier_answer(context)
        if answered is not None:
            return self.execute_complete(context, answered)
        record = read(context, self.task_id, "register_candidate")
        earlier = [read(context, self.task_id, t).get("statement") or {} for t in self.prior]
        excluded = {p for p in [record.get("requester_user"), *(record.get("excluded_reviewers") or [])] if p}
        taken = {s.get("responder") for s in earlier if s.get("responder")}
        reviewers = [u for u in self.approvers if u not in excluded and u not in taken]
        if not reviewers:
            raise AirflowFailException(
                f"nobody may review this request: approvers {self.approvers}, requesters {sorted(excluded)}, "
                f"already approved by {sorted(taken) or 'nobody'}; add another approver to the template")
        self.assigned_users = [{"id": u, "name": u} for u in reviewers]
        model, version = record["model"], record["version"]
        ctx = run_context(self.loaded, self.mlflow_conn_id, context)
        production = current_production(ctx, model)
        record_digest = digest(record)
        opened = seal(context, {"model": model, "version": version, "record_digest": record_digest,
                                "production": production, "opened_at": utc_now_iso(), "reviewers": reviewers},
                      OPENED_KEY)
        context["ti"].xcom_push(key=OPENED_KEY, value=opened)
        # kept where a retry of this task finds it (its XCom is cleared): the review's state is this sealed
        # record, never text read back from the review's body
        from closedloop.runtime import tracking

        tracking.client(ctx).set_model_version_tag(model, str(version), vocab.REVIEW_OPENED_PREFIX + self.task_id,
                                                   json.dumps(opened, sort_keys=True))
        required = self.loaded.spec.approval.required
        nth = len(self.prior) + 1
        self.subject = (f"Release {model} version {version}? ({self.loaded.spec.name})"
                        + (f" — approval {nth} of {required}" if required > 1 else ""))
        params, requested_by = request_of(self.loaded, context)
        from closedloop.steps.gates import duration_text, report_table

        gate = read(context, self.task_id, "release_gate")
        self.body = (
            f"**{model} version {version}** from run `{context['run_id']}`\n\n"
            f"- Release record: `{record_digest}`\n- Model files: `{record['artifact_digest']}`\n"
            f"- Production now: {'version ' + production if production else 'none yet'}\n"
            f"- Review card (candidate vs production, shift, charts): [{model} v{version}]({card_link(context)})\n"
            + (f"- Already approved by: {', '.join(sorted(taken))}\n" if taken else "")
            + f"\n**Release gates** ({gate_summary(record)}):\n\n{report_table(gate.get('report') or [])}\n\n"
            f"Reviewers: {', '.join(reviewers)}. No decision within "
            f"{duration_text(self.response_timeout.total_seconds())} counts as a rejection.\n\n"
            + request_block(params, requested_by)
        )
        self.notifiers = []
        announce(self.loaded.spec, "review_requested",
                 f"{model} version {version} waits for review ({gate_summary(record)}; release record "
                 f"{record_digest[:19]}…): {review_link(context)}",
                 dag_id=context["ti"].dag_id, run_id=context["ti"].run_id, task_id=self.task_id, model=model,
                 version=version, reviewers=reviewers, link=review_link(context))
        return super().execute(context)

    def earlier_answer(self, context: Context) -> dict[str, Any] | None:
        """On a retry: the event of the review an earlier try opened and a reviewer answered (or that
        timed out), after re-sealing what the review showed; None: open the review (first try, or no
        earlier review, or no service account to read it with)."""

        from closedloop.operators.base import seal

        found = earlier_hitl(self, context)
        if found is None:
            return None
        _, event = found
        opened = self.opened_record(context)
        context["ti"].xcom_push(key=OPENED_KEY, value=seal(context, opened, OPENED_KEY))
        return event

    def opened_record(self, context: Context) -> dict:
        """What the review an earlier try opened showed (model, version, release record digest, production
        at review, reviewers), from the sealed record that try kept on the model version — never parsed
        from the review's text, which quotes what a requester wrote."""
        import json

        from closedloop.errors import EvidenceError
        from closedloop.hooks.signing import verifier
        from closedloop.operators.base import read, run_context
        from closedloop.runtime import tracking
        from closedloop.runtime.signing import Binding, digest

        ti = context["ti"]
        record = read(context, self.task_id, "register_candidate")
        record_digest = digest(record)
        ctx = run_context(self.loaded, self.mlflow_conn_id, context)
        raw = tracking.client(ctx).get_model_version(record["model"], str(record["version"])).tags.get(
            vocab.REVIEW_OPENED_PREFIX + self.task_id)
        what = f"the record of the review an earlier try of {self.task_id} opened"
        if not raw:
            raise EvidenceError(f"{what} is missing from {record['model']} version {record['version']}; not "
                                "recording its answer")
        try:
            value = json.loads(raw)
        except ValueError:
            raise EvidenceError(f"{what} is not JSON (edited in MLflow?); not recording its answer") from None
        opened = verifier().unseal(value, Binding(ti.dag_id, ti.run_id, self.task_id, OPENED_KEY), what=what)
        if opened.get("record_digest") != record_digest:
            raise EvidenceError(f"{what} is not about this run's release record {record_digest}; not recording "
                                "its answer")
        return opened

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        return ClosedLoopStepOperator.guarded(context, lambda: self._complete(context, event), start=False, end=False)

    def _complete(self, context: Context, event: dict[str, Any]) -> Any:
        import json

        from closedloop.notifiers import record_alert
        from closedloop.operators.base import read, run_context, seal
        from closedloop.runtime.timeutil import utc_now_iso
        from closedloop.steps.governance import APPROVAL_TAG, record_decision

        opened = read(context, self.task_id, self.task_id, key=OPENED_KEY)
        timed_out = bool(event.get("timedout")) or "error" in event
        chosen = list(event.get("chosen_options") or [])
        user = event.get("responded_by_user") or {}
        reviewer = (user.get("id") or user.get("name")) if isinstance(user, dict) else None
        decision = "timeout" if timed_out else ("approved" if chosen == [self.APPROVE] else "rejected")
        at = event.get("responded_at")
        at_text = at.isoformat() if hasattr(at, "isoformat") else (str(at) if at else utc_now_iso())
        comment = str((event.get("params_input") or {}).get("comment") or "")
        if timed_out:
            record_alert("review_timeout", f"{opened['model']} version {opened['version']}: no review "
                         f"decision within {self.response_timeout}; counted as a rejection, not promoted",
                         dag_id=context["ti"].dag_id, run_id=context["ti"].run_id, task_id=self.task_id)
            if "error" in event:  # no defaults reached the task: treat as the default (reject)
                event = {"chosen_options": [self.REJECT], "params_input": {}, "responded_at": None,
                         "responded_by_user": None}
                chosen = [self.REJECT]
        statement = {"kind": "approval", "model": opened["model"], "version": opened["version"],
                     "record_digest": opened["record_digest"], "decision": decision, "chosen_options": chosen,
                     "responder": None if timed_out else reviewer, "responded_at": at_text,
                     "production_at_review": opened["production"], "opened_at": opened["opened_at"],
                     "task_id": self.task_id, "comment": comment}
        log.info("review decision: %s%s", decision, f" by {reviewer}" if reviewer else "")
        sealed = seal(context, {"chosen_options": chosen, "params_input": event.get("params_input") or {},
                                "responded_at": at_text, "responded_by_user": user or None, "statement": statement})
        # recorded before Airflow's own handling: a rejection skips downstream by raising
        from closedloop.errors import with_retries
        from closedloop.runtime.faults import inject

        ti = context["ti"]
        inject(dag_id=ti.dag_id, task_id=self.task_id, try_number=int(ti.try_number or 1), point="decision_received")
        ctx = run_context(self.loaded, self.mlflow_conn_id, context)
        with_retries(lambda: record_decision(
            ctx, opened["model"], opened["version"], decision=decision, reviewer=reviewer, at=at_text,
            comment=comment, run_id=ti.run_id, task_id=self.task_id,
            statement_tag=(APPROVAL_TAG + self.task_id, json.dumps(sealed, sort_keys=True))),
            what=f"recording the review decision of {self.task_id}")
        super().execute_complete(context, event)
        return sealed


class PromoteOperator(ClosedLoopStepOperator):
    """Move ``production`` to this run's approved candidate (``promote``).

    Believes only sealed evidence: this run's release record (``register_candidate``) and the
    approval statements its approval tasks sealed from Airflow's human-in-the-loop responses —
    checked by :func:`closedloop.steps.governance.promote` (the same function the ``closedloop
    promote`` command reaches through the ``closedloop_registry`` DAG). An edited XCom, copied
    MLflow tags, a stale approval or a moved ``production`` are refused with the reason.
    """

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.hooks.signing import signer, verifier
        from closedloop.steps.governance import ApprovalPolicy, approval_task_ids, promote

        ti = context["ti"]
        spec = self.loaded.spec
        record = self.upstream(context, "register_candidate")
        policy = ApprovalPolicy.of(spec)
        statements = [self.upstream(context, t).get("statement") or {} for t in approval_task_ids(policy.required)]
        out = promote(ctx, record, statements, model=spec.model.name, policy=policy, signer=signer(),
                      actor=f"airflow:{ti.dag_id}/{ti.run_id}", run=(ti.dag_id, ti.run_id), verifier=verifier())
        out["release_record"] = sealed_record_of(ctx, spec.model.name, out["version"])  # for the asset event
        dossier = self.upstream(context, "dossier")
        out["dossier"] = {k: dossier.get(k) for k in ("uri", "digest", "verdict")}
        log.info("%s version %s is production%s (approved by %s)", out["model"], out["version"],
                 "" if out["changed"] else " already (nothing changed)", ", ".join(out["approved_by"]))
        return out


class DossierOperator(ClosedLoopStepOperator):
    """Build, sign and write the version's release dossier (``dossier``): after the last approval (before
    ``production`` moves), or after registration in a pipeline without review
    (:func:`closedloop.steps.dossier.build_for_run`). Signs with the deployment's key, like every seal."""

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop import pipeline
        from closedloop.hooks.signing import signer, verifier
        from closedloop.steps.approvals import approval_task_ids
        from closedloop.steps.dossier import build_for_run

        present = set(self.dag.task_ids)
        inputs = {r: self.upstream(context, r) for r in pipeline.step("dossier").reads
                  if r in present and not r.startswith("approval") and r not in pipeline.SIMULATION_RESULT}
        inputs["simulation"] = self.simulation(context)  # the merge of the shards when simulate is sharded
        spec = self.loaded.spec
        tasks = approval_task_ids(spec.approval.required) if spec.approval else []
        out = build_for_run(self.loaded, ctx, inputs, signer=signer(), verifier=verifier(), approval_tasks=tasks)
        log.info("release dossier of %s v%s: %s (%s), verdict %s", out["model"], out["version"], out["uri"],
                 out["digest"], out["verdict"])
        return out


def sealed_record_of(ctx: RunContext, model: str, version: str) -> dict | None:
    """The sealed release record kept on a version (what the ``production`` asset event hands on)."""
    import json

    from closedloop.runtime import tracking
    from closedloop.steps.governance import RECORD_TAG

    raw = tracking.client(ctx).get_model_version(model, str(version)).tags.get(RECORD_TAG)
    return json.loads(raw) if raw else None


class HilResultsOperator(HITLOperator):
    """Wait (no worker slot) for a hardware-in-the-loop rig to report its results (``await_hil``).

    The rig is an Airflow user (the template's ``hil.reporter``) and reports through Airflow's
    REST API (``closedloop hil report`` does it): option ``Report`` with ``params_input``
    ``{"results": {"metric": value, ...}}``. No report within ``hil.timeout_minutes`` fails the
    run before the gates, without retry. The results become ``hil.<metric>`` for the gates. A retry
    (after a transient error, or Airflow's race with an instant report) takes the report the rig
    gave the earlier try instead of asking again.
    """

    REPORT = "Report"

    def __init__(self, *, loaded: LoadedSpec, **kwargs: Any) -> None:
        hil = loaded.spec.hil
        assert hil is not None
        kwargs.pop("params", None)  # the DAG's request params do not belong in the rig's form
        if kwargs.get("retry_policy") is None:
            from closedloop.retry import TransientOnlyRetryPolicy

            kwargs["retry_policy"] = TransientOnlyRetryPolicy()
        self.loaded = loaded
        super().__init__(
            subject=f"Hardware-in-the-loop results for {loaded.spec.model.name} ({loaded.spec.name})",
            body="Report the rig's metrics as params_input.results (a JSON object of numbers).",
            options=[self.REPORT],
            params={"results": Param({}, type="object", title="Results")},
            assigned_users=[{"id": hil.reporter, "name": hil.reporter}],
            response_timeout=timedelta(minutes=hil.timeout_minutes),
            **kwargs,
        )

    def execute(self, context: Context):
        found = earlier_hitl(self, context)  # a retry takes the rig's earlier report, never asks again
        if found is not None:
            return self.execute_complete(context, found[1])
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict:
        if "error" in event:
            raise AirflowFailException(f"no hardware-in-the-loop results from {self.loaded.spec.hil.reporter!r} "
                                       f"within {self.response_timeout}: the release cannot be judged")
        super().execute_complete(context, event)
        results = (event.get("params_input") or {}).get("results") or {}
        bad = {k: v for k, v in results.items() if not isinstance(v, int | float) or isinstance(v, bool)}
        if not isinstance(results, dict) or not results or bad:
            raise AirflowFailException(f"hardware-in-the-loop report must be a non-empty object of numbers, "
                                       f"got {results!r}")
        from closedloop.operators.base import seal

        user = event.get("responded_by_user") or {}
        return seal(context, {"metrics": {f"{vocab.HIL}{k}": float(v) for k, v in results.items()},
                              "reported_by": user.get("id") if isinstance(user, dict) else None})

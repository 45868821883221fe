"""Human review (on Airflow's human-in-the-loop support) and guarded promotion."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowFailException

from closedloop.operators.base import ClosedLoopStepOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.spec import LoadedSpec
    from closedloop.steps.context import RunContext

log = logging.getLogger(__name__)


def requester_of(context: Context) -> str | None:
    """Who started the run: the triggering user (REST, UI, CLI); None for scheduled runs."""
    return getattr(context["dag_run"], "triggering_user_name", None) or None


class ReviewOperator(ApprovalOperator):
    """Hold the run until an assigned reviewer approves or rejects the candidate (``approval``).

    The task waits in Airflow's ``awaiting_input`` state (no worker slot, no trigger) and shows
    under Required Actions; a decision comes from the UI or the REST API, with Airflow's
    authentication. The reviewers are the template's approvers minus the requester, so Airflow
    itself refuses (403) a requester approving their own request. No decision before the
    template's timeout counts as a rejection and raises an alert. Rejection skips ``promote``:
    the run ends cleanly. The decision is mirrored onto the MLflow model version.
    """

    def __init__(self, *, loaded: LoadedSpec, mlflow_conn_id: str = "mlflow_default", **kwargs: Any) -> None:
        approval = loaded.spec.approval
        assert approval is not None
        from closedloop.notifiers import LocalAlertNotifier

        self.loaded = loaded
        self.mlflow_conn_id = mlflow_conn_id
        self.approvers = list(approval.approvers)
        # Airflow hands the DAG's params (the request) to every task; the review form asks only
        # for a comment, the request itself is shown in the body. They stay in the run's params.
        kwargs.pop("params", None)
        super().__init__(
            subject=f"Release {loaded.spec.model.name}? ({loaded.spec.name})",
            body="Review the release candidate of this run.",
            defaults=[self.REJECT],  # a timeout counts as a rejection
            response_timeout=timedelta(hours=approval.timeout_hours),
            params={"comment": Param("", type="string", maxLength=2000, title="Comment")},
            assigned_users=[{"id": u, "name": u} for u in self.approvers],
            notifiers=[LocalAlertNotifier(kind="review_requested", message=f"{loaded.spec.model.name}: "
                                          "a release candidate waits for review")],
            **kwargs,
        )

    def execute(self, context: Context):
        requester = requester_of(context)
        reviewers = [u for u in self.approvers if u != requester]
        if not reviewers:
            raise AirflowFailException(
                f"nobody may review this request: the only approver(s) {self.approvers} requested it; "
                "add another approver to the template")
        self.assigned_users = [{"id": u, "name": u} for u in reviewers]
        candidate = context["ti"].xcom_pull(task_ids="register_candidate") or {}
        gate = context["ti"].xcom_pull(task_ids="release_gate") or {}
        from closedloop.operators.base import request_of
        from closedloop.steps.gates import format_report

        params, requested_by = request_of(self.loaded, context)
        self.body = (
            f"**{candidate.get('model')} version {candidate.get('version')}** from run `{context['run_id']}`\n\n"
            f"- Requested by: {requested_by or 'the schedule'}\n- Purpose: {params.get('purpose')}\n"
            f"- Change: {', '.join(params.get('change') or [])}\n- Expected impact: {params.get('expected_impact')}\n"
            f"- Scope: {params.get('scope') or '-'}\n- Ticket: {params.get('ticket') or '-'}\n\n"
            f"Release gates:\n```\n{format_report(gate.get('report') or [])}\n```\n"
            f"Reviewers: {', '.join(reviewers)}. No decision within {self.response_timeout} counts as a rejection."
        )
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        from closedloop.notifiers import record_alert
        from closedloop.steps.governance import record_decision

        timed_out = bool(event.get("timedout")) or "error" in event
        chosen = list(event.get("chosen_options") or [])
        user = event.get("responded_by_user") or {}
        reviewer = user.get("name") or user.get("id") if isinstance(user, dict) else None
        decision = "timeout" if timed_out else ("approved" if chosen == [self.APPROVE] else "rejected")
        candidate = context["ti"].xcom_pull(task_ids="register_candidate") or {}
        if candidate.get("version"):
            from closedloop.operators.base import run_context

            ctx = run_context(self.loaded, self.mlflow_conn_id, context)
            at = event.get("responded_at")
            record_decision(ctx, candidate["model"], candidate["version"], decision=decision, reviewer=reviewer,
                            at=at.isoformat() if hasattr(at, "isoformat") else str(at or ""),
                            comment=str((event.get("params_input") or {}).get("comment") or ""),
                            run_id=context["ti"].run_id)
        if timed_out:
            record_alert("review_timeout", f"{candidate.get('model')} version {candidate.get('version')}: no review "
                         f"decision within {self.response_timeout}; counted as a rejection, not promoted",
                         dag_id=context["ti"].dag_id, run_id=context["ti"].run_id, task_id=self.task_id)
            if "error" in event:  # no defaults reached the task: treat as the default (reject)
                event = {"chosen_options": [self.REJECT], "params_input": {}, "responded_at": None,
                         "responded_by_user": None}
        log.info("review decision: %s%s", decision, f" by {reviewer}" if reviewer else "")
        return super().execute_complete(context, event)


class PromoteOperator(ClosedLoopStepOperator):
    """Move ``production`` to this run's approved candidate (``promote``).

    The promotion code checks the evidence itself — this run registered this exact version, its
    gates passed, and Airflow recorded an approval by an assigned reviewer who is not the
    requester — and refuses otherwise, whatever the MLflow tags say.
    """

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.steps.governance import PromotionEvidence, promote

        ti = context["ti"]
        candidate = ti.xcom_pull(task_ids="register_candidate") or {}
        gate = ti.xcom_pull(task_ids="release_gate") or {}
        review = ti.xcom_pull(task_ids="approval") or {}
        self.seen["register_candidate"] = candidate
        user = review.get("responded_by_user") or {}
        evidence = PromotionEvidence(
            model=self.loaded.spec.model.name, version=str(candidate.get("version")),
            dag_id=ti.dag_id, run_id=ti.run_id, run_found=True, requester=requester_of(context),
            registered_version=str(candidate["version"]) if candidate.get("version") else None,
            gate_passed=gate.get("passed"), hitl_received=bool(review),
            chosen_options=list(review.get("chosen_options") or []),
            responded_by=(user.get("id") if isinstance(user, dict) else None),
            approvers=list(self.loaded.spec.approval.approvers if self.loaded.spec.approval else []),
        )
        out = promote(ctx, evidence, actor=f"airflow:{ti.dag_id}/{ti.run_id}")
        log.info("%s version %s is production%s", out["model"], out["version"],
                 "" if out["changed"] else " already (nothing changed)")
        return out


class HilResultsOperator(HITLOperator):
    """Wait (no worker slot) for a hardware-in-the-loop rig to report its results (``await_hil``).

    The rig is an Airflow user (the template's ``hil.reporter``) and reports through Airflow's
    REST API (``closedloop hil report`` does it): option ``Report`` with ``params_input``
    ``{"results": {"metric": value, ...}}``. No report within ``hil.timeout_minutes`` fails the
    run before the gates, without retry. The results become ``hil.<metric>`` for the gates.
    """

    REPORT = "Report"

    def __init__(self, *, loaded: LoadedSpec, **kwargs: Any) -> None:
        hil = loaded.spec.hil
        assert hil is not None
        kwargs.pop("params", None)  # the DAG's request params do not belong in the rig's form
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
        user = event.get("responded_by_user") or {}
        return {"metrics": {f"hil.{k}": float(v) for k, v in results.items()},
                "reported_by": user.get("id") if isinstance(user, dict) else None}

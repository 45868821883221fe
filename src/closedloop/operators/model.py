"""Operators that make and judge a model: training, offline evaluation, release gate, registration."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from closedloop.operators.base import ClosedLoopStepOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.runtime.context import RunContext

log = logging.getLogger(__name__)


class TrainOperator(ClosedLoopStepOperator):
    """Train on the validated snapshot and log the model to MLflow (``train``)."""

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.steps.training import train

        out = train(self.loaded, ctx, labelled=self.upstream(context, "label"),
                    validation=self.upstream(context, "validate_data"), raw=self.upstream(context, "generate_dataset"))
        log.info("model %s from MLflow run %s (%d training rows)", out["model_uri"], out["run_id"], out["train_rows"])
        return out


class OfflineEvalOperator(ClosedLoopStepOperator):
    """Evaluate the model on held-out episodes of the same snapshot (``offline_eval``)."""

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.steps.evaluation import offline_eval

        out = offline_eval(self.loaded, ctx, labelled=self.upstream(context, "label"),
                           trained=self.upstream(context, "train"))
        log.info("offline metrics: %s", {k: v for k, v in out["metrics"].items() if k.count(".") == 1})
        return out


class ReleaseGateOperator(ClosedLoopStepOperator):
    """Apply the template's gates; a failure stops the run and is never retried (``release_gate``)."""

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.steps.gates import format_report, release_gate

        hil = self.upstream(context, "await_hil") if self.loaded.spec.hil else None
        trained = self.upstream(context, "train")  # the model judged (its training data: the shift report)
        out = release_gate(self.loaded, ctx, offline=self.upstream(context, "offline_eval"),
                           simulation=self.simulation(context), hil=hil, trained=trained)
        log.info("all release gates passed:\n%s", format_report(out["report"]))
        return out


class RegisterCandidateOperator(ClosedLoopStepOperator):
    """Register the model version once and point the ``candidate`` alias at it (``register_candidate``)."""

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        """Register, then seal the release record and keep it on the version (``closedloop.release_record``)."""
        import json

        from closedloop.hooks.signing import signer, verifier
        from closedloop.operators.base import request_of, requesters, seal
        from closedloop.operators.governance import requester_of
        from closedloop.runtime import tracking
        from closedloop.steps.governance import PUBLIC_KEY_TAG, RECORD_TAG
        from closedloop.steps.registry import register_candidate

        def keep(record: dict) -> dict:
            sealed = seal(context, {**record, "requester_user": requester_of(context),
                                    "excluded_reviewers": requesters(self.loaded, context)})
            c = tracking.client(ctx)
            c.set_model_version_tag(record["model"], record["version"], RECORD_TAG, json.dumps(sealed, sort_keys=True))
            c.set_registered_model_tag(record["model"], PUBLIC_KEY_TAG, signer().verifier.published())
            return sealed

        request, requester = request_of(self.loaded, context)
        sealed = register_candidate(self.loaded, ctx, trained=self.upstream(context, "train"),
                                    labelled=self.upstream(context, "label"),
                                    gate=self.upstream(context, "release_gate"),
                                    request=request, requester=requester, keep=keep, verifier=verifier())
        out = sealed
        log.info("registered %s version %s as @%s; release record sealed (files %s)", out["model"], out["version"],
                 out["alias"], out["artifact_digest"])
        return sealed

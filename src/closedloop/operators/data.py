"""Operators for the data half of the loop: snapshot, labels, validation."""

from __future__ import annotations

import logging
from datetime import date
from typing import TYPE_CHECKING, Any

from closedloop.operators.base import ClosedLoopStepOperator
from closedloop.runtime.storage import short

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.runtime.context import RunContext

log = logging.getLogger(__name__)


class GenerateDatasetOperator(ClosedLoopStepOperator):
    """Build the raw snapshot for the run's data window (``generate_dataset``).

    :param interval_end: last day (exclusive) of the data window, ``YYYY-MM-DD`` (templated);
        by default the run's data interval end or, for a run without a logical date (allowed in
        Airflow 3: such runs have no data interval), the time the run was due (``run_after``).
    """

    template_fields = ("interval_end",)

    def __init__(self, *, interval_end: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval_end = interval_end

    @staticmethod
    def default_interval_end(context: Context) -> date:
        end = context.get("data_interval_end") or context["dag_run"].run_after
        return end.date()

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        out = self._generate(ctx, context)
        if (out.get("cache") or {}).get("hit"):
            from closedloop.operators.base import seal
            from closedloop.runtime.cache import PLAN_KEY
            from closedloop.runtime.plan import plan_ahead

            context["ti"].xcom_push(key=PLAN_KEY, value=seal(context, plan_ahead(self.loaded, ctx, out), PLAN_KEY))
        return out

    def _generate(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.operators.base import admission, rerun_of
        from closedloop.steps.dataset import generate_dataset
        from closedloop.steps.incidents import focus_of

        rerun = rerun_of(context)
        if rerun:
            from closedloop.runtime.tracking import link_rerun

            link_rerun(self.loaded, ctx, of=str(rerun["of"]))
            if rerun.get("raw") and not rerun.get("fresh_data"):
                out = generate_dataset(self.loaded, ctx, interval_end=date.fromisoformat(rerun["raw"]["window_end"]),
                                       pinned=rerun["raw"])
                log.info("rerun of %s: pinned snapshot %s (%d rows, window %s..%s), not regenerated", rerun["of"],
                         short(out["digest"]), out["rows"], out["window_start"], out["window_end"])
                return out
        end = (date.fromisoformat(str(self.interval_end)[:10]) if self.interval_end
               else self.default_interval_end(context))
        admitted = admission(self.loaded, context)
        focus = focus_of(self.loaded.spec, admitted["focus_types"]) if admitted else None
        out = generate_dataset(self.loaded, ctx, interval_end=end, focus=focus, exclude=self.recalled(ctx))
        log.info("dataset snapshot %s: %d rows, window %s..%s, sampling %s, %s", short(out["digest"]), out["rows"],
                 out["window_start"], out["window_end"], out["focus"] or "uniform",
                 "from the step cache" if out.get("cache", {}).get("hit")
                 else "written" if out["created"] else "already present")
        for e in out.get("excluded") or []:
            log.info("recall %s: source %s %s taken out of the data", e["recall"], e["source"],
                     "..".join(e["window"]) if e.get("window") else "(all of it)")
        return out

    def recalled(self, ctx: RunContext) -> list[dict]:
        """What the deployment's sealed recalls take out of this pipeline's data; a run that would label with a
        recalled label policy is stopped here, before any compute."""
        from closedloop.errors import PermanentError
        from closedloop.hooks.signing import signer, verifier
        from closedloop.runtime import tracking
        from closedloop.steps import recall

        signer()  # the run's first task: the embedded default makes and pins its key here (it seals this result)
        spec, ring, c = self.loaded.spec, verifier(), tracking.client(ctx)
        bad = recall.refused_inputs(c, ring, label_policy=spec.label_policy.ref)
        if bad:
            raise PermanentError(f"label policy {spec.label_policy.ref} is recalled ({bad[0]['id']}: "
                                 f"{bad[0]['reason']}): change label_policy in {self.loaded.path.name} to a fixed "
                                 "version before training again")
        return recall.exclusions(c, ring, list(spec.dataset.sources),
                                 may_exclude=spec.recall.may_exclude if spec.recall else None)


class LabelOperator(ClosedLoopStepOperator):
    """Apply the template's label policy (``label``)."""

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.steps.labeling import label

        out = label(self.loaded, ctx, raw=self.upstream(context, "generate_dataset"))
        log.info("labelled snapshot %s with %s", short(out["digest"]), out["label_policy"])
        return out


class ValidateDataOperator(ClosedLoopStepOperator):
    """Run the template's Great Expectations suite on the labelled snapshot (``validate_data``)."""

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.steps.validation import validate_data

        out = validate_data(self.loaded, ctx, labelled=self.upstream(context, "label"))
        log.info("suite %s: %d expectations passed on snapshot %s", out["suite"], out["evaluated"], short(out["digest"]))
        return out

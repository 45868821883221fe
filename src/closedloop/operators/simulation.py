"""Deferrable operator for the closed-loop simulation."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException

from closedloop.operators.base import ClosedLoopStepOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.steps.context import RunContext

log = logging.getLogger(__name__)


class SimulateOperator(ClosedLoopStepOperator):
    """Launch the simulation job, then defer to :class:`SimulationJobTrigger` (``simulate``).

    While the job runs the task is ``deferred``: it holds no worker slot. A retry re-attaches to
    a job that is still running or already finished instead of starting another one.

    :param poll_interval: seconds between the trigger's looks at the job.
    """

    def __init__(self, *, poll_interval: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poll_interval = poll_interval

    def run_step(self, ctx: RunContext, context: Context) -> None:
        from closedloop.steps.simulation import launch
        from closedloop.triggers.simulation import SimulationJobTrigger

        job = launch(self.loaded, ctx, trained=self.upstream(context, "train"))
        self.defer(
            trigger=SimulationJobTrigger(job_dir=job["job_dir"], pid=job["pid"], host=job["host"],
                                         poll_interval=self.poll_interval),
            method_name="execute_complete",
            timeout=timedelta(minutes=self.loaded.spec.simulation.timeout_minutes),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict:
        if not event or event.get("status") not in ("success", "failed"):
            raise AirflowException(f"simulation trigger sent an unexpected event: {event!r}")
        if event["status"] == "failed":
            raise AirflowException(f"simulation job {event.get('job_dir')} failed: {event.get('error')}\n"
                                   f"{event.get('log_tail', '')}")
        from closedloop.steps.simulation import collect

        out = self.guarded(context, lambda: collect(self.loaded, self.run_context(context), job=event["job_dir"],
                                           trained=self.upstream(context, "train")))
        log.info("simulation metrics: %s", {k: v for k, v in out["metrics"].items() if k.count(".") == 1})
        return out

"""Deferrable operator for the closed-loop simulation."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from closedloop.operators.base import ClosedLoopStepOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.runtime.context import RunContext

log = logging.getLogger(__name__)


class SimulateOperator(ClosedLoopStepOperator):
    """Launch the simulation job; wait for it here up to ``simulation.defer_after_seconds``, then defer
    to :class:`SimulationJobTrigger` (``simulate``).

    While a longer job runs the task is ``deferred``: it holds no worker slot. A retry re-attaches to
    a job that is still running or already finished instead of starting another one.

    With ``simulation.shards`` the DAG maps this task over the shards (``shard``: its index in
    ``shards``, the shard names): each shard is its own job, cached and retried on its own, and
    ``merge_simulation`` combines them.

    :param poll_interval: seconds between the trigger's looks at the job.
    """

    def __init__(self, *, poll_interval: float = 2.0, shard: int | None = None, shards: list[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poll_interval = poll_interval
        self.shard = shard
        self.shards = shards

    def _shard(self):
        from closedloop.steps.simulation import Shard

        return None if self.shard is None else Shard(int(self.shard), len(self.shards or ()))

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.runtime.faults import strike
        from closedloop.steps.simulation import launch, reuse
        from closedloop.triggers.simulation import SimulationJobTrigger

        trained = self.upstream(context, "train")
        shard = self._shard()
        if shard is not None:
            log.info("simulation shard %s (%s)", shard.label, self.shards[shard.index])
        done = reuse(self.loaded, ctx, trained=trained, shard=shard)
        if done is not None:  # finished earlier in this run, or the step cache has it: no job, no deferral
            return done
        job = launch(self.loaded, ctx, trained=trained, shard=shard)
        strike(ctx, "job_launched")
        event = self.wait_inline(job)
        if event is not None:  # a short job: done before it was worth a round trip through the triggerer
            return self._complete(context, event)
        self.defer(
            trigger=SimulationJobTrigger(job_dir=job["job_dir"], pid=job["pid"], host=job["host"],
                                         poll_interval=self.poll_interval,
                                         dead_after=self.loaded.spec.simulation.dead_after_seconds),
            method_name="execute_complete",
            timeout=timedelta(minutes=self.loaded.spec.simulation.timeout_minutes),
        )

    def wait_inline(self, job: dict) -> dict | None:
        """Watch the job from this task for up to ``simulation.defer_after_seconds``: the trigger's
        event if it ended by then, else None (defer). Deferring costs a hand-over to the triggerer
        and a new task process to collect; a short job is cheaper to wait for here."""
        import time

        from closedloop.steps.simulation import poll

        sim = self.loaded.spec.simulation
        deadline = time.monotonic() + sim.defer_after_seconds
        pause = 0.1
        while time.monotonic() < deadline:
            state, details = poll(job["job_dir"], job["pid"], job["host"], sim.dead_after_seconds)
            if state != "running":
                return {"status": state, "job_dir": job["job_dir"], **details}
            time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * 1.5, self.poll_interval)
        log.info("simulation job %s still running after %g s: deferring to the triggerer", job["job_dir"],
                 sim.defer_after_seconds)
        return None

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict:
        out = self.guarded(context, lambda: self._complete(context, event), start=False)
        log.info("simulation metrics: %s", {k: v for k, v in out["metrics"].items() if k.count(".") == 1})
        return self.finish(context, out)

    def _complete(self, context: Context, event: dict[str, Any] | None) -> dict:
        from closedloop.errors import PermanentError, TransientError
        from closedloop.steps.simulation import collect

        if not event or event.get("status") not in ("success", "failed"):
            raise PermanentError(f"simulation trigger sent an unexpected event: {event!r}")
        if event["status"] == "failed":
            message = (f"simulation job {event.get('job_dir')} failed: {event.get('error')}\n"
                       f"{event.get('log_tail', '')}")
            # a job that died without a word (killed, out of memory) may pass; a job that raised will raise again
            raise (TransientError if "exited without a result" in str(event.get("error")) else PermanentError)(message)
        return collect(self.loaded, self.run_context(context), job=event["job_dir"],
                       trained=self.upstream(context, "train"), shard=self._shard())


class MergeSimulationOperator(ClosedLoopStepOperator):
    """Combine the shards of a sharded ``simulate`` into the run's simulation result (``merge_simulation``).

    Each shard's result is believed only with its seal (bound to its map index); the episodes come
    from the shards' MLflow runs, so the gates, the trace and the review read one merged result
    exactly as they read an unsharded simulation's."""

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.steps.simulation import merge, shard_names

        names = shard_names(self.loaded)
        shards = [self.upstream(context, "simulate", map_index=i) for i in range(len(names))]
        out = merge(self.loaded, ctx, trained=self.upstream(context, "train"), shards=shards)
        log.info("merged %d simulation shards (%s): %d episodes", len(names), ", ".join(names), out["episodes"])
        return out

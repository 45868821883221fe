"""Trigger that waits for a simulation job to finish, in the triggerer's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal, TypedDict

from airflow.triggers.base import BaseTrigger, TriggerEvent


class SimulationEvent(TypedDict, total=False):
    """What :class:`SimulationJobTrigger` reports back to the operator."""

    status: Literal["success", "failed"]
    job_dir: str
    result_path: str
    error: str
    log_tail: str


class SimulationJobTrigger(BaseTrigger):
    """Poll a simulation job folder until it holds a result or an error (or the job died: its process
    vanished on this host, or its heartbeat went silent, seen from any host).

    :param job_dir: the job's folder URI (local path or fsspec URI).
    :param pid: process id of a local job, to notice a crash without a result.
    :param host: host name the local process runs on (the pid means nothing elsewhere).
    :param poll_interval: seconds between looks.
    :param dead_after: seconds of heartbeat silence after which the job is declared dead (from any host).
    """

    def __init__(self, *, job_dir: str, pid: int | None = None, host: str | None = None,
                 poll_interval: float = 2.0, dead_after: float = 60.0) -> None:
        super().__init__()
        self.job_dir = job_dir
        self.pid = pid
        self.host = host
        self.poll_interval = poll_interval
        self.dead_after = dead_after

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "closedloop.triggers.simulation.SimulationJobTrigger",
            {"job_dir": self.job_dir, "pid": self.pid, "host": self.host, "poll_interval": self.poll_interval,
             "dead_after": self.dead_after},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from closedloop.steps.simulation import poll

        while True:
            # file-system (maybe object-storage) calls: off the event loop
            state, details = await asyncio.to_thread(poll, self.job_dir, self.pid, self.host, self.dead_after)
            if state != "running":
                event: SimulationEvent = {"status": state, "job_dir": self.job_dir, **details}  # type: ignore[typeddict-item]
                yield TriggerEvent(dict(event))
                return
            await asyncio.sleep(self.poll_interval)

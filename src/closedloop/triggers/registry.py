"""The alias watcher: ``production`` and ``candidate`` against what the pipeline sealed.

In the embedded default nothing stops a person with the MLflow client from moving an alias;
this watcher notices within one poll. Each poll runs
:func:`closedloop.steps.governance.check_aliases` for every governed model (in a thread, never
on the triggerer's event loop) and yields one event per model whose aliases stopped matching
the sealed records — once per distinct finding, again after it was resolved and recurs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

log = logging.getLogger(__name__)


class AliasWatchTrigger(BaseEventTrigger):
    """Watch the ``production``/``candidate`` aliases of ``models``.

    :param models: registered model names, comma-separated (text: event-trigger kwargs must
        hash the same before and after Airflow stores them).
    :param poll_interval: seconds between looks.
    :param mlflow_conn_id: Airflow connection naming MLflow.
    """

    def __init__(self, *, models: str, poll_interval: float = 30.0, mlflow_conn_id: str = "mlflow_default") -> None:
        super().__init__()
        self.models = models
        self.poll_interval = poll_interval
        self.mlflow_conn_id = mlflow_conn_id
        self._reported: dict[str, tuple[str, ...]] = {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("closedloop.triggers.registry.AliasWatchTrigger",
                {"models": self.models, "poll_interval": self.poll_interval, "mlflow_conn_id": self.mlflow_conn_id})

    def check(self) -> dict[str, dict]:
        from closedloop.hooks.mlflow import MLflowHook
        from closedloop.hooks.signing import verifier as trusted_verifier
        from closedloop.runtime.tracking import mlflow_client, not_found
        from closedloop.steps.governance import check_aliases

        hook = MLflowHook(self.mlflow_conn_id)
        os.environ.update(hook.credentials_env())
        client = mlflow_client(hook.tracking_uri())
        verifier = trusted_verifier()
        out = {}
        for model in [m for m in self.models.split(",") if m]:
            try:
                out[model] = check_aliases(client, model, verifier)
            except Exception as exc:
                if not_found(exc):  # no version registered yet
                    continue
                raise
        return out

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                states = await asyncio.to_thread(self.check)
            except Exception as exc:  # MLflow down: keep watching
                log.warning("alias watch: cannot read the registry (%s: %s); again in %g s", type(exc).__name__, exc,
                            self.poll_interval)
                states = {}
            for model, state in states.items():
                found = tuple(state["problems"])
                if found and self._reported.get(model) != found:
                    self._reported[model] = found
                    log.warning("alias watch: %s", "; ".join(found))
                    yield TriggerEvent({"model": model, "problems": list(found), "aliases": state["aliases"]})
                elif not found and model in self._reported:
                    log.info("alias watch: %s matches its sealed records again", model)
                    del self._reported[model]
            await asyncio.sleep(self.poll_interval)

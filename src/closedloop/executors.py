"""Warm tasks: the third-party libraries our steps compute with, imported once in the long-lived
parent that forks every task, so a task starts with them loaded instead of paying seconds of imports.

On Linux, Airflow's LocalExecutor forks its worker processes from the scheduler when it starts, and
each worker forks a process per task (``os.fork``, no exec); Celery's prefork pool forks its pool
processes from the worker's main process, and each of them forks per task in the same way. A module
imported in the parent before those forks is in every task's memory for free (copy-on-write).

Two hooks, both named in Airflow's configuration (no patching):

- ``[core] executor = closedloop.executors.WarmLocalExecutor``: Airflow's LocalExecutor, preloading in
  :meth:`~WarmLocalExecutor.start`, before it forks its workers (the embedded default);
- ``[celery] celery_config_options = closedloop.executors.CELERY_CONFIG``: Airflow's Celery configuration
  unchanged, plus a ``worker_init`` handler that preloads in a Celery worker's main process before
  it forks its pool (the production shape).

What is preloaded is third-party only (:data:`PRELOAD`): never closedloop's own modules or a company's
entry points, whose code is read fresh by every task (the step cache keys on the code on disk, and
the code that runs must be that code). Importing these libraries starts no thread and opens no
file, socket or database handle (checked by ``tests/unit/test_executors.py``); clients, connections,
MLflow's tracking URI and credentials are made in each task process, from that task's environment.

``CLOSEDLOOP_WARM_TASKS=0`` turns it off (every task then imports what it needs itself).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import warnings

from airflow.executors.local_executor import LocalExecutor

log = logging.getLogger(__name__)

#: what the steps compute with, in import order (each pulls in what it needs)
PRELOAD = (
    "numpy", "pandas", "pyarrow", "pyarrow.parquet", "pyarrow.dataset", "scipy.stats", "sklearn",
    "sklearn.ensemble", "mlflow", "mlflow.sklearn", "mlflow.pyfunc", "mlflow.entities", "mlflow.tracking",
    # the stores MLflow's client opens on first use (SQLite in the embedded default: SQLAlchemy, alembic)
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.tracking.rest_store", "git", "great_expectations",
    # skops lists its trusted types at import by looking scipy's ufuncs up in every loaded module
    "skops.io",
    # Airflow's task runner: what a forked task process imports before it calls our code
    "airflow.sdk.execution_time.task_runner",
)


def enabled() -> bool:
    return os.environ.get("CLOSEDLOOP_WARM_TASKS", "1").strip().lower() not in ("0", "false", "no", "off")


def preload(modules: tuple[str, ...] = PRELOAD) -> dict[str, float]:
    """Import ``modules`` here (seconds per module; a module that fails to import is logged and
    skipped: the task that needs it reports the error itself). Never imports closedloop code:
    if a library pulled one in, :class:`RuntimeError` says which (nothing is forked warm then)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no usage reporting (closedloop's __init__ does MLflow's)
    ours = {m for m in sys.modules if _ours(m)}
    took: dict[str, float] = {}
    quiet = logging.getLogger("great_expectations")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its import logs a line per documented function
    try:
        with warnings.catch_warnings():
            # skops's look-ups touch Airflow's deprecated import shims, each of which warns
            warnings.filterwarnings("ignore", message=r"The `airflow\.")
            for name in modules:
                started = time.perf_counter()
                try:
                    importlib.import_module(name)
                except Exception as exc:  # noqa: BLE001 - a missing extra must not stop the scheduler
                    log.warning("warm tasks: cannot preload %s (%s: %s); tasks import it themselves",
                                name, type(exc).__name__, exc)
                    continue
                took[name] = time.perf_counter() - started
    finally:
        quiet.setLevel(level)
    pulled = sorted(m for m in sys.modules if _ours(m) and m not in ours)
    if pulled:
        raise RuntimeError(f"warm tasks: preloading third-party libraries imported closedloop modules {pulled}")
    log.info("warm tasks: preloaded %d modules in %.1f s (%s)", len(took), sum(took.values()),
             ", ".join(f"{m} {s:.1f} s" for m, s in took.items()))
    return took


def _ours(module: str) -> bool:
    return module.startswith("closedloop.") and module != __name__


class WarmLocalExecutor(LocalExecutor):
    """Airflow's LocalExecutor, with :data:`PRELOAD` imported before it forks its workers."""

    def start(self) -> None:
        if enabled() and self.is_mp_using_fork:
            preload()
        super().start()


def _on_celery_worker_init(**_kwargs) -> None:
    if enabled():
        preload()


def _celery_config() -> dict:
    from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
    from celery.signals import worker_init

    worker_init.connect(_on_celery_worker_init, weak=False, dispatch_uid="closedloop.executors")
    return dict(DEFAULT_CELERY_CONFIG)


def __getattr__(name: str):
    # ``[celery] celery_config_options`` names this: Airflow's default Celery configuration, and the
    # preload hooked to the worker's start (only when Celery is in use: nothing here imports it otherwise)
    if name == "CELERY_CONFIG":
        return _celery_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

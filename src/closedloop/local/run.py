"""Run a pipeline end to end through Airflow on this machine, and summarise any run.

Uses ``DAG.test()``: a real DAG run in Airflow's metadata database, each task through
Airflow's task runner, deferrable tasks through their real trigger (run in line). The same
DAG runs unchanged under a scheduler (``make airflow``) or the production shape.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from closedloop import pipeline, settings


def ensure_db() -> None:
    """Create or upgrade Airflow's metadata database (idempotent)."""
    from airflow.utils.db import upgradedb

    with _quiet(settings.home() / "logs" / "airflow-db.log"):
        upgradedb()


@contextlib.contextmanager
def _quiet(logfile: Path, enabled: bool = True):
    """Send this process's stdout/stderr (Airflow's task logs included) to ``logfile``."""
    if not enabled:
        yield
        return
    logfile.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(logfile, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def load_dag(dag_id: str):
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=conf.get("core", "dags_folder"))
    if dag_id not in bag.dags:
        errors = "\n".join(f"{k}: {v}" for k, v in bag.import_errors.items())
        raise LookupError(f"error: DAG {dag_id!r} not found in {conf.get('core', 'dags_folder')}\n{errors}")
    return bag.dags[dag_id]


def run_pipeline(dag_id: str, *, logical_date: str | None = None, quiet: bool = True) -> dict:
    """Run ``dag_id`` once and return :func:`collect_summary` of the run."""
    ensure_db()
    with _quiet(settings.home() / "logs" / "dagbag.log", enabled=quiet):
        dag = load_dag(dag_id)
    when = (datetime.fromisoformat(logical_date).replace(tzinfo=UTC) if logical_date
            else datetime.now(UTC).replace(microsecond=0))
    return run_dag(dag, when, quiet=quiet)


def run_dag(dag, when: datetime, *, quiet: bool = True, conf: dict | None = None) -> dict:
    """``dag.test()`` at logical date ``when`` (with run ``conf``); return the run's summary."""
    dag_id = dag.dag_id
    logfile = settings.home() / "logs" / f"{dag_id}-{when:%Y%m%dT%H%M%S}.log"
    print(f"running pipeline {dag_id} through Airflow (logical date {when.isoformat()})"
          + (f"; task logs: {logfile}" if quiet else ""), flush=True)
    if "approval" in dag.task_ids:
        print("  its `approval` step will wait for a reviewer: decide in the UI of `make airflow` (same stores) "
              "or with `closedloop approve|reject`", flush=True)
    started = time.perf_counter()
    with _quiet(logfile, enabled=quiet):
        dag_run = dag.test(logical_date=when, run_conf=conf)
    summary = collect_summary(dag_id, dag_run.run_id)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["log_file"] = str(logfile) if quiet else None
    return summary


def _place(task_id: str) -> tuple[int, int]:
    """Where a task comes in the step order: ``approval_2`` right after ``approval``."""
    import re

    m = re.fullmatch(r"(.+)_(\d+)", task_id)
    order = pipeline.ORDER
    if task_id not in order and m and m.group(1) in order:
        return order.index(m.group(1)), int(m.group(2))
    return (order.index(task_id) if task_id in order else 99), 0


def collect_summary(dag_id: str, run_id: str) -> dict | None:
    """Everything a person wants to know about one run, from Airflow's records and MLflow."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        dr = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if dr is None:
            return None
        tis = sorted(dr.get_task_instances(session=session), key=lambda ti: (*_place(ti.task_id), ti.map_index))
        xcoms: dict[tuple[str, str], object] = {}
        shards: dict[str, dict[int, object]] = {}  # a mapped task's (sharded simulate's) results by map index
        for row in session.scalars(select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id)):
            xcoms[(row.task_id, row.key, row.map_index)] = XComModel.deserialize_value(row)
            if row.map_index >= 0 and row.key == "return_value":
                shards.setdefault(row.task_id, {})[row.map_index] = _unsealed(XComModel.deserialize_value(row))
        tasks = []
        for ti in tis:
            dur = (ti.end_date - ti.start_date).total_seconds() if ti.end_date and ti.start_date else None
            tasks.append({"task_id": ti.task_id, "state": str(ti.state or "none"), "try_number": ti.try_number,
                          "duration_s": round(dur, 2) if dur is not None else None,
                          "error": xcoms.get((ti.task_id, "error", ti.map_index)),
                          **({"map_index": ti.map_index} if ti.map_index >= 0 else {})})
        results = {t: _unsealed(xcoms.get((t, "return_value", -1))) for t in pipeline.ORDER}
        results |= {t: _unsealed(v) for (t, key, index), v in xcoms.items()  # approval_2, … of a quorum
                    if key == "return_value" and index == -1 and t not in results}
        results |= {t: [found[i] for i in sorted(found)] for t, found in shards.items()}
        summary = {"dag_id": dag_id, "run_id": run_id, "state": str(dr.state),
                   "logical_date": dr.logical_date.isoformat() if dr.logical_date else None,
                   "run_type": str(dr.run_type), "tasks": tasks,
                   "results": results,
                   "cache_plan": _unsealed(xcoms.get(("generate_dataset", "cache_plan", -1))),
                   "sealed": sorted({t for (t, k, _), v in xcoms.items() if isinstance(v, dict) and "_seal" in v
                                     and k == "return_value"})}
    summary["registry"] = _registry_state(summary["results"].get("register_candidate"))
    return summary


def _unsealed(value):
    """A result as the step made it (its seal, checked by the tasks that read it, is not for people)."""
    return {k: v for k, v in value.items() if k != "_seal"} if isinstance(value, dict) else value


def _registry_state(registered: dict | None) -> dict | None:
    if not registered:
        return None
    from closedloop.runtime.tracking import mlflow_client

    c = mlflow_client()
    mv = c.get_model_version(registered["model"], registered["version"])
    return {"model": mv.name, "version": str(mv.version), "aliases": list(mv.aliases), "status": mv.status,
            "source": mv.source, "run_id": mv.run_id,
            "tracking_uri": settings.tracking_uri()}

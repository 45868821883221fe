"""Fault drills: make chosen steps fail on purpose, to prove that retries, idempotency and alerts
work before a real outage does.

Off unless ``CLOSEDLOOP_FAULTS`` names a JSON file (read at every injection point, so a drill can
be started and stopped while Airflow runs). The file holds a list of faults::

    [{"task": "train", "point": "end", "fault": "transient", "tries": [1]},
     {"task": "*", "point": "start", "fault": "permanent", "tries": [1], "dag": "acc_longitudinal"}]

``point``: ``start`` (before the step does anything), ``end`` (after it made everything, before
the task reports success), ``before_finish`` (its work done and recorded, its MLflow run not yet
marked finished) or any point of the crash-point matrix (:func:`matrix`: every point between two
side effects of a step, e.g. ``train``'s ``before_checkpoint``: the model is logged, its run does
not say so yet). ``fault``: ``transient`` (a ``ConnectionResetError``: retried), ``permanent``
(a ``TypeError``, like a bug: not retried), ``kill`` (SIGKILL of the task process) or ``pause``
(hold the task right there — to kill its worker or restart a server at a known moment — for
``seconds`` (default 600) or until the file ``until`` exists; then go on as if nothing happened).
``tries``: the try numbers that fail (default ``[1]``); ``dag``: only this DAG (default: any);
``map_index``: only this mapped task instance (a shard of ``simulate``);
``mark``: a file created when the drill fires (so an operator or a test knows it has);
``once``: fire on the first try that reaches the point, whatever its number (needs ``mark``): a
drill that must strike even when an earlier try failed for another reason.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from closedloop import pipeline

log = logging.getLogger(__name__)

ENV = "CLOSEDLOOP_FAULTS"


def _faults() -> list[dict]:
    path = os.environ.get(ENV)
    if not path or not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        log.warning("fault drill file %s unreadable (%s): no fault injected", path, exc)
        return []
    return data if isinstance(data, list) else [data]


def inject(*, dag_id: str, task_id: str, try_number: int, point: str, map_index: int | None = None) -> None:
    """Raise (or die) here if a drill asks for it; otherwise return at once."""
    if ENV not in os.environ:
        return
    for f in _faults():
        if f.get("task", "*") not in ("*", task_id) or f.get("point", "start") != point:
            continue
        if "map_index" in f and f["map_index"] != map_index:
            continue
        if f.get("dag") not in (None, dag_id):
            continue
        if f.get("once"):  # the first try that gets here, whichever it is (the mark says it has fired)
            if not f.get("mark") or Path(f["mark"]).exists():
                continue
        elif try_number not in f.get("tries", [1]):
            continue
        kind = f.get("fault", "transient")
        where = f"{dag_id}.{task_id} try {try_number} at {point!r}"
        log.warning("FAULT DRILL: injecting a %s fault in %s", kind, where)
        if f.get("mark"):
            _write_mark(Path(f["mark"]), f"{where} pid {os.getpid()}\n")
        if kind == "pause":
            _pause(float(f.get("seconds", 600)), f.get("until"), where)
            continue
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "permanent":
            raise TypeError(f"injected permanent fault (fault drill) in {where}")
        raise ConnectionResetError(f"injected transient fault (fault drill) in {where}")


def strike(ctx, point: str) -> None:
    """:func:`inject` at ``point`` of the step run ``ctx`` (a :class:`~closedloop.runtime.context.RunContext`)."""
    inject(dag_id=ctx.dag_id, task_id=ctx.task_id, try_number=ctx.try_number, point=point,
           map_index=ctx.map_index if ctx.map_index >= 0 else None)


#: The crash-point matrix: for each step, every point between two of its side effects (in order),
#: and what a retry after a crash there does. Every point is an injection point of the step's code;
#: the reliability tests strike each one (a transient error and a SIGKILL) and compare the registry
#: and the data root with an undisturbed run's.
def matrix() -> dict[str, tuple[tuple[str, str], ...]]:
    """The crash-point matrix: step → its points in order and what a retry after a crash there does,
    read from the step table's ``crash_points`` (a row added to the table is in it)."""
    return {s.id: s.crash_points for s in pipeline.STEPS if s.crash_points}


def _pause(seconds: float, until: str | None, where: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and os.path.exists(until)):
        time.sleep(0.2)
    log.warning("FAULT DRILL: pause in %s over, going on", where)


def _write_mark(path: Path, text: str) -> None:
    """Create the mark whole (written aside, then renamed): whoever sees it exists reads all of it."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_text(text)
    os.replace(part, path)

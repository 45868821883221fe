"""Notifications: a local alert record by default (``$CLOSEDLOOP_HOME/alerts.jsonl``) plus the log.

Built on Airflow's ``BaseNotifier`` so e-mail or chat notifiers from Airflow providers can be
used the same way in production.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from airflow.sdk import BaseNotifier

from closedloop import settings

log = logging.getLogger(__name__)


def alerts_path():
    return settings.home() / "alerts.jsonl"


def record_alert(kind: str, message: str, **details) -> dict:
    """Append one alert to the local alert record and log it at WARNING."""
    alert = {"at": datetime.now(UTC).isoformat(), "kind": kind, "message": message, **details}
    path = alerts_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(alert, sort_keys=True, default=str) + "\n")
    log.warning("ALERT %s: %s", kind, message)
    return alert


class LocalAlertNotifier(BaseNotifier):
    """Write an alert naming pipeline, run and task to the local record.

    :param kind: alert kind, e.g. ``review_timeout``.
    :param message: the alert text (templated).
    """

    template_fields = ("message",)

    def __init__(self, *, kind: str, message: str) -> None:
        super().__init__()
        self.kind = kind
        self.message = message

    def notify(self, context) -> None:
        ti = context["ti"]
        record_alert(self.kind, self.message, dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id)


class TaskFailedNotifier(BaseNotifier):
    """``on_failure_callback`` of every pipeline task: a task failed for good — a permanent error,
    or its retries are used up (a try that will be retried calls ``on_retry_callback`` instead).

    The alert names pipeline, run, task, try, error class and cause, with a link to the log.

    :param pipeline: the pipeline (template) name.
    """

    def __init__(self, *, pipeline: str) -> None:
        super().__init__()
        self.pipeline = pipeline

    def notify(self, context) -> None:
        ti = context["ti"]
        exc = context.get("exception")
        try:
            error = ti.xcom_pull(task_ids=ti.task_id, key="error") or {}
        except Exception:  # the alert matters more than its details
            error = {}
        error_class = error.get("error_class") or (type(exc).__name__ if exc else "unknown")
        cause = error.get("message") or (str(exc) if exc else "see the task log")
        record_alert("task_failed", f"{self.pipeline}: task {ti.task_id} failed for good ({error_class}): "
                     f"{cause.splitlines()[0][:300] if cause else ''}",
                     pipeline=self.pipeline, dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
                     try_number=getattr(ti, "try_number", None), error_class=error_class,
                     permanent=bool(error.get("permanent", True)), cause=cause[:2000],
                     log_url=getattr(ti, "log_url", None))

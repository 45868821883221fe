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

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


def failure_alert(context, pipeline: str) -> dict:
    """What every channel says about a task that failed for good: pipeline, run, task, try, error
    class, cause (from the task's ``error`` XCom, else the exception) and the log link."""
    ti = context["ti"]
    exc = context.get("exception")
    try:
        error = ti.xcom_pull(task_ids=ti.task_id, key="error") or {}
    except Exception:  # the alert matters more than its details
        error = {}
    error_class = error.get("error_class") or (type(exc).__name__ if exc else "unknown")
    cause = error.get("message") or (str(exc) if exc else "see the task log")
    first = cause.splitlines()[0][:300] if cause else ""
    return {"kind": "task_failed", "pipeline": pipeline, "dag_id": ti.dag_id, "run_id": ti.run_id,
            "task_id": ti.task_id, "try_number": getattr(ti, "try_number", None), "error_class": error_class,
            "permanent": bool(error.get("permanent", True)), "cause": cause[:2000],
            "log_url": getattr(ti, "log_url", None),
            "message": f"{pipeline}: task {ti.task_id} failed for good ({error_class}): {first}"}


class TaskFailedNotifier(BaseNotifier):
    """``on_failure_callback`` of every pipeline task (alert kind ``local``): a task failed for
    good — a permanent error, or its retries are used up (a try that will be retried calls
    ``on_retry_callback`` instead). Writes the alert to the log and the local alert record.

    :param pipeline: the pipeline (template) name.
    """

    def __init__(self, *, pipeline: str) -> None:
        super().__init__()
        self.pipeline = pipeline

    def notify(self, context) -> None:
        alert = failure_alert(context, self.pipeline)
        record_alert(alert.pop("kind"), alert.pop("message"), **alert)


class WebhookAlertNotifier(BaseNotifier):
    """Post the failure alert to a chat webhook (alert kind ``webhook``): JSON ``{"text": …}``,
    which Slack, Mattermost, Rocket.Chat and Teams incoming webhooks accept, plus the alert's
    fields under ``"alert"``. The URL is the connection's ``host`` when it is a whole URL, else
    it is built from the connection (``http://HOST:PORT/PATH`` as a connection URI); a connection
    password is sent as a bearer token. Secrets stay in the connection.

    :param conn_id: the Airflow connection.
    :param pipeline: the pipeline (template) name.
    """

    def __init__(self, *, conn_id: str, pipeline: str, timeout: float = 10.0) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.pipeline = pipeline
        self.timeout = timeout

    def url(self) -> tuple[str, str | None]:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(self.conn_id)
        host = conn.host or ""
        if not host:
            raise ValueError(f"connection {self.conn_id!r} has no host: set it to the webhook URL")
        if "://" not in host:  # e.g. from a URI 'http://chat.example.com:8065/hooks/abc'
            scheme = conn.conn_type if conn.conn_type in ("http", "https") else "https"
            host = f"{scheme}://{host}{f':{conn.port}' if conn.port else ''}/{(conn.schema or '').lstrip('/')}"
        return host, conn.password or None

    def notify(self, context) -> None:
        alert = failure_alert(context, self.pipeline)
        self.post(alert, f":rotating_light: {alert['message']}\nrun {alert['run_id']} · try {alert['try_number']}"
                  + (f" · log: {alert['log_url']}" if alert.get("log_url") else ""))

    def post(self, alert: dict, text: str) -> None:
        import urllib.request

        url, token = self.url()
        body = json.dumps({"text": text, "alert": alert}, default=str).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - URL from a connection
            log.info("alert posted to webhook %s: HTTP %s", self.conn_id, response.status)


class EmailAlertNotifier(BaseNotifier):
    """E-mail the failure alert through Airflow's SMTP provider (alert kind ``email``).

    :param to: recipients. :param conn_id: the SMTP connection (default ``smtp_default``).
    :param pipeline: the pipeline (template) name.
    """

    def __init__(self, *, to: list[str], pipeline: str, conn_id: str | None = None) -> None:
        super().__init__()
        self.to = list(to)
        self.conn_id = conn_id or "smtp_default"
        self.pipeline = pipeline

    def notify(self, context) -> None:
        self.send(failure_alert(context, self.pipeline))

    def send(self, alert: dict) -> None:
        import html

        from airflow.providers.smtp.hooks.smtp import SmtpHook

        rows = "".join(f"<tr><th align=left>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in alert.items() if k not in ("message", "cause"))
        body = (f"<p>{html.escape(alert['message'])}</p><table>{rows}</table>"
                f"<pre>{html.escape(str(alert.get('cause') or ''))}</pre>")
        with SmtpHook(smtp_conn_id=self.conn_id) as smtp:
            smtp.send_email_smtp(to=self.to, subject=f"[closedloop] {alert['message'][:180]}", html_content=body,
                                 from_email=smtp.from_email or "closedloop@localhost")
        log.info("alert e-mailed to %s through %s", ", ".join(self.to), self.conn_id)


def alert_notifiers(spec) -> list[BaseNotifier]:
    """The template's ``alerts`` as Airflow notifiers (``on_failure_callback`` of every task)."""
    out: list[BaseNotifier] = []
    for a in spec.alerts:
        if a.kind == "local":
            out.append(TaskFailedNotifier(pipeline=spec.name))
        elif a.kind == "webhook":
            out.append(WebhookAlertNotifier(conn_id=a.conn_id, pipeline=spec.name))
        else:
            out.append(EmailAlertNotifier(to=a.to, conn_id=a.conn_id, pipeline=spec.name))
    return out


def announce(spec, kind: str, message: str, **details) -> dict:
    """Tell the template's ``alerts:`` channels something that is not a task failure (a review that
    opened, an alias moved outside the pipeline). Every channel is tried; one failing channel is
    logged and does not silence the others. The local record always gets it."""
    alert = record_alert(kind, message, pipeline=spec.name, **details)
    full = {**alert, "pipeline": spec.name}
    for a in spec.alerts:
        try:
            if a.kind == "webhook":
                WebhookAlertNotifier(conn_id=a.conn_id, pipeline=spec.name).post(full, message)
            elif a.kind == "email":
                EmailAlertNotifier(to=a.to, conn_id=a.conn_id, pipeline=spec.name).send(full)
        except Exception:
            log.warning("could not send %s alert through %s", kind, a.kind, exc_info=True)
    return alert

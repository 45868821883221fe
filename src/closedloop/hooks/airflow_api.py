"""The deployment's read-only account on Airflow's REST API (who posted an incident, from the audit log)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

AIRFLOW_API_CONN_ID = "closedloop_airflow_api"


def service_api(conn_id: str = AIRFLOW_API_CONN_ID):
    """An :class:`~closedloop.records.airflow_api.AirflowAPI` logged in with the deployment's account
    (``host`` = the API server's URL), or None when there is none. The connection is read from the
    environment or the secrets backend only (:mod:`closedloop.hooks.deployment`): one planted in Airflow's
    metadata database could point a retried review at a forged answer."""
    from closedloop.hooks.deployment import connection
    from closedloop.records.airflow_api import AirflowAPI

    try:
        conn = connection(conn_id)
    except Exception as exc:  # unreadable: as if absent, and say so
        log.warning("the Airflow API connection %r is unreadable: %s", conn_id, exc)
        return None
    if conn is None:
        return None
    host = conn.host or ""
    if "://" not in host:
        host = f"{conn.schema or 'http'}://{host}" + (f":{conn.port}" if conn.port else "")
    return AirflowAPI(url=host, user=conn.login, password=conn.password or "")


def set_run_note(dag_id: str, run_id: str, note: str) -> bool:
    """Write the note of a DAG run (what Airflow's UI shows on it) with the deployment's account; False
    (logged) when there is no such account or Airflow refuses — a note is for people, never evidence."""
    api = service_api()
    if api is None:
        log.info("no Airflow API connection: the run's note stays unset (%s)", note)
        return False
    try:
        status, data = api.call("PATCH", f"{api.run_path(dag_id, run_id)}?update_mask=note", {"note": note})
    except Exception as exc:  # noqa: BLE001 - a note never fails the task
        log.warning("cannot set the run's note: %s", exc)
        return False
    if status != 200:
        log.warning("Airflow refused the run's note (HTTP %s): %s", status, (data or {}).get("detail"))
    return status == 200


def poster_of(api, extra: dict[str, Any], at: datetime) -> str | None:
    """The Airflow user who posted the REST asset event with ``extra`` at ``at``, from Airflow's audit
    log (the event itself records no poster). None when the log does not say."""
    import json

    body = {k: v for k, v in (extra or {}).items() if k != "from_rest_api"}
    window = {"after": (at - timedelta(seconds=60)).isoformat(), "before": (at + timedelta(seconds=5)).isoformat()}
    from urllib.parse import urlencode

    status, data = api.call("GET", "/eventLogs?" + urlencode({"event": "create_asset_event", "limit": 100,
                                                              "order_by": "-when", **window}))
    if status != 200:
        log.warning("cannot read Airflow's audit log (HTTP %s): the incident's poster stays unknown", status)
        return None
    for entry in data.get("event_logs") or []:
        try:
            posted = json.loads(entry.get("extra") or "{}").get("extra")
        except ValueError:
            continue
        if posted == body:
            return entry.get("owner")
    return None


def earlier_review(api, dag_id: str, run_id: str, task_id: str, try_number: int) -> dict | None:
    """The human-in-the-loop detail an earlier try of a task opened (its request, and the answer if one
    was given), from Airflow's REST API; None when no earlier try opened one or the API cannot tell.

    Called before this try opens its own request, so a detail still attached to the task instance is
    an earlier try's: Airflow keeps it there when a try ends without being archived (an answer that
    raced the task's own parking is recorded there, then the try is failed "externally"). Archived
    tries are read from ``…/hitlDetails/tries/N``."""
    from urllib.parse import quote

    base = f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}/-1/hitlDetails"
    status, data = api.call("GET", base)
    if status == 200 and isinstance(data, dict):
        return data
    for t in range(try_number - 1, 0, -1):
        status, data = api.call("GET", f"{base}/tries/{t}")
        if status == 200 and isinstance(data, dict):
            return data
        if status not in (404,):
            log.warning("cannot read the review of %s try %s (HTTP %s)", task_id, t, status)
    return None

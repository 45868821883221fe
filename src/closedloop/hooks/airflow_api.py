"""The deployment's read-only account on Airflow's REST API (who posted an incident, from the audit log)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

AIRFLOW_API_CONN_ID = "closedloop_airflow_api"


def service_api(conn_id: str = AIRFLOW_API_CONN_ID):
    """An :class:`~closedloop.records.airflow_api.AirflowAPI` logged in with the connection's account
    (``host`` = the API server's URL; role ``viewer`` suffices), or None when there is none."""
    from airflow.sdk import BaseHook

    from closedloop.records.airflow_api import AirflowAPI

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # not defined
        return None
    host = conn.host or ""
    if "://" not in host:
        host = f"{conn.schema or 'http'}://{host}" + (f":{conn.port}" if conn.port else "")
    return AirflowAPI(url=host, user=conn.login, password=conn.password or "")


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

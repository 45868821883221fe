"""Incident reports through the plugin: the narrow way in for people who report incidents.

``POST /closedloop/api/incidents`` takes the caller's Airflow login (any role: ``viewer`` is enough),
checks it against the template's ``incidents.reporters``, validates the incident and posts the asset
event on ``closedloop://incidents/<model>`` with the deployment's identity — so a reporter needs no
``op`` role (which would also let them create connections, resize pools and post any asset event).
The poster is recorded from the login, in the event (``posted_by``, beside ``from_closedloop``) and
in Airflow's audit log (event ``closedloop.incident.report``). Airflow marks every event posted
through its own REST API ``from_rest_api``; only an event without that mark is believed to come from
here.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException

from closedloop import vocab

AUDIT_EVENT = vocab.AUDIT_INCIDENT_REPORT


def report_incident(login: str, data: Any, pipelines_dir) -> dict:
    """Validate ``data`` as an incident of a model whose template lets ``login`` report; post it.

    :returns: ``{"id", "timestamp", "asset_uri", "incident"}`` of the event. 400 malformed, 403 not a
        reporter of that model's pipeline, 404 no incident DAG (asset) for the model yet.
    """
    from closedloop.spec import load_all
    from closedloop.spec.incident import IncidentError, asset_uri, parse_incident, routes_of

    specs, _ = load_all(pipelines_dir)
    try:
        incident = parse_incident(data, routes_of(specs))
    except (IncidentError, ValueError) as exc:
        raise HTTPException(status_code=400, detail=f"{exc}; nothing was reported") from None
    allowed = sorted({r for s in specs if s.spec.incidents is not None and s.spec.model.name == incident["model"]
                      for r in s.spec.incidents.reporters})
    if login not in allowed:
        raise HTTPException(status_code=403, detail=(
            f"{login!r} may not report incidents of {incident['model']}: the template's incidents.reporters are "
            f"{', '.join(allowed) or 'nobody'}"))
    extra = {vocab.EVENT_FROM_CLOSEDLOOP: True, vocab.EVENT_POSTED_BY: login, "payload": incident}
    event = _post(asset_uri(incident["model"]), extra, login)
    if event is None:
        raise HTTPException(status_code=404, detail=f"Airflow does not know the incident asset "
                                                    f"{asset_uri(incident['model'])} yet (has its DAG been parsed?)")
    return {**event, "asset_uri": asset_uri(incident["model"]), "incident": incident}


def _post(uri: str, extra: dict, login: str) -> dict | None:
    """The asset event, written by the API server itself (no person's REST right involved), and its
    audit-log entry, in one transaction."""
    from airflow.assets.manager import asset_manager
    from airflow.models.asset import AssetModel
    from airflow.models.log import Log
    from airflow.utils import timezone
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        model = session.scalar(select(AssetModel).where(AssetModel.uri == uri).limit(1))
        if model is None:
            return None
        event = asset_manager.register_asset_change(asset=model, timestamp=timezone.utcnow(), extra=extra,
                                                    session=session)
        if event is None:
            return None
        session.add(Log(event=AUDIT_EVENT, owner=login, extra=json.dumps(
            {"asset_uri": uri, "asset_event_id": event.id, "incident_id": extra["payload"].get("id")})))
        session.flush()
        return {"id": int(event.id), "timestamp": event.timestamp.isoformat()}

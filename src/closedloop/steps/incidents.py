"""Step ``admit_incident``: which incidents an incident run answers, or why it answers none.

Pure (no Airflow, no MLflow): the operator hands in the run's asset events and the last
admission per scenario type (kept in Airflow's asset state store) and gets a decision.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from closedloop import vocab
from closedloop.errors import PermanentError
from closedloop.spec import PipelineSpec
from closedloop.spec.incident import SEVERITIES, IncidentError, parse_incident, payload_of, summary

STATE_PREFIX = "admitted."


def admit(spec: PipelineSpec, events: list[dict[str, Any]], last: dict[str, dict], *, run_id: str,
          rerun: bool = False) -> dict[str, Any]:
    """Decide an incident run.

    :param events: ``{"extra": ..., "timestamp": datetime}`` per asset event of the run (or one
        made from the run's ``conf`` for a manual run).
    :param last: scenario type → the last admission ``{"run_id", "incident_id", "event_at"}``.
    :param rerun: an explicit rerun of an earlier incident run (``closedloop rerun``): never debounced,
        and it records no admission.
    :return: ``{"admitted", "incidents", "focus_types", "merged_into", "rejected", "state"}``;
        ``state`` holds the admissions to record (scenario type → admission).
    :raises PermanentError: when no event holds a valid incident (each problem named).
    """
    assert spec.incidents is not None
    routes = {spec.model.name: spec.incident_scenarios()}
    valid: list[tuple[dict, datetime]] = []
    rejected: list[str] = []
    for n, event in enumerate(events, 1):
        try:
            incident = parse_incident(payload_of(event.get("extra")), routes)
        except IncidentError as exc:
            rejected.append(f"event {n} ({event['timestamp'].isoformat()}): " + "; ".join(exc.problems))
            continue
        except (RecursionError, ValueError, TypeError, OverflowError) as exc:  # hostile shape: never drops the rest
            rejected.append(f"event {n} ({event['timestamp'].isoformat()}): unreadable ({type(exc).__name__})")
            continue
        valid.append(({**incident, "posted_by": event.get("posted_by")}, event["timestamp"]))
    if not valid:
        raise PermanentError("rejected: no valid incident in this run's events, nothing to retrain:\n"
                             + "\n".join(f"  - {r}" for r in rejected or ["no events (trigger the DAG with an "
                                                                          "incident in conf {\"incident\": {...}})"]))
    window = timedelta(minutes=spec.incidents.debounce_minutes)
    admitted: list[dict] = []
    merged_into: dict[str, str] = {}
    state: dict[str, dict] = {}
    for incident, at in sorted(valid, key=lambda v: (-SEVERITIES.index(v[0]["severity"]), v[1])):
        kind = incident["scenario_type"]
        prev = state.get(kind) or last.get(kind)
        if rerun:
            admitted.append({**incident, "received_at": at.isoformat()})
            continue
        if prev and prev["run_id"] != run_id and at - datetime.fromisoformat(prev["event_at"]) < window:
            merged_into[incident["id"]] = prev["run_id"]
            continue
        admitted.append({**incident, "received_at": at.isoformat()})
        state.setdefault(kind, {"run_id": run_id, "incident_id": incident["id"], "event_at": at.isoformat()})
    return {
        "admitted": bool(admitted),
        "incidents": admitted,
        "focus_types": sorted({i["scenario_type"] for i in admitted}),
        "merged_into": merged_into,
        "rejected": rejected,
        "state": state,
    }


def incident_request(spec: PipelineSpec, incidents: list[dict]) -> dict[str, Any]:
    """The model update request an incident run makes (what reviewers read)."""
    first = incidents[0]
    types = sorted({i["scenario_type"] for i in incidents})
    return {
        "purpose": (f"Incident retrain of {spec.model.name}: " + "; ".join(summary(i) for i in incidents))[:2000],
        "change": ["data"],
        "expected_impact": (f"No failure in {', '.join(types)} scenarios in simulation (gates), from "
                            f"{spec.incidents.focus:g}x more {', '.join(types)} logs; no regression elsewhere."),
        "scope": ", ".join(types),
        "ticket": first["id"],
    }


def origin_tags(incidents: list[dict]) -> dict[str, str]:
    """Lineage tags for the MLflow runs and the model version of an incident run."""
    first = incidents[0]
    return {
        vocab.TRIGGER: "incident",
        vocab.INCIDENT_PREFIX + "id": ",".join(i["id"] for i in incidents)[:5000],
        vocab.INCIDENT_PREFIX + "scenario_type": ",".join(sorted({i["scenario_type"] for i in incidents})),
        vocab.INCIDENT_PREFIX + "severity": first["severity"],
        vocab.INCIDENT_PREFIX + "kind": first["kind"],
        vocab.INCIDENT_PREFIX + "reported_by": first.get("reported_by") or "",
        vocab.INCIDENT_PREFIX + "posted_by": ",".join(sorted({i.get("posted_by") or "unknown" for i in incidents})),
        vocab.INCIDENT_PREFIX + "log_refs": ",".join(r for i in incidents for r in i["log_refs"])[:5000],
    }


def focus_of(spec: PipelineSpec, focus_types: list[str]) -> dict[str, float]:
    """Generator ``focus``: the template's sampling, times ``incidents.focus`` for the incident's types."""
    focus = {k: float(v) for k, v in spec.dataset.sampling.items()}
    for kind in focus_types:
        focus[kind] = focus.get(kind, 1.0) * spec.incidents.focus
    return focus

"""Incidents: what the fleet reports, checked the same way on every channel.

An incident (a collision, a disengagement, a near miss, a degraded production KPI) names the
model it concerns, the scenario type it happened in and a severity, plus optional log
references. It reaches Airflow as an asset event on the model's incident asset
(``closedloop://incidents/<model>``): posted through the REST API, dropped as a JSON file in
the incident inbox, raised by the KPI watcher, or sent by ``closedloop incident report``. Each
channel validates with :func:`parse_incident` against the routes (model → the scenario types its
pipeline answers), so a malformed incident is refused with a message naming the field, and
nothing starts. Light on purpose: imported at DAG parse time and in the triggerer.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Any

from closedloop import vocab

SEVERITIES = ("low", "medium", "high", "critical")
KINDS = ("collision", "disengagement", "near_miss", "kpi_degradation", "other")
FIELDS = ("id", "model", "scenario_type", "severity", "kind", "occurred_at", "log_refs", "vehicle",
          "description", "reported_by", "scenario")
PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
MAX_PARAMS = 20
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
MAX_LOG_REFS = 100


class IncidentError(ValueError):
    """A malformed incident: ``problems`` lists each field's problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid incident:\n" + "\n".join(f"  - {p}" for p in problems))


def asset_uri(model: str) -> str:
    return f"closedloop://incidents/{model}"


def asset_name(model: str) -> str:
    return f"closedloop_incidents__{model}"


def routes_of(specs) -> dict[str, list[str]]:
    """Model name → incident scenario types, for every template with an ``incidents:`` section."""
    return {s.spec.model.name: s.spec.incident_scenarios() for s in specs if s.spec.incidents is not None}


_SHOWABLE = re.compile(r"^[A-Za-z0-9 _.:/@+-]{1,40}$")
_SECRETISH = re.compile(r"[A-Za-z0-9_+/=-]{20,}|(?i:secret|token|passw|bearer|api[_-]?key|private)")


def shown(value: Any) -> str:
    """A value from an incident as an error message may quote it: short plain words and numbers as
    they are; anything long, structured or secret-like only by its kind and size (an error reason
    is logged and kept in files: it must not copy a credential someone pasted into a field)."""
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str) and _SHOWABLE.match(value) and not _SECRETISH.search(value):
        return repr(value)
    if isinstance(value, str | bytes):
        return f"a text of {len(value)} characters (not shown)"
    if isinstance(value, dict | list | tuple):
        return f"a {type(value).__name__} of {len(value)} items (not shown)"
    return f"a {type(value).__name__} (not shown)"


def _text(data: dict, name: str, limit: int, problems: list[str], *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        if required:
            problems.append(f"{name}: required")
        return None
    if not isinstance(value, str):
        problems.append(f"{name}: expected text, got {shown(value)}")
        return None
    if len(value) > limit:
        problems.append(f"{name}: {len(value)} characters, at most {limit} allowed")
        return None
    return value


def parse_incident(data: Any, routes: dict[str, list[str]]) -> dict[str, Any]:
    """Check an incident against the known models and their scenario types.

    :param data: the incident as a mapping (JSON object).
    :param routes: model name → scenario types its incident pipeline answers.
    :return: the normalized incident (a JSON-ready dict with every field of :data:`FIELDS`;
        ``id`` is derived from the content when the reporter gave none, so a re-sent incident
        keeps its id).
    :raises IncidentError: naming every problem, e.g. ``severity: expected one of [...], got 'urgent'``.
    """
    if not isinstance(data, dict):
        raise IncidentError([f"expected a JSON object with fields {list(FIELDS)}, got {type(data).__name__}"])
    problems: list[str] = []
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        problems.append(f"unknown field(s) [{', '.join(shown(k) for k in unknown[:10])}"
                        f"{', …' if len(unknown) > 10 else ''}]; expected some of {list(FIELDS)}")
    model = _text(data, "model", 100, problems, required=True)
    if model is not None and model not in routes:
        known = ", ".join(sorted(routes)) or "none: no template has an 'incidents:' section"
        problems.append(f"model: unknown model {shown(model)}; models that take incidents: {known}")
    scenario = _text(data, "scenario_type", 100, problems, required=True)
    if scenario is not None and model in routes and scenario not in routes[model]:
        problems.append(f"scenario_type: {shown(scenario)} is not a scenario type the pipeline of {model!r} answers; "
                        f"expected one of {routes[model]}")
    severity = data.get("severity")
    if severity is None:
        problems.append(f"severity: required, one of {list(SEVERITIES)}")
    elif severity not in SEVERITIES:
        problems.append(f"severity: expected one of {list(SEVERITIES)}, got {shown(severity)}")
    kind = data.get("kind", "other")
    if kind not in KINDS:
        problems.append(f"kind: expected one of {list(KINDS)}, got {shown(kind)}")
    incident_id = data.get("id")
    if incident_id is not None and (not isinstance(incident_id, str) or not ID_RE.match(incident_id)):
        problems.append(f"id: expected 1-100 letters, digits, '_', '.', ':' or '-', got {shown(incident_id)}")
    occurred = data.get("occurred_at")
    if occurred is not None:
        try:
            occurred = datetime.fromisoformat(str(occurred).replace("Z", "+00:00")).isoformat()
        except ValueError:
            problems.append(f"occurred_at: expected an ISO 8601 time like 2026-11-26T08:15:00Z, got {shown(occurred)}")
    refs = data.get("log_refs", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) and 0 < len(r) <= 500 for r in refs):
        problems.append(f"log_refs: expected a list of log URIs (text, up to 500 characters each), got {shown(refs)}")
    elif len(refs) > MAX_LOG_REFS:
        problems.append(f"log_refs: {len(refs)} references, at most {MAX_LOG_REFS} allowed")
    replay = _scenario(data.get("scenario"), problems)
    vehicle = _text(data, "vehicle", 100, problems)
    description = _text(data, "description", 2000, problems)
    reported_by = _text(data, "reported_by", 100, problems)
    if problems:
        raise IncidentError(problems)
    incident = {"model": model, "scenario_type": scenario, "severity": severity, "kind": kind,
                "occurred_at": occurred, "log_refs": list(refs), "vehicle": vehicle,
                "description": description, "reported_by": reported_by}
    if replay:
        incident["scenario"] = replay
    if incident_id is None:
        canonical = json.dumps(incident, sort_keys=True, separators=(",", ":"))
        incident_id = "inc-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
    return {"id": incident_id, **incident}


def _scenario(value: Any, problems: list[str]) -> dict[str, Any] | None:
    """``scenario``: what the incident's regression scenario replays — ``params`` (name → number, the
    values the simulator would otherwise draw, e.g. ``{"decel": 9.5, "gap": 14}``) and ``seed``."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"params", "seed"}:
        problems.append(f"scenario: expected an object with 'params' (name -> number) and/or 'seed' (integer), "
                        f"got {shown(value)}")
        return None
    out: dict[str, Any] = {}
    params = value.get("params", {})
    if not isinstance(params, dict) or len(params) > MAX_PARAMS:
        problems.append(f"scenario.params: expected up to {MAX_PARAMS} names with numbers, got {shown(params)}")
    else:
        for k, v in params.items():
            if not isinstance(k, str) or not PARAM_RE.match(k):
                problems.append(f"scenario.params: {shown(k)} is not a parameter name (letters, digits, '_')")
            elif isinstance(v, bool) or not isinstance(v, int | float) or v != v or v in (float("inf"), float("-inf")):
                problems.append(f"scenario.params.{k}: expected a finite number, got {shown(v)}")
        out["params"] = {k: float(v) for k, v in params.items()}
    seed = value.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            problems.append(f"scenario.seed: expected an integer from 0 to 2147483647, got {shown(seed)}")
        else:
            out["seed"] = seed
    return out


def payload_of(extra: Any) -> Any:
    """The incident inside an asset event's ``extra``: watchers wrap it (``from_trigger``/``payload``;
    a queue message's body is JSON text), a REST post carries it as is."""
    if isinstance(extra, dict) and extra.get("from_trigger") and "payload" in extra:
        extra = extra["payload"]
    elif isinstance(extra, dict) and extra.get(vocab.EVENT_FROM_CLOSEDLOOP) and "from_rest_api" not in extra \
            and "payload" in extra:  # posted by the plugin for a reporter
        extra = extra["payload"]
    elif isinstance(extra, dict) and "from_rest_api" in extra:  # Airflow marks events posted by REST
        extra = {k: v for k, v in extra.items() if k != "from_rest_api"}
    if isinstance(extra, str | bytes):  # a queue message body
        try:
            return json.loads(extra)
        except ValueError:
            return extra
    return extra


def summary(incident: dict[str, Any]) -> str:
    return (f"{incident['id']}: {incident['kind']} in {incident['scenario_type']} "
            f"({incident['severity']}) on {incident['model']}")

"""Model update requests: why a run exists. One schema for the Airflow trigger form (DAG
params), the REST API (Airflow validates ``conf`` against the params) and ``closedloop request``.

Scheduled runs carry a request too, made from the template (their params' defaults): a
schedule is a standing request. Airflow requires a scheduled DAG's params to have valid
defaults, so a manual trigger that omits a field gets the scheduled request's value for it;
``closedloop request`` always demands purpose, change and impact.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from closedloop.spec import PipelineSpec

CHANGE_KINDS = ("data", "label_policy", "architecture", "hyperparameters", "code", "other")
LIMITS = {"purpose": 2000, "expected_impact": 2000, "scope": 500, "ticket": 200}
FIELDS = ("purpose", "change", "expected_impact", "scope", "ticket")


def scheduled_request(spec: PipelineSpec) -> dict[str, Any]:
    """The request every scheduled run of ``spec`` makes."""
    first = spec.description.strip().split(". ")[0].rstrip(".")
    return {
        "purpose": f"Scheduled retraining ({spec.schedule or 'no schedule'}): {first}."[:LIMITS["purpose"]],
        "change": ["data"],
        "expected_impact": "Same or better metrics on fresher fleet data; no gate regression.",
        "scope": "all scenarios of the template",
        "ticket": "",
    }


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON schema per request field (what Airflow's ``Param`` validates)."""
    return {
        "purpose": {"type": "string", "minLength": 10, "maxLength": LIMITS["purpose"],
                    "title": "Purpose", "description": "Why this model update is requested (at least 10 characters)."},
        "change": {"type": "array", "minItems": 1, "uniqueItems": True,
                   "items": {"type": "string", "enum": list(CHANGE_KINDS)},
                   "title": "What changed", "description": "One or more of: " + ", ".join(CHANGE_KINDS) + "."},
        "expected_impact": {"type": "string", "minLength": 5, "maxLength": LIMITS["expected_impact"],
                            "title": "Expected impact", "description": "What should get better, and what must not get worse."},
        "scope": {"type": "string", "maxLength": LIMITS["scope"], "title": "Scope",
                  "description": "Vehicles, regions or operational design domain concerned."},
        "ticket": {"type": "string", "maxLength": LIMITS["ticket"], "title": "Linked incident or ticket",
                   "description": "Optional incident id or ticket URL."},
    }


class RerunPin(BaseModel):
    """The raw snapshot a rerun reads again, named by its digest only: where it lives follows from the
    deployment's data root and the pipeline (a conf never names a file, a URI or a host)."""

    model_config = ConfigDict(extra="forbid")

    digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="the snapshot's full sha256")
    window_start: date
    window_end: date
    rows: int | None = Field(default=None, ge=0)
    sources: list[str] | None = None
    scenarios: list[str] | None = None
    focus: dict[str, float] | None = None
    excluded: list[dict[str, Any]] | None = None


class RerunConf(BaseModel):
    """``closedloop_rerun`` in a run's conf: which earlier run this one repeats, and its pinned snapshot.

    Not a DAG param (it is nobody's to fill in a trigger form): the run's first step checks it before any
    compute (:func:`parse_rerun`) and the dataset step checks the pinned file again where it reads it."""

    model_config = ConfigDict(extra="forbid")

    of: str = Field(pattern=r"^[A-Za-z0-9_.-]+/\S+$", max_length=500, description="DAG_ID/RUN_ID of the original")
    fresh_data: bool = False
    no_cache: bool = False
    raw: RerunPin | None = None


def parse_rerun(value: Any) -> dict[str, Any]:
    """``closedloop_rerun`` checked: the same dict, or :class:`ValueError` naming every problem
    (e.g. ``closedloop_rerun.raw.uri: extra inputs are not permitted``)."""
    try:
        return RerunConf.model_validate(value).model_dump(mode="json", exclude_none=True)
    except ValidationError as exc:
        problems = [f"closedloop_rerun.{'.'.join(map(str, e['loc']))}: {e['msg'].lower()}" if e["loc"]
                    else f"closedloop_rerun: {e['msg'].lower()}" for e in exc.errors()]
        raise ValueError("invalid rerun in the run's conf (a rerun names its snapshot by digest only):\n"
                         + "\n".join(f"  - {p}" for p in problems)) from None


def dag_params(spec: PipelineSpec) -> dict[str, Any]:
    """``Param`` objects for the DAG (imported lazily: airflow.sdk is already loaded at parse time)."""
    from airflow.sdk import Param

    defaults = scheduled_request(spec)
    return {name: Param(defaults[name], **schema) for name, schema in json_schemas().items()}


def validate_request(data: dict[str, Any]) -> dict[str, Any]:
    """Check a request as Airflow will (same schemas), with messages that name the field.

    :raises ValueError: listing every problem, e.g. ``purpose: 3 characters, at least 10 needed``.
    """
    problems = []
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        problems.append(f"unknown field(s) {unknown}; expected {list(FIELDS)}")
    for name, schema in json_schemas().items():
        value = data.get(name)
        if value is None:
            if name in ("purpose", "change", "expected_impact"):
                problems.append(f"{name}: required")
            continue
        if schema["type"] == "string":
            if not isinstance(value, str):
                problems.append(f"{name}: expected text, got {type(value).__name__}")
            elif len(value) < schema.get("minLength", 0):
                problems.append(f"{name}: {len(value)} characters, at least {schema['minLength']} needed")
            elif len(value) > schema["maxLength"]:
                problems.append(f"{name}: {len(value)} characters, at most {schema['maxLength']} allowed")
        else:
            bad = [v for v in value if v not in CHANGE_KINDS] if isinstance(value, list) else [value]
            if not isinstance(value, list) or not value or bad:
                problems.append(f"{name}: expected one or more of {list(CHANGE_KINDS)}, got {value!r}")
    if problems:
        raise ValueError("invalid model update request:\n" + "\n".join(f"  - {p}" for p in problems))
    return {k: data.get(k, "") for k in FIELDS}

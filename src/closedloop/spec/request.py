"""Model update requests: why a run exists. One schema for the Airflow trigger form (DAG
params), the REST API (Airflow validates ``conf`` against the params) and ``closedloop request``.

Scheduled runs carry a request too, made from the template (their params' defaults): a
schedule is a standing request. Airflow requires a scheduled DAG's params to have valid
defaults, so a manual trigger that omits a field gets the scheduled request's value for it;
``closedloop request`` always demands purpose, change and impact.
"""

from __future__ import annotations

from typing import Any

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


def rerun_schema(spec: PipelineSpec, data_root: str) -> dict[str, Any]:
    """JSON schema of ``closedloop_rerun`` (what ``closedloop rerun`` puts in a run's conf).

    Airflow validates it when the run is created (REST, UI, CLI: 400 before any run exists): a pinned
    snapshot can only be this pipeline's raw snapshot under the configured data root, named by its
    full sha256 — never a ``file://`` or ``http://`` URI of the caller's choosing. The step checks it
    again at run time (:func:`closedloop.steps.dataset.check_pin`)."""
    import re

    digest = "[0-9a-f]{64}"
    day = r"^\d{4}-\d{2}-\d{2}$"
    return {
        "type": ["object", "null"], "title": "Rerun (set by closedloop rerun; leave empty)",
        "description": "Which earlier run this run repeats, and its pinned raw snapshot.",
        "additionalProperties": False,
        "properties": {
            "of": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+/\S+$", "maxLength": 500},
            "fresh_data": {"type": "boolean"},
            "no_cache": {"type": "boolean"},
            "raw": {"type": "object", "required": ["uri", "digest", "window_start", "window_end"], "properties": {
                "uri": {"type": "string",
                        "pattern": f"^{re.escape(data_root)}/{re.escape(spec.name)}/raw/{digest}\\.parquet$"},
                "digest": {"type": "string", "pattern": f"^{digest}$"},
                "window_start": {"type": "string", "pattern": day},
                "window_end": {"type": "string", "pattern": day},
            }},
        },
        "required": ["of"],
    }


def dag_params(spec: PipelineSpec) -> dict[str, Any]:
    """``Param`` objects for the DAG (imported lazily: airflow.sdk is already loaded at parse time)."""
    from airflow.sdk import Param

    defaults = scheduled_request(spec)
    params = {name: Param(defaults[name], **schema) for name, schema in json_schemas().items()}
    return {**params, **rerun_params(spec)}


def rerun_params(spec: PipelineSpec) -> dict[str, Any]:
    """The ``closedloop_rerun`` param (both DAGs of a pipeline: a rerun's conf is checked on creation)."""
    from airflow.sdk import Param

    from closedloop import settings, vocab

    return {vocab.CONF_RERUN: Param(None, **rerun_schema(spec, settings.data_root()))}


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

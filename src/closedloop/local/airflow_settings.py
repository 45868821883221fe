"""``airflow_settings.yaml`` (the Astro CLI format: connections, pools, variables) applied to any
Airflow through its REST API: ``closedloop settings apply [FILE]``.

Idempotent: what exists with the same values is left alone, what differs is updated, what is
missing is created; the command says which. Secrets never sit in the file: any string may be
``${ENV_VAR}`` (taken from the environment when applying), and a literal ``conn_password`` is
refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from closedloop.errors import SpecError

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
CONN_FIELDS = {"conn_id": "connection_id", "conn_type": "conn_type", "conn_host": "host", "conn_schema": "schema",
               "conn_login": "login", "conn_password": "password", "conn_port": "port", "conn_extra": "extra",
               "conn_description": "description"}
POOL_FIELDS = {"pool_name", "pool_slot", "pool_description", "include_deferred"}
VAR_FIELDS = {"variable_name", "variable_value", "variable_description"}


def _expand(value: Any, where: str, problems: list[str]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                problems.append(f"{where}: environment variable {m.group(1)} is not set")
                return ""
            return os.environ[m.group(1)]
        return ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}", problems) for k, v in value.items()}
    return value


def load_settings(path: str | Path) -> dict[str, list[dict]]:
    """Parse and check the file: ``{"connections": [...], "pools": [...], "variables": [...]}`` as REST bodies.

    :raises SpecError: naming the file and every bad field.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such settings file", path=str(path)) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}", path=str(path)) from None
    problems: list[str] = []
    root = (data or {}).get("airflow") if isinstance(data, dict) else None
    if not isinstance(root, dict):
        raise SpecError(f"{path}: expected a mapping 'airflow:' with connections, pools and variables", path=str(path))
    out: dict[str, list[dict]] = {"connections": [], "pools": [], "variables": []}
    for key in root:
        if key not in out:
            problems.append(f"airflow.{key}: unknown section (expected connections, pools, variables)")
    for i, c in enumerate(root.get("connections") or []):
        where = f"airflow.connections[{i}]"
        if not isinstance(c, dict) or not c.get("conn_id") or not c.get("conn_type"):
            problems.append(f"{where}: needs conn_id and conn_type")
            continue
        for k in c:
            if k not in CONN_FIELDS:
                problems.append(f"{where}.{k}: unknown field (expected {', '.join(CONN_FIELDS)})")
        if c.get("conn_password") and not ENV_REF.fullmatch(str(c["conn_password"])):
            problems.append(f"{where}.conn_password: a literal password; write ${{ENV_VAR}} and set it when applying "
                            "(secrets never go in this file)")
        body = {CONN_FIELDS[k]: _expand(v, f"{where}.{k}", problems) for k, v in c.items() if k in CONN_FIELDS}
        if isinstance(body.get("extra"), dict):
            body["extra"] = json.dumps(body["extra"], sort_keys=True) if body["extra"] else None
        if body.get("port") not in (None, ""):
            try:
                body["port"] = int(body["port"])
            except (TypeError, ValueError):
                problems.append(f"{where}.conn_port: expected a number, got {c['conn_port']!r}")
        out["connections"].append(body)
    for i, p in enumerate(root.get("pools") or []):
        where = f"airflow.pools[{i}]"
        if not isinstance(p, dict) or not p.get("pool_name") or not isinstance(p.get("pool_slot"), int) \
                or p["pool_slot"] < 0:
            problems.append(f"{where}: needs pool_name and pool_slot (a number >= 0)")
            continue
        problems += [f"{where}.{k}: unknown field (expected {', '.join(sorted(POOL_FIELDS))})" for k in p
                     if k not in POOL_FIELDS]
        out["pools"].append({"name": p["pool_name"], "slots": p["pool_slot"],
                             "description": p.get("pool_description"),
                             "include_deferred": bool(p.get("include_deferred", False))})
    for i, v in enumerate(root.get("variables") or []):
        where = f"airflow.variables[{i}]"
        if not isinstance(v, dict) or not v.get("variable_name") or "variable_value" not in v:
            problems.append(f"{where}: needs variable_name and variable_value")
            continue
        problems += [f"{where}.{k}: unknown field (expected {', '.join(sorted(VAR_FIELDS))})" for k in v
                     if k not in VAR_FIELDS]
        value = _expand(v["variable_value"], f"{where}.variable_value", problems)
        out["variables"].append({"key": v["variable_name"], "description": v.get("variable_description"),
                                 "value": value if isinstance(value, str) else json.dumps(value)})
    if problems:
        raise SpecError(f"{path}: " + "\n  ".join(["invalid settings:", *problems]), path=str(path), problems=problems)
    return out


def _differs(want: dict, have: dict, fields: list[str]) -> list[str]:
    return [f for f in fields if want.get(f) not in (None, "") and str(want.get(f)) != str(have.get(f))]


def apply_settings(api, settings: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """Create or update each item through the REST API; returns ``(kind, name, created|updated|unchanged)``."""
    from closedloop.records.airflow_api import AirflowAPIError

    done = []
    kinds = (("connections", "connection_id", "/connections", ["conn_type", "host", "schema", "login", "port", "extra",
                                                              "description"]),
             ("pools", "name", "/pools", ["slots", "description", "include_deferred"]),
             ("variables", "key", "/variables", ["value", "description"]))
    for kind, id_field, base, fields in kinds:
        for body in settings[kind]:
            name = body[id_field]
            body = {k: v for k, v in body.items() if v is not None}
            have = api.get(f"{base}/{api.q(name)}", missing_ok=True)
            if have is None:
                status, answer = api.call("POST", base, body)
                state = "created"
            else:
                changed = _differs(body, have, fields) + (["password"] if body.get("password") else [])
                if not changed:
                    done.append((kind, name, "unchanged"))
                    continue
                mask = "&".join(f"update_mask={f}" for f in changed)
                status, answer = api.call("PATCH", f"{base}/{api.q(name)}?{mask}", body)
                state = "updated"
            if status not in (200, 201):
                raise AirflowAPIError(f"{kind[:-1]} {name!r}: Airflow answered HTTP {status}: "
                                      f"{(answer or {}).get('detail')}", status)
            done.append((kind, name, state))
    return done

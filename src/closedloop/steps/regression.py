"""Every admitted incident becomes a permanent regression scenario of its model.

An incident run's ``admit_incident`` adds one scenario per admitted incident to the model's
regression catalog: the incident's scenario type, the parameters it reported (``scenario.params``;
else the type's own random draws with a seed fixed by the incident id) and its own seed, simulated
``incidents.regression_repeats`` times and marked safety-critical. Every later candidate of the
model simulates all of them beside the template's scenario set (gate ``sim.regression.collision_rate``;
the gate report names each failing incident).

Storage: one JSON file per incident under ``<data root>/_regression/<model>/`` (written once: a
re-admitted incident keeps its first scenario; a concurrent admission of another incident writes
another file, so nothing needs a lock). Each file records the incident and the run that added it
(its lineage). The catalog's version is its number of scenarios with the sha256 of their canonical
JSON (``v3-1f2e…``): part of the simulation's cache key and of the trace.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

FOLDER = "_regression"


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def folder(data_root: str, model: str) -> str:
    return f"{data_root}/{FOLDER}/{model}"


def _name(incident_id: str) -> str:
    return hashlib.sha256(incident_id.encode()).hexdigest()[:24] + ".json"


def scenario_of(incident: dict[str, Any], *, repeats: int) -> dict[str, Any]:
    """The regression scenario an incident becomes (a catalog entry like ``include/scenarios``'s)."""
    given = incident.get("scenario") or {}
    seed = given.get("seed")
    if seed is None:  # fixed by the incident, so every candidate meets the same episodes
        seed = int(hashlib.sha256(incident["id"].encode()).hexdigest()[:8], 16) % 1_000_000
    return {"id": f"incident-{incident['id']}", "incident": incident["id"], "type": incident["scenario_type"],
            "params": dict(given.get("params") or {}), "seed": int(seed), "repeats": int(repeats),
            "safety_critical": True}


def add(data_root: str, model: str, incident: dict[str, Any], *, repeats: int, dag_id: str, run_id: str) -> dict:
    """Add the incident's scenario to the model's catalog (idempotent: an incident already there
    keeps its first entry). :return: the entry, with ``added`` False when it was already there."""
    fs, path = _fs(folder(data_root, model))
    target = f"{path}/{_name(incident['id'])}"
    if fs.exists(target):
        with fs.open(target, "r") as fh:
            return {**json.load(fh), "added": False}
    entry = {"scenario": scenario_of(incident, repeats=repeats),
             "incident": {k: incident.get(k) for k in ("id", "kind", "severity", "scenario_type", "occurred_at",
                                                       "vehicle", "log_refs")},
             "lineage": {"dag_id": dag_id, "run_id": run_id, "added_at": datetime.now(UTC).isoformat()}}
    fs.makedirs(path, exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "w") as fh:
        json.dump(entry, fh, sort_keys=True)
    if fs.exists(target):  # another admission of the same incident won the race: keep its entry
        fs.rm(tmp)
        with fs.open(target, "r") as fh:
            return {**json.load(fh), "added": False}
    fs.mv(tmp, target)
    return {**entry, "added": True}


def catalog(data_root: str, model: str) -> dict[str, Any]:
    """The model's regression catalog: ``{"model", "version", "digest", "entries"}`` (entries in the
    order they were added; ``version`` ``v0`` while there are none)."""
    fs, path = _fs(folder(data_root, model))
    entries = []
    if fs.exists(path):
        for name in sorted(fs.ls(path, detail=False)):
            if not str(name).endswith(".json"):
                continue
            with fs.open(name, "r") as fh:
                entries.append(json.load(fh))
    entries.sort(key=lambda e: (e["lineage"]["added_at"], e["incident"]["id"]))
    canonical = json.dumps([e["scenario"] for e in entries], sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return {"model": model, "version": f"v{len(entries)}-{digest[:12]}" if entries else "v0",
            "digest": digest, "entries": entries}

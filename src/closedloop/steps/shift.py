"""Distribution shift between the candidate's training snapshot and production's.

Per numeric feature: the population stability index (PSI, over ten bins cut at production's
deciles) and the Kolmogorov–Smirnov statistic; and the scenario mix (PSI over the scenario
column's shares). Both snapshots are found through the training runs' dataset manifests (what the
service recorded, never XCom) and read back verified by their sha256. Metrics are
``shift.<feature>.psi``, ``shift.<feature>.ks`` and ``shift.scenario_mix.psi``, so a gate names
them like any other metric. Rules of thumb for PSI: < 0.1 stable, 0.1–0.25 moderate, > 0.25 shifted.
"""

from __future__ import annotations

import json
import math
from typing import Any

from closedloop import vocab

BINS = 10
EPS = 1e-4
SKIP = ("t", "target_accel", "ego_accel")
"""Columns that are not inputs of the policy: time within the episode and the labels."""


def psi(expected: list[float], actual: list[float]) -> float:
    """Population stability index of two share vectors (each summing to 1)."""
    return float(sum((a - e) * math.log(a / e) for e, a in zip((max(x, EPS) for x in expected),
                                                                 (max(x, EPS) for x in actual), strict=True)))


def _shares(values, edges) -> list[float]:
    import numpy as np

    counts = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
    return list(counts / max(1, counts.sum()))


def _ks(a, b) -> float:
    import numpy as np

    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                                - np.searchsorted(b, grid, side="right") / len(b))))


def report(reference, candidate, *, group_by: str = "scenario", skip: tuple[str, ...] = SKIP) -> dict[str, Any]:
    """The shift of ``candidate`` (a DataFrame) from ``reference`` (production's): per feature and
    the scenario mix, with the histograms the review card draws."""
    import numpy as np

    features = [c for c in reference.columns if c in candidate.columns and c not in skip
                and np.issubdtype(reference[c].dtype, np.number) and np.issubdtype(candidate[c].dtype, np.number)]
    out: dict[str, Any] = {"features": {}, "rows": {"production": len(reference), "candidate": len(candidate)}}
    for col in features:
        ref, cand = reference[col].dropna().to_numpy(float), candidate[col].dropna().to_numpy(float)
        if len(ref) == 0 or len(cand) == 0:
            continue
        edges = np.unique(np.quantile(ref, np.linspace(0, 1, BINS + 1)))
        if len(edges) < 2:
            edges = np.array([ref.min() - 0.5, ref.max() + 0.5])
        edges[0], edges[-1] = min(edges[0], cand.min()), max(edges[-1], cand.max())
        e, a = _shares(ref, edges), _shares(cand, edges)
        out["features"][col] = {"psi": round(psi(e, a), 4), "ks": round(_ks(ref, cand), 4),
                                "mean": {"production": round(float(ref.mean()), 4),
                                         "candidate": round(float(cand.mean()), 4)},
                                "edges": [round(float(x), 4) for x in edges],
                                "production": [round(x, 4) for x in e], "candidate": [round(x, 4) for x in a]}
    if group_by in reference.columns and group_by in candidate.columns:
        ref_mix = reference[group_by].value_counts(normalize=True)
        cand_mix = candidate[group_by].value_counts(normalize=True)
        keys = sorted(set(ref_mix.index) | set(cand_mix.index), key=str)
        e, a = [float(ref_mix.get(k, 0.0)) for k in keys], [float(cand_mix.get(k, 0.0)) for k in keys]
        out["scenario_mix"] = {"psi": round(psi(e, a), 4), "keys": [str(k) for k in keys],
                               "production": [round(x, 4) for x in e], "candidate": [round(x, 4) for x in a]}
    return out


def metrics_of(shift: dict[str, Any]) -> dict[str, float]:
    """Gate-able metrics of a shift report."""
    out = {f"{vocab.SHIFT}{col}.{k}": v[k] for col, v in shift.get("features", {}).items() for k in ("psi", "ks")}
    if "scenario_mix" in shift:
        out[f"{vocab.SHIFT}scenario_mix.psi"] = shift["scenario_mix"]["psi"]
    return out


def labelled_of_run(client, run_id: str) -> dict | None:
    """The labelled snapshot a training run learnt from (``{"uri", "digest", ...}``), from its manifest tag."""
    manifest = json.loads(client.get_run(run_id).data.tags.get(vocab.DATASET_MANIFEST) or "null") or {}
    labelled = manifest.get("labelled") or {}
    return labelled if labelled.get("uri") and labelled.get("digest") else None


def against_production(client, model: str, training_run_id: str, group_by: str) -> tuple[dict | None, str | None]:
    """(the shift report, production's version) between the training snapshot of ``training_run_id``
    and that of the version behind ``production``; (None, None) when there is no production yet."""
    from closedloop.runtime.storage import read_snapshot

    try:
        prod = client.get_model_version_by_alias(model, vocab.PRODUCTION)
    except Exception:  # no registered model or no production alias yet
        return None, None
    ref, cand = labelled_of_run(client, prod.run_id), labelled_of_run(client, training_run_id)
    if ref is None or cand is None:
        return None, str(prod.version)
    from closedloop.errors import IntegrityError

    try:
        reference = read_snapshot(ref["uri"], ref["digest"])
    except (OSError, IntegrityError) as exc:  # gone (retention) or altered: no report, and shift gates fail
        return {"error": f"production's training snapshot {ref['digest'][:12]} is not readable: {exc}",
                "features": {}}, str(prod.version)
    shifted = report(reference, read_snapshot(cand["uri"], cand["digest"]), group_by=group_by)
    shifted["snapshots"] = {"production": ref["digest"], "candidate": cand["digest"]}
    return shifted, str(prod.version)

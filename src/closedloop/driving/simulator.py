"""Closed-loop simulator: drive a policy through a scenario catalog and measure safety and comfort."""

from __future__ import annotations

from closedloop.driving.dynamics import A_MAX, A_MIN, DT, FEATURES, initial_state, lead_profile
from closedloop.steps.catalog import expand_catalog  # the project's catalog format

TTC_CAP = 99.0  # seconds; "no conflict" is reported as this value


def run_catalog(model, catalog: dict) -> dict:
    """Simulate every episode of the catalog with ``model`` in the loop.

    All episodes advance together, one batched ``model.predict`` per time step.

    :return: ``{"metrics": {name: value}, "episodes": [per-episode results]}``. Metric names
        are ``collision_rate``, ``min_ttc_s``, ``p95_abs_jerk``, ``mean_time_headway_s``, both
        overall and per scenario type (``hard_braking.collision_rate``) and for the
        safety-critical subset (``safety_critical.collision_rate``).
    """
    import numpy as np
    import pandas as pd

    episodes = expand_catalog(catalog)
    steps = int(float(catalog.get("duration_s", 20.0)) / DT)
    n = len(episodes)
    state = np.zeros((n, 3))  # ego speed, lead speed, gap
    lead_acc = np.zeros((n, steps))
    for k, ep in enumerate(episodes):
        rng = np.random.default_rng(ep["seed"])
        state[k] = initial_state(ep["type"], rng, ep["params"])
        lead_acc[k] = lead_profile(ep["type"], steps, rng, state[k, 1], ep["params"])
    alive = np.ones(n, dtype=bool)
    collided = np.zeros(n, dtype=bool)
    min_ttc = np.full(n, TTC_CAP)
    headways: list[list[float]] = [[] for _ in range(n)]
    accels = np.zeros((n, steps))
    feature_names = list(getattr(model, "feature_names_in_", FEATURES))
    for i in range(steps):
        v, v_lead, gap = state[:, 0], state[:, 1], state[:, 2]
        a_lead = np.where(v_lead > 0, lead_acc[:, i], 0.0)
        frame = pd.DataFrame({"ego_speed": v, "lead_speed": v_lead, "gap": gap,
                              "rel_speed": v_lead - v, "lead_accel": a_lead})
        a = np.clip(np.asarray(model.predict(frame[feature_names]), dtype=float), A_MIN, A_MAX)
        a = np.where(alive, a, 0.0)
        accels[:, i] = a
        closing = v - v_lead
        ttc = np.where(closing > 0.1, gap / np.maximum(closing, 1e-6), TTC_CAP)
        min_ttc = np.where(alive, np.minimum(min_ttc, ttc), min_ttc)
        for k in np.flatnonzero(alive & (v > 1.0)):
            headways[k].append(gap[k] / v[k])
        new_lead = np.maximum(0.0, v_lead + a_lead * DT)
        new_v = np.maximum(0.0, v + a * DT)
        new_gap = gap + (new_lead - new_v) * DT
        state = np.where(alive[:, None], np.stack([new_v, new_lead, new_gap], axis=1), state)
        hit = alive & (new_gap <= 0.0)
        collided |= hit
        min_ttc = np.where(hit, 0.0, min_ttc)
        alive &= ~hit
    jerk = np.abs(np.diff(accels, axis=1)) / DT
    results = []
    for k, ep in enumerate(episodes):
        results.append({
            "id": ep["id"], "type": ep["type"], "safety_critical": ep["safety_critical"],
            **({"incident": ep["incident"]} if ep.get("incident") else {}),
            "collision": bool(collided[k]), "min_ttc_s": round(float(min_ttc[k]), 3),
            "p95_abs_jerk": round(float(np.percentile(jerk[k], 95)), 3),
            "mean_time_headway_s": round(float(np.mean(headways[k])) if headways[k] else 0.0, 3),
        })
    return {"metrics": summarize(results), "episodes": results}


def summarize(results: list[dict]) -> dict[str, float]:
    """Aggregate per-episode results of the scenario set overall, per scenario type and for the
    safety-critical subset; the regression scenarios built from incidents on their own
    (``regression.``; ``regression.episodes`` is 0 while a model has none), so the scenario set's
    metrics stay comparable with production's whatever the regression catalog holds. Each group's ``collisions`` and ``episodes`` are the counts behind
    its ``collision_rate`` (what a gate with a ``confidence`` needs).

    The same function aggregates a whole catalog and the union of a sharded simulation's episodes
    (in catalog order), so the two give the same metrics."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("incident"):  # its own group: the scenario set's metrics stay comparable across catalog versions
            groups.setdefault("regression.", []).append(r)
            continue
        groups.setdefault("", []).append(r)
        groups.setdefault(f"{r['type']}.", []).append(r)
        if r["safety_critical"]:
            groups.setdefault("safety_critical.", []).append(r)
    metrics: dict[str, float] = {"regression.episodes": 0}
    for prefix, rows in groups.items():
        metrics[f"{prefix}collisions"] = sum(r["collision"] for r in rows)
        metrics[f"{prefix}collision_rate"] = round(sum(r["collision"] for r in rows) / len(rows), 4)
        metrics[f"{prefix}min_ttc_s"] = min(r["min_ttc_s"] for r in rows)
        metrics[f"{prefix}p95_abs_jerk"] = round(max(r["p95_abs_jerk"] for r in rows), 3)
        metrics[f"{prefix}mean_time_headway_s"] = round(sum(r["mean_time_headway_s"] for r in rows) / len(rows), 3)
        metrics[f"{prefix}episodes"] = len(rows)
    return metrics

"""Synthetic fleet drive logs for car-following, deterministic per (source, day, scenario, episode)."""

from __future__ import annotations

import hashlib
from datetime import date, timedelta

from closedloop.driving.dynamics import (
    A_MAX,
    A_MIN,
    DT,
    SCENARIO_TYPES,
    idm_accel,
    initial_state,
    lead_profile,
)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days)]


def synthesize_drive_logs(
    *,
    sources: list[str],
    window_start: date,
    window_end: date,
    scenarios: list[str],
    episodes_per_day: int = 2,
    seed: int = 0,
    duration_s: float = 15.0,
    focus: dict[str, float] | None = None,
):
    """Generate the fleet's drive logs for a data window.

    One episode is one car-following situation recorded at 10 Hz: the human driver's
    behaviour (an expert with reaction lag and noise) behind a lead vehicle that behaves
    according to the scenario type. The same arguments always give the same rows.

    :param sources: fleet log sources (e.g. regions); each contributes its own episodes.
    :param window_start: first day of the window (inclusive).
    :param window_end: last day of the window (exclusive).
    :param scenarios: scenario types to keep (the template's scenario filter).
    :param episodes_per_day: episodes per (source, day, scenario type).
    :param seed: template-level seed mixed into every episode's seed.
    :param duration_s: length of one episode.
    :param focus: multiplier of episodes per scenario type: below 1 samples that type more sparsely
        (rare events on the road), above 1 mines more of it (an incident's scenario type).
    :return: a pandas DataFrame, one row per time step.
    """
    import numpy as np
    import pandas as pd

    unknown = sorted(set(scenarios) - set(SCENARIO_TYPES))
    if unknown:
        raise ValueError(f"unknown scenario types {unknown}; expected some of {list(SCENARIO_TYPES)}")
    steps = int(duration_s / DT)
    columns: dict[str, list] = {k: [] for k in (
        "source", "log_date", "episode_id", "scenario", "t",
        "ego_speed", "lead_speed", "gap", "rel_speed", "lead_accel", "ego_accel",
    )}
    for source in sources:
        for day in _days(window_start, window_end):
            for kind in scenarios:
                count = _episodes(episodes_per_day * (focus or {}).get(kind, 1.0), seed, source, day, kind)
                for n in range(count):
                    episode = f"{source}-{day.isoformat()}-{kind}-{n}"
                    rng = np.random.default_rng(_seed(seed, episode))
                    _drive(columns, rng, episode, source, day, kind, steps)
    frame = pd.DataFrame(columns)
    frame["log_date"] = pd.to_datetime(frame["log_date"])
    return frame


def _episodes(expected: float, *parts: object) -> int:
    """Whole episodes for an expected count: the fraction becomes one more episode on a
    deterministic share of the days (0.25 → one episode on about every fourth day)."""
    whole = int(max(0.0, expected))
    fraction = max(0.0, expected) - whole
    return whole + (1 if fraction and (_seed("fraction", *parts) % 10_000) / 10_000 < fraction else 0)


SUMMER = (7, 8)
"""Months of the summer holidays: faster, denser highway traffic (speeds x1.3, gaps x0.8) — the
fleet's conditions shift with the season, as a distribution-shift check against production sees."""


def _drive(columns, rng, episode, source, day, kind, steps) -> None:
    v, v_lead, gap = initial_state(kind, rng)
    if day.month in SUMMER:
        v, v_lead, gap = v * 1.3, v_lead * 1.3, gap * 0.8
    lead_acc = lead_profile(kind, steps, rng, v_lead)
    reaction = int(rng.integers(2, 6))  # human reaction lag in steps
    history: list[float] = []
    for i in range(steps):
        a_lead = lead_acc[i] if v_lead > 0 else 0.0
        intended = idm_accel(v, v_lead, gap) + float(rng.normal(0, 0.15))
        history.append(intended)
        a = min(A_MAX, max(A_MIN, history[max(0, len(history) - 1 - reaction)]))
        for key, value in (
            ("source", source), ("log_date", day), ("episode_id", episode), ("scenario", kind),
            ("t", round(i * DT, 2)), ("ego_speed", v), ("lead_speed", v_lead), ("gap", gap),
            ("rel_speed", v_lead - v), ("lead_accel", a_lead), ("ego_accel", a),
        ):
            columns[key].append(value)
        v_lead = max(0.0, v_lead + a_lead * DT)
        v_new = max(0.0, v + a * DT)
        gap += (v_lead - v_new) * DT
        v = v_new
        if gap <= 0.5:  # the human takes over and swerves: the log ends here
            break

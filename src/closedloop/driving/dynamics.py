"""Shared car-following physics: the expert controller, lead-vehicle profiles, one time step."""

from __future__ import annotations

import math
from dataclasses import dataclass

DT = 0.1  # seconds per step (10 Hz, like a typical planner / CAN log rate)
CAR_LENGTH = 4.5  # metres, bumper to bumper offset between the two reference points
A_MIN, A_MAX = -9.0, 2.5  # physical acceleration limits of the ego vehicle (m/s^2)

SCENARIO_TYPES = ("cruise", "cut_in", "hard_braking", "stop_and_go")

#: The features a learned policy sees; all observable by an on-board radar + odometry.
FEATURES = ("ego_speed", "lead_speed", "gap", "rel_speed", "lead_accel")


@dataclass(frozen=True)
class IDMParams:
    """Intelligent Driver Model parameters (Treiber et al.), the expert behind the labels."""

    desired_speed: float = 30.0
    time_headway: float = 1.4
    min_gap: float = 2.0
    max_accel: float = 1.5
    comfort_decel: float = 2.0


def idm_accel(v: float, v_lead: float, gap: float, p: IDMParams = IDMParams()) -> float:
    """Expert acceleration for ego speed ``v`` behind a lead at ``v_lead`` with bumper gap ``gap``."""
    dv = v - v_lead  # closing speed, positive when approaching
    s_star = p.min_gap + max(0.0, v * p.time_headway + v * dv / (2.0 * math.sqrt(p.max_accel * p.comfort_decel)))
    free = 1.0 - (v / p.desired_speed) ** 4
    interaction = (s_star / max(gap, 0.1)) ** 2
    return float(min(A_MAX, max(A_MIN, p.max_accel * (free - interaction))))


def lead_profile(kind: str, steps: int, rng, v0: float, params: dict | None = None) -> list[float]:
    """Lead-vehicle acceleration per step for a scenario type (deterministic given ``rng``)."""
    params = params or {}
    acc = [0.0] * steps
    if kind == "cruise":
        for i in range(steps):
            acc[i] = 0.3 * math.sin(i * DT / 4.0 + rng.uniform(0, 6.28))
    elif kind == "cut_in":
        # the cut-in itself is modelled by the initial gap; the intruder then eases off a little
        for i in range(steps):
            acc[i] = -0.6 if i < 20 else 0.2
    elif kind == "hard_braking":
        start = int(params.get("brake_at_s", rng.uniform(2.0, 4.0)) / DT)
        decel = float(params.get("decel", rng.uniform(6.0, 8.0)))
        for i in range(start, steps):
            acc[i] = -decel
    elif kind == "stop_and_go":
        period = float(params.get("period_s", rng.uniform(10.0, 16.0)))
        amp = float(params.get("amplitude", rng.uniform(1.2, 1.8)))
        for i in range(steps):
            acc[i] = amp * math.sin(2 * math.pi * i * DT / period)
    else:
        raise ValueError(f"unknown scenario type {kind!r}; expected one of {', '.join(SCENARIO_TYPES)}")
    return acc


def initial_state(kind: str, rng, params: dict | None = None) -> tuple[float, float, float]:
    """(ego speed, lead speed, gap) at t=0 for a scenario type."""
    params = params or {}
    v = float(params.get("ego_speed", rng.uniform(18.0, 28.0)))
    if kind == "cut_in":
        v_lead = float(params.get("lead_speed", v - rng.uniform(2.0, 5.0)))
        gap = float(params.get("gap", rng.uniform(12.0, 20.0)))
    elif kind == "stop_and_go":
        v = float(params.get("ego_speed", rng.uniform(6.0, 10.0)))
        v_lead = float(params.get("lead_speed", v))
        gap = float(params.get("gap", 2.0 + 1.4 * v + rng.uniform(-2, 4)))
    else:
        v_lead = float(params.get("lead_speed", v + rng.uniform(-1.0, 1.0)))
        gap = float(params.get("gap", 2.0 + 1.4 * v + rng.uniform(-3.0, 5.0)))
    return v, v_lead, gap

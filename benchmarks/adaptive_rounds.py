"""What batching the adaptive budget's rounds saves: the same model and catalog simulated until the
confidence gate is decided, further rounds one per simulator call against ``ROUNDS_PER_CALL`` per call
(taken round by round either way: the same stopping round and metrics). Prints medians of REPEATS,
measured side by side; asserts nothing."""

from __future__ import annotations

import statistics
import time
from datetime import date
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
REPEATS = 3


def main() -> None:
    import closedloop.steps.simulation as sim
    from closedloop.driving.labels import expert_acceleration
    from closedloop.driving.logs import synthesize_drive_logs
    from closedloop.driving.policy import train_policy
    from closedloop.driving.simulator import run_catalog

    raw = synthesize_drive_logs(sources=["fleet-eu"], window_start=date(2026, 11, 1), window_end=date(2026, 11, 5),
                                scenarios=["cruise", "cut_in", "stop_and_go"], episodes_per_day=1, seed=3)
    model = train_policy(expert_acceleration(raw, version="2", smoothing_window=5), max_iter=30)
    catalog = yaml.safe_load((PROJECT / "include" / "scenarios" / "standard.yaml").read_text())
    budget = {"max_episodes": 5000, "summarize": "closedloop.driving.simulator:summarize",
              "gates": [{"metric": "sim.cut_in.collision_rate", "max": 0.05, "confidence": 0.95}]}
    batched = sim.ROUNDS_PER_CALL
    times: dict[int, list[float]] = {1: [], batched: []}
    for _ in range(REPEATS):  # interleaved: machine noise hits both alike
        for k in times:
            sim.ROUNDS_PER_CALL = k
            started = time.perf_counter()
            out = sim.simulate_until_decided(run_catalog, model, catalog, budget)
            times[k].append(time.perf_counter() - started)
    a = out["adaptive"]
    print(f"adaptive budget until decided: {a['rounds']} rounds, {a['episodes']} episodes ({a['stopped']})")
    for k, values in times.items():
        print(f"  {k} round(s) per simulator call: median {statistics.median(values):.2f} s of {REPEATS}")


if __name__ == "__main__":
    main()

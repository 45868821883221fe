"""The shift report: PSI and Kolmogorov–Smirnov per feature, and the scenario mix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp

from closedloop.steps.shift import metrics_of, psi, report


def frame(rng, n, *, speed=25.0, mix=(0.25, 0.25, 0.25, 0.25)):
    return pd.DataFrame({"ego_speed": rng.normal(speed, 3.0, n), "gap": rng.gamma(4.0, 8.0, n),
                         "t": np.arange(n) * 0.1, "target_accel": rng.normal(0, 1, n),
                         "scenario": rng.choice(["cruise", "cut_in", "hard_braking", "stop_and_go"], n, p=mix)})


def test_the_same_distribution_is_stable_and_a_shifted_one_is_flagged():
    rng = np.random.default_rng(1)
    prod, same = frame(rng, 4000), frame(rng, 4000)
    slower = frame(rng, 4000, speed=17.0, mix=(0.1, 0.1, 0.7, 0.1))
    calm, shifted = report(prod, same), report(prod, slower)
    assert set(calm["features"]) == {"ego_speed", "gap"}  # time and labels are not inputs
    assert calm["features"]["ego_speed"]["psi"] < 0.02 and calm["scenario_mix"]["psi"] < 0.01
    assert shifted["features"]["ego_speed"]["psi"] > 1.0 and shifted["scenario_mix"]["psi"] > 0.25
    assert shifted["features"]["gap"]["psi"] < 0.05  # only what moved is flagged
    for col in ("ego_speed", "gap"):  # KS as scipy computes it (an independent implementation)
        assert shifted["features"][col]["ks"] == pytest.approx(ks_2samp(prod[col], slower[col]).statistic, abs=1e-4)
    m = metrics_of(shifted)
    assert set(m) == {"shift.ego_speed.psi", "shift.ego_speed.ks", "shift.gap.psi", "shift.gap.ks",
                      "shift.scenario_mix.psi"}
    assert sum(shifted["features"]["ego_speed"]["candidate"]) == pytest.approx(1.0)


def test_psi_by_hand():
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * np.log(0.9 / 0.5) + (-0.4) * np.log(0.1 / 0.5))

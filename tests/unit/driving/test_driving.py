"""The example domain is real enough for gates to catch real failures."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest
import yaml

from closedloop.driving.dynamics import FEATURES, idm_accel
from closedloop.driving.labels import expert_acceleration
from closedloop.driving.logs import synthesize_drive_logs
from closedloop.driving.policy import train_policy
from closedloop.driving.simulator import run_catalog

ALL = ["cruise", "cut_in", "hard_braking", "stop_and_go"]


@pytest.fixture(scope="module")
def catalog(project):
    return yaml.safe_load((project / "include" / "scenarios" / "standard.yaml").read_text())


def logs(scenarios, days=7):
    raw = synthesize_drive_logs(sources=["fleet-eu", "fleet-us"], window_start=date(2026, 11, 1),
                                window_end=date(2026, 11, 1 + days), scenarios=scenarios, episodes_per_day=1, seed=7)
    return expert_acceleration(raw, version="2", smoothing_window=5)


class Expert:
    feature_names_in_ = np.array(FEATURES)

    def predict(self, frame):
        return np.array([idm_accel(v, vl, g) for v, vl, g in zip(frame.ego_speed, frame.lead_speed, frame.gap, strict=True)])


def test_logs_are_deterministic_and_cover_the_filter():
    a = synthesize_drive_logs(sources=["s"], window_start=date(2026, 1, 1), window_end=date(2026, 1, 3),
                              scenarios=["cruise", "cut_in"], episodes_per_day=2, seed=1)
    b = synthesize_drive_logs(sources=["s"], window_start=date(2026, 1, 1), window_end=date(2026, 1, 3),
                              scenarios=["cruise", "cut_in"], episodes_per_day=2, seed=1)
    assert a.equals(b)
    assert set(a["scenario"]) == {"cruise", "cut_in"} and a["episode_id"].nunique() == 8
    with pytest.raises(ValueError, match="unknown scenario types"):
        synthesize_drive_logs(sources=["s"], window_start=date(2026, 1, 1), window_end=date(2026, 1, 2),
                              scenarios=["drifting"])


def test_expert_is_safe_in_the_whole_catalog(catalog):
    m = run_catalog(Expert(), catalog)["metrics"]
    assert m["collision_rate"] == 0 and m["safety_critical.min_ttc_s"] > 1.0


def test_policy_trained_without_hard_braking_crashes_in_hard_braking_only(catalog):
    full = run_catalog(train_policy(logs(ALL)), catalog)["metrics"]
    blind = run_catalog(train_policy(logs(["cruise", "cut_in", "stop_and_go"])), catalog)["metrics"]
    assert full["hard_braking.collision_rate"] == 0
    assert blind["hard_braking.collision_rate"] >= 0.5
    assert blind["cruise.collision_rate"] == blind["stop_and_go.collision_rate"] == 0


def test_label_policy_smoothing_changes_labels():
    raw = synthesize_drive_logs(sources=["s"], window_start=date(2026, 1, 1), window_end=date(2026, 1, 2),
                                scenarios=["stop_and_go"], episodes_per_day=1, seed=3)
    rough = expert_acceleration(raw, version="1", smoothing_window=1)["target_accel"]
    smooth = expert_acceleration(raw, version="2", smoothing_window=9)["target_accel"]
    assert np.abs(np.diff(smooth)).mean() < np.abs(np.diff(rough)).mean()

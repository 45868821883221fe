"""Gate verdicts: bounds, missing metrics, the readable report."""

from __future__ import annotations

import pytest

from closedloop.records.health import _rejected_by
from closedloop.spec import GateSpec
from closedloop.steps.gates import evaluate, format_report, rejection_note


def test_verdicts():
    gates = [GateSpec(metric="sim.collision_rate", max=0.0), GateSpec(metric="sim.min_ttc_s", min=1.0),
             GateSpec(metric="offline.rmse", min=0.0, max=0.3), GateSpec(metric="sim.jerk", max=5)]
    report = evaluate(gates, {"sim.collision_rate": 0.25, "sim.min_ttc_s": 1.0, "offline.rmse": 0.31})
    assert [r["passed"] for r in report] == [False, True, False, False]
    assert report[0]["reason"] == "0.25 > max 0"
    assert report[2]["reason"] == "0.31 > max 0.3"
    assert report[3]["value"] is None and "not produced" in report[3]["reason"]
    text = format_report(report)
    assert "FAIL  sim.collision_rate" in text and "PASS  sim.min_ttc_s" in text and "value missing" in text


def test_a_rejection_note_names_every_failed_gate_and_whose_reason_it_gives():
    gates = [GateSpec(metric="sim.collision_rate", max=0.0), GateSpec(metric="sim.min_ttc_s", min=1.0),
             GateSpec(metric="offline.rmse", max=0.3)]
    both = rejection_note(evaluate(gates, {"sim.collision_rate": 0.25, "sim.min_ttc_s": 0.5, "offline.rmse": 0.1}))
    assert both == "rejected by gate sim.collision_rate, sim.min_ttc_s: sim.collision_rate 0.25 > max 0"
    one = rejection_note(evaluate(gates, {"sim.collision_rate": 0.0, "sim.min_ttc_s": 0.5, "offline.rmse": 0.1}))
    assert one == "rejected by gate sim.min_ttc_s: 0.5 < min 1"
    # the health page counts each gate from the note: the list ends at the first colon
    assert _rejected_by([{"note": both}, {"note": one}]) == {"sim.min_ttc_s": 2, "sim.collision_rate": 1}


def test_confidence_bounds_match_the_beta_quantiles_and_the_wilson_formula():
    """Clopper–Pearson bounds are Beta quantiles (checked against scipy, an independent
    implementation); Wilson's against its textbook closed form."""
    import math

    from scipy.stats import beta, norm

    from closedloop.steps.gates import rate_bounds

    for k, n in [(0, 1200), (0, 26), (1, 26), (3, 150), (26, 26), (7, 40)]:
        lo, hi = rate_bounds(k, n, 0.95)
        assert hi == pytest.approx(1.0 if k == n else beta.ppf(0.95, k + 1, n - k), abs=1e-9)
        assert lo == pytest.approx(0.0 if k == 0 else beta.ppf(0.05, k, n - k + 1), abs=1e-9)
        z, p = norm.ppf(0.95), k / n
        centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert rate_bounds(k, n, 0.95, "wilson") == pytest.approx((max(0, centre - half), min(1, centre + half)))


def test_a_rate_gate_with_confidence_judges_the_upper_bound_and_says_it():
    gate = GateSpec(metric="sim.collision_rate", max=0.005, confidence=0.95)
    many = {"sim.collision_rate": 0.0, "sim.collisions": 0, "sim.episodes": 1200}
    few = {"sim.collision_rate": 0.0, "sim.collisions": 0, "sim.episodes": 150}
    (ok,), (short,) = evaluate([gate], many), evaluate([gate], few)
    assert ok["passed"] and ok["evidence"] == "0 collisions in 1,200 episodes: upper bound 0.249 % at 95 % (Clopper-Pearson)"
    assert ok["upper"] == pytest.approx(0.0024933, abs=1e-6)
    assert not short["passed"] and "upper bound 1.98 % > max 0.5 %" in short["reason"]  # 0 in 150 is not enough
    assert "0 collisions in 150 episodes" in format_report([short])
    (nocount,) = evaluate([gate], {"sim.collision_rate": 0.0})
    assert not nocount["passed"] and "sim.collisions" in nocount["reason"]


def test_a_group_without_episodes_has_nothing_to_judge():
    """A model no incident has been admitted for has no regression scenarios: its gate passes and says so."""
    gate = GateSpec(metric="sim.regression.collision_rate", max=0.0)
    (r,) = evaluate([gate], {"sim.regression.episodes": 0})
    assert r["passed"] and r["evidence"] == "no regression episodes: nothing to judge"
    (missing,) = evaluate([gate], {})
    assert not missing["passed"]


def test_confidence_gates_that_cannot_work_are_refused_with_the_reason():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="applies to a rate"):
        GateSpec(metric="sim.min_ttc_s", min=1.0, confidence=0.95)
    with pytest.raises(ValidationError, match="can never pass"):
        GateSpec(metric="sim.collision_rate", max=0.0, confidence=0.95)
    assert "(its 95% Clopper-Pearson bound) <= 0.01" in GateSpec(metric="sim.collision_rate", max=0.01,
                                                                 confidence=0.95).describe()


def test_the_review_body_table_and_a_gate_with_nothing_to_judge():
    from closedloop.spec import GateSpec
    from closedloop.steps.gates import duration_text, evaluate, format_report, report_table

    report = evaluate([GateSpec(metric="sim.regression.collision_rate", max=0.0),
                       GateSpec(metric="sim.hard_braking.collision_rate", max=0.1, confidence=0.95)],
                      {"sim.regression.episodes": 0, "sim.hard_braking.collision_rate": 0.0,
                       "sim.hard_braking.collisions": 0, "sim.hard_braking.episodes": 59})
    assert [r["verdict"] for r in report] == ["n/a", "pass"] and report[0]["passed"]
    text = format_report(report)
    assert "N/A   sim.regression.collision_rate" in text and "value n/a" in text and "PASS  sim.regression" not in text
    table = report_table(report)
    assert "| **N/A** | `sim.regression.collision_rate` | <= 0 | - |" in table
    assert "| **PASS** | `sim.hard_braking.collision_rate` | <= 0.1 (95 % upper bound) | 0 | 4.95 % (0 in 59) |" in table
    assert "- `sim.regression.collision_rate`: no regression episodes: nothing to judge" in table
    assert (duration_text(72 * 3600), duration_text(36), duration_text(5400)) == ("72 h (3 days)", "36 s", "90 min")

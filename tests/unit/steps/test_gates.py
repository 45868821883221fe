"""Gate verdicts: bounds, missing metrics, the readable report."""

from __future__ import annotations

from closedloop.spec import GateSpec
from closedloop.steps.gates import evaluate, format_report


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

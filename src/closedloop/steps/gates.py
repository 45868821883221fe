"""Step ``release_gate``: compare offline and simulation metrics with the template's thresholds."""

from __future__ import annotations

from closedloop.errors import GateFailed
from closedloop.spec import GateSpec, LoadedSpec
from closedloop.steps import tracking
from closedloop.steps.context import RunContext


def evaluate(gates: list[GateSpec], metrics: dict[str, float]) -> list[dict]:
    """One verdict per gate: ``{metric, min, max, value, passed, reason}``. Missing metrics fail."""
    report = []
    for gate in gates:
        value = metrics.get(gate.metric)
        if value is None:
            passed, reason = False, "metric was not produced by evaluation or simulation"
        else:
            low = gate.min is None or value >= gate.min
            high = gate.max is None or value <= gate.max
            passed = low and high
            reason = "" if passed else (f"{value:g} < min {gate.min:g}" if not low else f"{value:g} > max {gate.max:g}")
        report.append({"metric": gate.metric, "min": gate.min, "max": gate.max, "value": value,
                       "passed": passed, "reason": reason, "description": gate.description})
    return report


def format_report(report: list[dict]) -> str:
    rows = []
    for r in report:
        bound = " and ".join(x for x in (f">= {r['min']:g}" if r["min"] is not None else "",
                                          f"<= {r['max']:g}" if r["max"] is not None else "") if x)
        value = "missing" if r["value"] is None else f"{r['value']:g}"
        rows.append(f"  {'PASS' if r['passed'] else 'FAIL'}  {r['metric']:<40} {bound:<14} value {value}"
                    + (f"  ({r['reason']})" if r["reason"] else ""))
    return "\n".join(rows)


def release_gate(loaded: LoadedSpec, ctx: RunContext, *, offline: dict, simulation: dict) -> dict:
    """Decide; record the report on the pipeline's MLflow run tree; raise :class:`GateFailed` on any FAIL."""
    metrics = {**offline["metrics"], **simulation["metrics"]}
    report = evaluate(list(loaded.spec.gates), metrics)
    passed = all(r["passed"] for r in report)
    run = tracking.step_run(loaded, ctx, "release_gate")
    c = tracking.client(ctx)
    c.log_dict(run.info.run_id, report, "gates/report.json")
    c.set_tag(run.info.run_id, "closedloop.gates", "passed" if passed else "failed")
    summary = {"run_id": run.info.run_id, "passed": passed, "report": report}
    if not passed:
        c.set_terminated(run.info.run_id, "FAILED")
        failed = [r for r in report if not r["passed"]]
        raise GateFailed(f"{len(failed)} of {len(report)} release gates failed:\n{format_report(report)}",
                         report=report)
    return tracking.finish(ctx, run.info.run_id, summary)

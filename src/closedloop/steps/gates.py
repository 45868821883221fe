"""Step ``release_gate``: compare offline and simulation metrics with the template's thresholds."""

from __future__ import annotations

from closedloop import vocab
from closedloop.errors import GateFailed
from closedloop.spec import GateSpec, LoadedSpec
from closedloop.steps import tracking
from closedloop.steps.context import RunContext


def evaluate(gates: list[GateSpec], metrics: dict[str, float],
             production: dict[str, float] | None = None) -> list[dict]:
    """One verdict per gate: ``{metric, min, max, value, passed, reason, ...}``. Missing metrics fail.

    :param production: the current production version's metrics, for ``max_regression`` gates;
        with no production version yet, those gates compare against nothing and pass on that part.
    """
    report = []
    for gate in gates:
        value = metrics.get(gate.metric)
        baseline = (production or {}).get(gate.metric)
        reasons = []
        if value is None:
            reasons.append("metric was not produced by evaluation, simulation or the HIL rig")
        else:
            if gate.min is not None and value < gate.min:
                reasons.append(f"{value:g} < min {gate.min:g}")
            if gate.max is not None and value > gate.max:
                reasons.append(f"{value:g} > max {gate.max:g}")
            if gate.max_regression is not None and baseline is not None:
                worse = (baseline - value) if gate.higher_is_better else (value - baseline)
                if worse > gate.max_regression:
                    reasons.append(f"{worse:g} worse than production ({baseline:g}), tolerance {gate.max_regression:g}")
        report.append({"metric": gate.metric, "min": gate.min, "max": gate.max,
                       "max_regression": gate.max_regression, "production": baseline, "value": value,
                       "passed": not reasons, "reason": "; ".join(reasons), "description": gate.description})
    return report


def format_report(report: list[dict]) -> str:
    rows = []
    for r in report:
        bound = " and ".join(x for x in (f">= {r['min']:g}" if r["min"] is not None else "",
                                          f"<= {r['max']:g}" if r["max"] is not None else "",
                                          f"vs prod ±{r['max_regression']:g}" if r.get("max_regression") is not None
                                          else "") if x)
        value = "missing" if r["value"] is None else f"{r['value']:g}"
        rows.append(f"  {'PASS' if r['passed'] else 'FAIL'}  {r['metric']:<40} {bound:<14} value {value}"
                    + (f"  ({r['reason']})" if r["reason"] else ""))
    return "\n".join(rows)


def release_gate(loaded: LoadedSpec, ctx: RunContext, *, offline: dict, simulation: dict,
                 hil: dict | None = None) -> dict:
    """Decide; record the report on the pipeline's MLflow run tree; raise :class:`GateFailed` on any FAIL."""
    metrics = {**offline["metrics"], **simulation["metrics"], **((hil or {}).get("metrics") or {})}
    production, production_version = production_metrics(ctx, loaded.spec.model.name)
    report = evaluate(list(loaded.spec.gates), metrics, production)
    passed = all(r["passed"] for r in report)
    run = tracking.step_run(loaded, ctx, "release_gate")
    c = tracking.client(ctx)
    c.log_batch(run.info.run_id, metrics=tracking.metric_entities(metrics))  # the baseline for later regressions
    c.log_dict(run.info.run_id, report, "gates/report.json")
    if production_version:
        c.set_tag(run.info.run_id, vocab.COMPARED_TO_PRODUCTION, production_version)
    c.set_tag(run.info.run_id, vocab.GATES, "passed" if passed else "failed")
    summary = {"run_id": run.info.run_id, "passed": passed, "report": report}
    if not passed:
        c.set_terminated(run.info.run_id, "FAILED")
        failed = [r for r in report if not r["passed"]]
        raise GateFailed(f"{len(failed)} of {len(report)} release gates failed:\n{format_report(report)}",
                         report=report)
    return tracking.finish(ctx, run.info.run_id, summary)


def production_metrics(ctx: RunContext, model: str) -> tuple[dict[str, float] | None, str | None]:
    """Metrics of the version behind the ``production`` alias (from its gate run), if there is one."""
    c = tracking.client(ctx)
    try:
        mv = c.get_model_version_by_alias(model, "production")
    except Exception:  # no registered model or no production alias yet
        return None, None
    gate_run = mv.tags.get(vocab.GATE_RUN_ID)
    if not gate_run:
        return None, str(mv.version)
    return dict(c.get_run(gate_run).data.metrics), str(mv.version)

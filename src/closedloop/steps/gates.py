"""Step ``release_gate``: compare offline and simulation metrics with the template's thresholds."""

from __future__ import annotations

import math

from closedloop import vocab
from closedloop.errors import GateFailed
from closedloop.runtime import tracking
from closedloop.runtime.context import RunContext
from closedloop.spec import GateSpec, LoadedSpec


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact enough for any n a catalog has)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _solve(f, target: float) -> float:
    """The p in [0, 1] where the decreasing function ``f`` crosses ``target`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def rate_bounds(events: int, trials: int, confidence: float, method: str = "clopper_pearson") -> tuple[float, float]:
    """One-sided (lower, upper) confidence bounds of a rate: ``events`` in ``trials`` at ``confidence``.

    ``clopper_pearson``: exact (from the binomial distribution, never below the nominal coverage);
    ``wilson``: the Wilson score interval (narrower, approximate). E.g. 0 in 1,200 at 0.95:
    upper bound 0.0025 (Clopper–Pearson)."""
    if trials <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    if method == "wilson":
        from statistics import NormalDist

        z = NormalDist().inv_cdf(confidence)
        phat = events / trials
        centre = (phat + z * z / (2 * trials)) / (1 + z * z / trials)
        half = z * math.sqrt(phat * (1 - phat) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
        return max(0.0, centre - half), min(1.0, centre + half)
    upper = 1.0 if events >= trials else _solve(lambda p: _binom_cdf(events, trials, p), alpha)
    lower = 0.0 if events <= 0 else 1.0 - _solve(lambda q: _binom_cdf(trials - events, trials, q), alpha)
    return lower, upper


def counts_of(metric: str, metrics: dict[str, float]) -> tuple[int, int] | None:
    """The (events, trials) behind a rate metric ``<prefix>.<event>_rate``: ``<prefix>.<event>s`` and
    ``<prefix>.episodes``; None when either is missing."""
    prefix, _, name = metric.rpartition(".")
    events, trials = metrics.get(f"{prefix}.{name[:-len('_rate')]}s"), metrics.get(f"{prefix}.episodes")
    if events is None or trials is None:
        return None
    return int(events), int(trials)


def _bounded(gates: list, metrics: dict[str, float]):
    """``(gate, lower, upper)``: each confidence gate's one-sided bounds, for those whose counts are there
    (a gate whose counts are missing is not waited for: it fails on its own)."""
    for g in gates:
        counts = counts_of(g.metric, metrics)
        if counts is not None:
            yield (g, *rate_bounds(*counts, g.confidence, g.method))


def undecided(gates: list, metrics: dict[str, float]) -> list[str]:
    """The confidence gates whose verdict more episodes could still change: for ``max``, the upper
    bound is above it and the lower bound is not (``min`` the other way round)."""
    return [g.metric for g, lower, upper in _bounded(gates, metrics)
            if (g.max is not None and lower <= g.max < upper) or (g.min is not None and lower < g.min <= upper)]


def failed_for_sure(gates: list, metrics: dict[str, float]) -> list[str]:
    """The confidence gates no number of further episodes can pass: for ``max``, the lower bound is
    already above it (``min``: the upper bound below it). One of them decides the release: rejected."""
    return [g.metric for g, lower, upper in _bounded(gates, metrics)
            if (g.max is not None and lower > g.max) or (g.min is not None and upper < g.min)]


def _pct(x: float) -> str:
    return f"{x * 100:.3g} %"


def evaluate(gates: list[GateSpec], metrics: dict[str, float],
             production: dict[str, float] | None = None, *, nothing_to_judge: dict[str, str] | None = None) -> list[dict]:
    """One verdict per gate: ``{metric, min, max, value, passed, reason, ...}``. Missing metrics fail,
    except a metric of a group that has no episodes (``<prefix>.episodes`` is 0, e.g. the regression
    scenarios of a model no incident has been admitted for): nothing to judge, it passes and says so.

    A gate with ``confidence`` judges the rate's one-sided confidence bound (``upper``/``lower``,
    with ``events`` and ``trials``) instead of the point estimate, and says so in ``evidence``.

    :param production: the current production version's metrics, for ``max_regression`` gates;
        with no production version yet, those gates compare against nothing and pass on that part.
    :param nothing_to_judge: metric prefix → why its metrics are absent and that is fine (e.g.
        ``shift.``: no production version to compare the data with): such a gate passes and says why.
    """
    report = []
    for gate in gates:
        value = metrics.get(gate.metric)
        baseline = (production or {}).get(gate.metric)
        reasons: list[str] = []
        extra: dict = {}
        prefix = gate.metric.rpartition(".")[0]
        excuse = next((why for p, why in (nothing_to_judge or {}).items() if gate.metric.startswith(p)), None)
        if value is None and metrics.get(f"{prefix}.episodes") == 0:
            extra["evidence"] = f"no {prefix.partition('.')[2] or 'simulated'} episodes: nothing to judge"
        elif value is None and excuse:
            extra["evidence"] = excuse
        elif value is None:
            reasons.append("metric was not produced by evaluation, simulation or the HIL rig")
        elif gate.confidence is not None:
            counts = counts_of(gate.metric, metrics)
            if counts is None:
                event = gate.metric.rpartition(".")[2][:-len("_rate")]
                reasons.append(f"confidence bound needs the counts behind {gate.metric} "
                               f"({prefix}.{event}s and {prefix}.episodes), not produced")
            else:
                events, trials = counts
                lower, upper = rate_bounds(events, trials, gate.confidence, gate.method)
                method = "Clopper-Pearson" if gate.method == "clopper_pearson" else "Wilson"
                extra = {"events": events, "trials": trials, "lower": lower, "upper": upper,
                         "confidence": gate.confidence, "method": gate.method,
                         "evidence": f"{events:,} {gate.metric.rpartition('.')[2][:-5]}s in {trials:,} episodes: "
                                     + ", ".join(x for x in (f"upper bound {_pct(upper)}" if gate.max is not None
                                                             else "", f"lower bound {_pct(lower)}"
                                                             if gate.min is not None else "") if x)
                                     + f" at {gate.confidence * 100:g} % ({method})"}
                if gate.max is not None and upper > gate.max:
                    reasons.append(f"upper bound {_pct(upper)} > max {_pct(gate.max)} at {gate.confidence * 100:g} % "
                                   f"({events} in {trials}: more episodes or fewer events needed)")
                if gate.min is not None and lower < gate.min:
                    reasons.append(f"lower bound {_pct(lower)} < min {_pct(gate.min)} at {gate.confidence * 100:g} %")
        else:
            if gate.min is not None and value < gate.min:
                reasons.append(f"{value:g} < min {gate.min:g}")
            if gate.max is not None and value > gate.max:
                reasons.append(f"{value:g} > max {gate.max:g}")
        if value is not None and gate.max_regression is not None and baseline is not None:
            worse = (baseline - value) if gate.higher_is_better else (value - baseline)
            if worse > gate.max_regression:
                reasons.append(f"{worse:g} worse than production ({baseline:g}), tolerance {gate.max_regression:g}")
        verdict = "fail" if reasons else ("n/a" if value is None else "pass")
        report.append({"metric": gate.metric, "min": gate.min, "max": gate.max,
                       "max_regression": gate.max_regression, "production": baseline, "value": value,
                       "delta": round(value - baseline, 6) if value is not None and baseline is not None else None,
                       "passed": not reasons, "verdict": verdict, "reason": "; ".join(reasons),
                       "description": gate.description, **extra})
    return report


REJECTED = "rejected by gate"
"""How a run a release gate stopped is called (its Airflow note starts with it): an outcome, not a failure."""


def rejection_note(report: list[dict]) -> str:
    """``rejected by gate <metric>[, <metric>…]: [<first metric>] <its reason>`` (a run's note, at most 1,000
    characters; the metric list ends at the first colon)."""
    failed = [r for r in report if not r.get("passed")]
    first = (f"{failed[0]['metric']} " if len(failed) > 1 else "") + (failed[0]["reason"] if failed else "")
    text = f"{REJECTED} {', '.join(r['metric'] for r in failed)}" + (f": {first}" if failed else "")
    return text[:1000]


def verdict_of(row: dict) -> str:
    """``pass``, ``fail`` or ``n/a`` (nothing to judge: it does not stop the run, and is never called a pass)."""
    return row.get("verdict") or ("fail" if not row.get("passed") else "n/a" if row.get("value") is None else "pass")


def limit_of(row: dict) -> str:
    """The gate's bound as a person reads it, e.g. ``<= 0.05 (95 % upper bound)``."""
    on = f" ({row['confidence'] * 100:g} % {'upper' if row.get('max') is not None else 'lower'} bound)" \
        if row.get("confidence") is not None else ""
    return " and ".join(x for x in (f">= {row['min']:g}" if row.get("min") is not None else "",
                                     f"<= {row['max']:g}" if row.get("max") is not None else "",
                                     f"<= {row['max_regression']:g} worse than production"
                                     if row.get("max_regression") is not None else "") if x) + on


def format_report(report: list[dict]) -> str:
    """The gate report as text: verdict, gate, its limit (with the confidence bound it is judged by),
    the value, and under it the evidence (counts and bound, production's value and the delta)."""
    rows = []
    for r in report:
        verdict = verdict_of(r)
        value = ("n/a" if verdict == "n/a" else "missing") if r["value"] is None else f"{r['value']:g}"
        vs = (f"; production {r['production']:g}, delta {r['delta']:+g}" if r.get("production") is not None
              and r.get("delta") is not None else "")
        rows.append(f"  {verdict.upper():<4}  {r['metric']:<34} {limit_of(r):<28} value {value}{vs}"
                    + (f"  ({r['reason']})" if r["reason"] else "")
                    + (f"\n        {r['evidence']}" if r.get("evidence") else "")
                    + "".join(f"\n        incident {i['incident']}: {i['collisions']} collision(s) in "
                              f"{i['episodes']} episode(s) of {i['type']}" for i in r.get("incidents", [])))
    return "\n".join(rows)


def _md(text: object) -> str:
    """A table cell: no pipes or line breaks from the value."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def report_table(report: list[dict]) -> str:
    """The gate report as a Markdown table (what the review's body shows): verdict, gate, limit, value,
    the confidence bound with its counts, production's value and the delta."""
    def num(x):
        return "-" if x is None else f"{x:.4g}"

    rows = ["| | gate | limit | value | bound (counts) | production | delta |", "|---|---|---|---|---|---|---|"]
    for r in report:
        side = "upper" if r.get("max") is not None else "lower"
        bound = (f"{r[side] * 100:.3g} % ({r['events']:,} in {r['trials']:,})" if r.get("upper") is not None else "-")
        delta = "-" if r.get("delta") is None else f"{r['delta']:+.4g}"
        rows.append(f"| **{verdict_of(r).upper()}** | `{_md(r['metric'])}` | {_md(limit_of(r) or '-')} | "
                    f"{num(r.get('value'))} | {bound} | {num(r.get('production'))} | {delta} |")
    notes = [f"- `{_md(r['metric'])}`: {_md(r.get('reason') or r.get('evidence'))}" for r in report
             if r.get("reason") or (verdict_of(r) == "n/a" and r.get("evidence"))]
    return "\n".join(rows + ([""] + notes if notes else []))


def duration_text(seconds: float) -> str:
    """A timeout as a person says it: ``72 h (3 days)``, ``36 s``, ``90 min``."""
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:g} min"
    hours = seconds / 3600
    return f"{hours:g} h" + (f" ({hours / 24:g} days)" if hours >= 48 and hours % 24 == 0 else "")


SHIFT_ARTIFACT = "shift/report.json"


def release_gate(loaded: LoadedSpec, ctx: RunContext, *, offline: dict, simulation: dict,
                 hil: dict | None = None, trained: dict | None = None) -> dict:
    """Decide; record the report on the pipeline's MLflow run tree; raise :class:`GateFailed` on any FAIL."""
    from closedloop.steps import shift as drift

    c = tracking.client(ctx)
    shifted, _ = drift.against_production(c, loaded.spec.model.name, trained["run_id"],
                                          loaded.spec.evaluation.group_by) if trained else (None, None)
    metrics = {**offline["metrics"], **simulation["metrics"], **((hil or {}).get("metrics") or {}),
               **(drift.metrics_of(shifted) if shifted else {})}
    production, production_version = production_metrics(ctx, loaded.spec.model.name)
    report = evaluate(list(loaded.spec.gates), metrics, production, nothing_to_judge={} if shifted else {
        vocab.SHIFT: "no production version (or its training data) to compare with: nothing to judge"})
    adaptive = simulation.get("adaptive")
    for r in report:  # the regression scenarios' outcomes, each by the incident it came from
        if adaptive and r.get("confidence") is not None and r["metric"].startswith(vocab.SIM) and r.get("evidence"):
            r["evidence"] += (f"; adaptive budget: {adaptive['episodes']:,} episodes in {adaptive['rounds']} "
                              f"round(s) of the catalog, {adaptive['stopped']} (at most {adaptive['max_episodes']:,})")
        if r["metric"].startswith("sim.regression."):
            r["incidents"] = list(simulation.get("regression") or [])
        if r["metric"].startswith(vocab.SHIFT) and shifted and shifted.get("error"):
            r["reason"] = f"{r['reason']}: {shifted['error']}"
    passed = all(r["passed"] for r in report)
    run = tracking.step_run(loaded, ctx, "release_gate")
    c.log_batch(run.info.run_id, metrics=tracking.metric_entities(metrics))  # the baseline for later regressions
    c.log_dict(run.info.run_id, report, "gates/report.json")
    if shifted:
        c.log_dict(run.info.run_id, shifted, SHIFT_ARTIFACT)
    if production_version:
        c.set_tag(run.info.run_id, vocab.COMPARED_TO_PRODUCTION, production_version)
    c.set_tag(run.info.run_id, vocab.GATES, "passed" if passed else "failed")
    summary = {"run_id": run.info.run_id, "passed": passed, "report": report,
               **({"shift_error": shifted["error"]} if shifted and shifted.get("error") else {})}
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

"""Markup in every field of every record a page shows stays text: the review card (its JSON from
MLflow artifacts and tags: requests, incidents, gate reports, datasets, lineage) and the health page
(pipeline names, alias problems), rendered and then read in a real headless Chromium."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.browser import Browser, chromium_path

EVIL = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>"\'&'


def marked(value):
    """``value`` with every string replaced by markup (dict keys too, where a page shows them)."""
    if isinstance(value, dict):
        return {(f"{k}{EVIL}" if k in SHOWN_KEYS else k): marked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [marked(v) for v in value]
    return f"{value}{EVIL}" if isinstance(value, str) else value


SHOWN_KEYS = {"purpose", "ticket", "hard_braking"}


def card() -> dict:
    per = {"hard_braking": {"candidate": {"sim.collision_rate": 0.1, "sim.min_ttc_s": 1.2, "offline.rmse": 0.3},
                            "production": {"sim.collision_rate": 0.0, "sim.min_ttc_s": 1.5, "offline.rmse": 0.2}}}
    feature = {"production": [0.1] * 10, "candidate": [0.1] * 10, "edges": list(range(11)), "psi": 0.1, "ks": 0.05,
               "mean": {"production": 1.0, "candidate": 1.1}}
    return marked({
        "model": "m", "version": "7", "compared_with": {"version": "6", "note": None},
        "metrics": [{"metric": "sim.collision_rate", "candidate": 0.1, "production": 0.0, "delta": 0.1}],
        "per_scenario": per,
        "gates": [{"metric": "sim.hard_braking.collision_rate", "passed": False, "value": 0.1, "reason": "too high",
                   "evidence": "1 of 10", "incidents": [{"incident": "INC-1", "collisions": 1, "episodes": 3}]},
                  {"metric": "offline.rmse", "passed": True, "value": 0.3}],  # a row with nothing optional
        "datasets": {"candidate": {"raw": {"digest": "ab" * 32, "sources": ["fleet-eu"], "window_start": "a",
                                           "window_end": "b", "rows_per_scenario": {"hard_braking": 3}},
                                   "labelled": {"digest": "cd" * 32, "rows": 3}},
                     "production": None, "label_policy": {"candidate": "p@1", "production": "p@0"}},
        "shift": {"features": {"ego_speed": feature}, "scenario_mix": {"psi": 0.2}},
        "request": {"purpose": "retrain", "ticket": "T-1"}, "incident": None,
        "lineage": {"pipeline": "p", "airflow_run": "p/r", "training_run": "abc", "gate_run": "def"},
        "review": None})


def health() -> dict:
    from closedloop.records.health import figures

    t0 = datetime(2026, 11, 20, 8, tzinfo=UTC)
    name = f"p{EVIL}"
    runs = [{"dag_id": name, "run_id": f"r{EVIL}", "state": "failed", "run_type": "manual", "run_after": t0,
             "queued_at": t0, "start_date": t0, "end_date": None}]
    h = figures({name: [name]}, runs, [], since=t0, until=t0 + timedelta(days=1))
    h["versions"] = {name: {"production": f"3{EVIL}", "candidate": "4", "registry_problems": [f"moved {EVIL}"]}}
    return h


def check(browser: Browser, page: str, path, shown: int) -> None:
    path.write_text(page, encoding="utf-8")
    browser.goto(f"file://{path}")
    assert browser.eval("typeof window.__pwned") == "undefined"
    assert browser.eval("document.querySelectorAll('script, img').length") == 0
    assert browser.eval(f"document.body.textContent.split({EVIL!r}).length - 1") >= shown


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_markup_in_every_field_stays_text_in_a_browser(tmp_path):
    from closedloop.steps.cards import render_html
    from closedloop.web.health_page import render

    with Browser() as b:
        check(b, render_html(card()), tmp_path / "card.html", shown=10)
        check(b, render(health(), 7), tmp_path / "health.html", shown=3)


def test_the_review_card_escapes_without_a_browser():
    from closedloop.steps.cards import render_html

    page = render_html(card())
    assert "<script>window.__pwned" not in page and "<img src=x" not in page
    assert "&lt;img src=x onerror=&#34;window.__pwned=1&#34;&gt;" in page


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_reviewer_reads_limit_value_bound_production_and_delta_per_gate(tmp_path):
    """Each gate row in a browser: the limit, the value, the confidence bound with its counts, production's
    value and the delta (coloured when worse); a gate with nothing to judge says N/A, never PASS."""
    from closedloop.spec import GateSpec
    from closedloop.steps.cards import render_html
    from closedloop.steps.gates import evaluate

    gates = [GateSpec(metric="sim.hard_braking.collision_rate", max=0.1, confidence=0.95),
             GateSpec(metric="offline.rmse", max=0.35, max_regression=0.01),
             GateSpec(metric="sim.regression.collision_rate", max=0.0)]
    metrics = {"sim.hard_braking.collision_rate": 0.0, "sim.hard_braking.collisions": 0,
               "sim.hard_braking.episodes": 59, "offline.rmse": 0.3, "sim.regression.episodes": 0}
    report = evaluate(gates, metrics, {"offline.rmse": 0.28})
    page = render_html({**{k: v for k, v in card().items() if k != "gates"}, "gates": report})
    (tmp_path / "card.html").write_text(page, encoding="utf-8")
    with Browser() as b:
        b.goto(f"file://{tmp_path / 'card.html'}")

        def cell(metric: str, css: str) -> str:
            return b.eval(f"document.querySelector('#gates tr[data-metric=\"{metric}\"] .{css}').textContent")

        assert cell("sim.hard_braking.collision_rate", "limit") == "<= 0.1 (95 % upper bound)"
        assert cell("sim.hard_braking.collision_rate", "bound").startswith("4.95 % (0 in 59, 95 % upper bound)")
        assert cell("sim.hard_braking.collision_rate", "verdict") == "PASS"
        assert (cell("offline.rmse", "production"), cell("offline.rmse", "delta")) == ("0.28", "+0.02")
        assert cell("offline.rmse", "verdict") == "FAIL"  # 0.02 worse than production, tolerance 0.01
        assert b.eval("document.querySelector('#gates tr[data-metric=\"offline.rmse\"] .delta')"
                      ".classList.contains('worse')")
        assert cell("sim.regression.collision_rate", "verdict") == "N/A"
        assert cell("sim.regression.collision_rate", "value") == "-"


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_charts_show_the_gate_limit_on_a_scale_that_shows_the_margin_and_regressions_come_first(tmp_path):
    from closedloop.steps.cards import render_html

    per = {"cruise": {"candidate": {"sim.min_ttc_s": 54.0}, "production": {"sim.min_ttc_s": 54.0}},
           "cut_in": {"candidate": {"sim.min_ttc_s": 1.8}, "production": {"sim.min_ttc_s": 2.4}}}
    metrics = [{"metric": "sim.cruise.min_ttc_s", "candidate": 54.0, "production": 54.0, "delta": 0.0},
               {"metric": "sim.cut_in.min_ttc_s", "candidate": 1.8, "production": 2.4, "delta": -0.6},
               {"metric": "sim.cut_in.collision_rate", "candidate": 0.0, "production": 0.0, "delta": 0.0},
               {"metric": "offline.rmse", "candidate": 0.2, "production": 0.25, "delta": -0.05}]
    card_ = {**card(), "per_scenario": per, "metrics": metrics,
             "gates": [{"metric": "sim.safety_critical.min_ttc_s", "min": 1.0, "passed": True, "value": 1.8}]}
    (tmp_path / "card.html").write_text(render_html(card_), encoding="utf-8")
    with Browser() as b:
        b.goto(f"file://{tmp_path / 'card.html'}")
        fig = "[...document.querySelectorAll('#charts figure')].find(f => f.textContent.includes('sim.min_ttc_s'))"
        assert "log scale" in b.eval(f"{fig}.querySelector('figcaption').textContent")
        assert b.eval(f"{fig}.querySelector('line.threshold').dataset.value") == "1"
        limit_x = float(b.eval(f"{fig}.querySelector('line.threshold').getAttribute('x1')"))
        cut_in = b.eval(f"[...{fig}.querySelectorAll('rect')].map(r => [r.getAttribute('x'), r.getAttribute('width')])")
        ends = sorted(float(x) + float(w) for x, w in cut_in)
        assert ends[0] - limit_x > 30  # 1.8 s against a 1 s limit: a visible margin, not a sliver
        groups = b.eval("[...document.querySelectorAll('#metrics tbody.group')].map(g => g.dataset.group)")
        assert groups[0] == "cut_in"  # the scenario where the candidate is worse comes first
        first = b.eval("document.querySelector('#metrics tbody.group tr[data-metric]').dataset.metric")
        assert first == "sim.cut_in.min_ttc_s"


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_lineage_graph_shows_full_labels_in_boxes_that_hold_them(tmp_path):
    """The lineage page's graph, drawn from a trace in a real browser: every label whole (no "approved by
    safety-lea"), inside its box, no two boxes overlapping, and markup in a label stays text."""
    from closedloop.runtime.pages import render

    (tmp_path / "lineage.html").write_text(render("lineage.html", ref=""), encoding="utf-8")
    trace = {"ref": "m@production", "model_version": {"name": "acc_longitudinal_policy", "version": "12", "aliases": []},
             "training_run": {"run_id": "a" * 32}, "airflow_run": {"dag_id": "acc_longitudinal_incident",
                                                                  "run_id": "r1", "started_by": {"trigger": "incident",
                                                                  "incident": {"id": f"INC-2026-1207{EVIL}"}}},
             "datasets": [{"kind": "raw", "digest": "b" * 64, "sources": ["fleet-eu", "fleet-us"]},
                          {"kind": "labelled", "digest": "c" * 64}],
             "label_policy": "expert_idm_smoothed@2", "template": {"pipeline": "acc_longitudinal"},
             "simulation": {"episodes": 377, "regression_catalog": "v3-abc"}, "gates": {"passed": True},
             "review": {"decision": "approved", "reviewer": "safety-lead, safety-deputy"}}
    with Browser() as b:
        b.goto(f"file://{tmp_path / 'lineage.html'}")
        b.eval(f"document.body.insertAdjacentHTML('beforeend', graph({__import__('json').dumps(trace)}))")
        assert b.eval("typeof window.__pwned") == "undefined"
        labels = b.eval("[...document.querySelectorAll('#graph g.node text')].map(t => t.textContent)")
        assert "review: approved by safety-lead, safety-deputy" in labels
        assert f"incident INC-2026-1207{EVIL}" in labels
        fits = b.eval("[...document.querySelectorAll('#graph g.node')].every(g => g.querySelector('text').getBBox()"
                      ".width + 6 <= g.querySelector('rect').getBBox().width)")
        assert fits
        boxes = b.eval("[...document.querySelectorAll('#graph g.node rect')].map(r => { const b = r.getBBox(); "
                       "return [b.x, b.y, b.x + b.width, b.y + b.height]; })")
        overlaps = [(p, q) for i, p in enumerate(boxes) for q in boxes[i + 1:]
                    if p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]]
        assert overlaps == []

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

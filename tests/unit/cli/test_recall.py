"""``closedloop recall``: what a person types is checked before anything is asked of Airflow, and what the
deployment answers reads as text."""

from __future__ import annotations

import subprocess
import sys

from closedloop.cli.recall import format_answer, format_summary


def closedloop(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "closedloop.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_a_malformed_recall_is_refused_before_airflow_is_asked():
    # no Airflow listens at this address: a request that got that far would say "cannot reach"
    env = {"AIRFLOW_API_URL": "http://127.0.0.1:9", "AIRFLOW_USERNAME": "x", "AIRFLOW_PASSWORD": "x"}
    out = closedloop("recall", "open", "--source", "fleet-eu", "--window", "last week", "--reason", "x", env=env)
    assert out.returncode == 2 and "--window 'last week': expected FIRST..LAST" in out.stderr, out.stderr
    out = closedloop("recall", "open", "--label-policy", "expert", "--reason", "x", env=env)
    assert out.returncode == 2 and "expected NAME@VERSION" in out.stderr
    out = closedloop("recall", "open", "--source", "a", "--label-policy", "b@1", "--reason", "x", env=env)
    assert out.returncode == 2 and "not allowed with argument" in out.stderr  # argparse: one input per recall
    out = closedloop("recall", "open", "--source", "fleet-eu", "--reason", "x", env=env)
    assert out.returncode == 1 and "127.0.0.1:9" in out.stderr  # well-formed: Airflow is asked


def test_the_answers_read_as_text():
    answer = {"id": "R-0123456789", "query": "source fleet-eu 2026-11-01..2026-11-08", "state": "open", "new": True,
              "opened_by": "carol", "reason": "clock drift", "totals": {"model_versions": 2, "pipelines": 1},
              "affected": [{"model": "m", "version": "3", "live": ["production"], "pipeline": "p", "run_id": "r",
                            "how": "trained on source fleet-eu"}],
              "proposals": [{"model": "m", "held": True, "production": "3", "why": "roll production back to 2"}],
              "retrains": [{"pipeline": "p", "run_id": "manual__1", "why": "without source fleet-eu"},
                           {"pipeline": "q", "run_id": None, "why": "q: recall.retrain is false"}]}
    text = format_answer(answer)
    assert text.splitlines()[0] == ("recall R-0123456789 (source fleet-eu 2026-11-01..2026-11-08): open, opened now"
                                    " — opened by carol: clock drift")
    assert "m v3 [production] (p, run r): trained on source fleet-eu" in text
    assert "… closedloop recall show R-0123456789 lists them all" in text  # 2 held, 1 listed
    assert "m: production v3 is held; roll production back to 2" in text
    assert "retrain p: run manual__1 (without source fleet-eu)" in text and "retrain q: q: recall.retrain" in text
    summary = {"id": "R-0123456789", "query": "label policy x@2", "state": "closed", "opened_by": "carol",
               "opened_at": "2026-12-01T00:00:00+00:00", "reason": "sign error", "closed_by": "bob",
               "closed_at": "2026-12-02T00:00:00+00:00", "hours_open": 24.0, "close_reason": "retired",
               "totals": {"model_versions": 0, "models": 0, "training_runs": 0, "snapshots": 0},
               "affected": [], "proposals": [], "waiting": []}
    assert "closed by bob at 2026-12-02T00:00:00+00:00 after 24.00 h: retired" in format_summary(summary)


def test_every_recall_command_has_help():
    for cmd in ("open", "close", "retrain", "list", "show"):
        out = closedloop("recall", cmd, "--help")
        assert out.returncode == 0 and "usage: closedloop recall " + cmd in out.stdout

"""The CLI's text: a trace lists a run's steps in the step table's order and names the release dossier."""

from __future__ import annotations

from closedloop import pipeline
from closedloop.records.render import format_dossier, format_trace


def _trace(steps: list[str]) -> dict:
    return {"ref": "m/3", "model_version": None, "training_run": None, "datasets": [], "validation": None,
            "label_policy": "p@1", "template": {"pipeline": "p", "file": "p.yaml", "hash": "h"},
            "airflow_run": {"dag_id": "p", "run_id": "r", "started_by": {"trigger": "schedule"}},
            "steps": [{"id": s, "run_id": f"run-{s}", "status": "FINISHED", "cache": "hit" if s == "label" else None}
                      for s in steps],
            "simulation": None, "gates": None, "review": None,
            "dossier": {"uri": "/data/dossiers/m/v3/dossier.json", "digest": "sha256:ab"}}


def test_a_trace_lists_the_runs_steps_and_its_dossier():
    order = [s for s in pipeline.ORDER if s in ("generate_dataset", "label", "train", "release_gate")]
    text = format_trace(_trace(order))
    line = next(x for x in text.splitlines() if x.startswith("steps"))
    assert line.split(None, 1)[1] == ("generate_dataset finished, label finished (cache hit), train finished, "
                                      "release_gate finished")
    assert "dossier         /data/dossiers/m/v3/dossier.json  (sha256:ab)" in text


def test_the_dossier_line_says_how_to_verify_it_offline():
    text = format_dossier({"model": "m", "version": "3", "uri": "/d/m/v3/dossier.json", "digest": "sha256:ab",
                           "html": "/d/m/v3/dossier.html", "verdict": "accepted"})
    assert text.splitlines()[0] == "release dossier of m v3: accepted"
    assert "closedloop dossier verify /d/m/v3 --key PUBLIC_KEY" in text

"""OpenLineage: with Airflow's OpenLineage provider installed (the optional extra ``openlineage``)
and a file transport configured, a real pipeline run through dag.test emits events whose
inputs and outputs are our snapshots and models. A subprocess: the provider reads its
configuration once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import NO_REVIEW, SAFE_DATA, scratch_project, template_text

pytestmark = pytest.mark.integration


def test_pipeline_tasks_report_datasets_and_models_to_openlineage(airflow_db, tmp_path, project):
    pytest.importorskip("airflow.providers.openlineage")
    root = scratch_project(tmp_path / "project")
    (root / "include" / "pipelines" / "acc_ol.yaml").write_text(template_text(project, gates="point", incidents=False, **NO_REVIEW,
        **SAFE_DATA, **{"name: acc_longitudinal": "name: acc_ol", "name: acc_longitudinal_policy": "name: acc_ol_model",
                        "window_days: 14": "window_days: 5"}))
    events_file = tmp_path / "openlineage.jsonl"
    code = textwrap.dedent("""
        from datetime import UTC, datetime
        from closedloop.local.run import load_dag, run_dag
        s = run_dag(load_dag("acc_ol"), datetime(2026, 11, 18, 3, tzinfo=UTC))
        print("STATE", s["state"])
    """)
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
           "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events_file),
                                                          "append": True}),
           "AIRFLOW__OPENLINEAGE__NAMESPACE": "closedloop-test"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "STATE success" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    done = {e["job"]["name"].rsplit(".", 1)[-1]: e for e in events if e.get("eventType") == "COMPLETE"
            and e["job"]["name"].startswith("acc_ol.")}

    def names(event, key):
        return {(d["namespace"], d["name"]) for d in event.get(key) or []}

    raw_out = names(done["generate_dataset"], "outputs")
    assert ("closedloop-fleet", "fleet-eu") in names(done["generate_dataset"], "inputs")
    assert len(raw_out) == 1 and next(iter(raw_out))[1].endswith(".parquet")
    assert names(done["label"], "inputs") == raw_out  # the label step reads what generate_dataset wrote
    labelled = names(done["label"], "outputs")
    assert names(done["train"], "inputs") == labelled
    model = names(done["train"], "outputs")
    assert len(model) == 1 and next(iter(model))[0].startswith("mlflow:")
    assert model <= names(done["offline_eval"], "inputs") and model == names(done["register_candidate"], "inputs")
    (registered,) = done["register_candidate"]["outputs"]
    assert registered["name"].startswith("models:/acc_ol_model/")
    version = done["generate_dataset"]["outputs"][0]["facets"]["version"]["datasetVersion"]
    assert len(version) == 64  # the snapshot's content digest (sha256 of its bytes)

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
from pathlib import Path

import pytest

from tests.conftest import NO_REVIEW, SAFE_DATA, scratch_project, template_text

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lineage_run(airflow_db, tmp_path_factory, project):
    """One pipeline run through dag.test with the OpenLineage provider on a file transport — and with
    one more step in the table (:mod:`tests.fixtures.extra_step`): one row and one function."""
    pytest.importorskip("airflow.providers.openlineage")
    tmp = tmp_path_factory.mktemp("openlineage")
    root = scratch_project(tmp / "project")
    (root / "include" / "pipelines" / "acc_ol.yaml").write_text(template_text(project, gates="point", incidents=False, **NO_REVIEW,
        **SAFE_DATA, **{"name: acc_longitudinal": "name: acc_ol", "name: acc_longitudinal_policy": "name: acc_ol_model",
                        "window_days: 14": "window_days: 5"}))
    events_file = tmp / "openlineage.jsonl"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from datetime import UTC, datetime
        from closedloop import pipeline
        from closedloop.local.run import load_dag, run_dag
        from tests.fixtures.extra_step import BEFORE, ROW
        with pipeline.with_row(ROW, before=BEFORE):
            dag = load_dag("acc_ol")
            print("TASKS", sorted(dag.task_ids))
            print("EDGES", sorted(dag.get_task(ROW.id).upstream_task_ids))
            s = run_dag(dag, datetime(2026, 11, 18, 3, tzinfo=UTC))
        print("STATE", s["state"])
        print("RUN", s["run_id"])
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
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0] in
                 ("TASKS", "EDGES", "RUN"))
    return {"done": done, "lines": lines, "root": root}


def names(event, key):
    return {(d["namespace"], d["name"]) for d in event.get(key) or []}


def test_pipeline_tasks_report_datasets_and_models_to_openlineage(lineage_run):
    done = lineage_run["done"]
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


def test_a_step_added_by_one_row_and_one_function_is_in_the_dag_describe_trace_lineage_and_crash_matrix(lineage_run):
    """The row and the function of :mod:`tests.fixtures.extra_step` — nothing else — put a step in the DAG
    (after its upstream, run by the generic operator), in ``describe``, in the trace of the run (its MLflow
    run, in the table's order), in OpenLineage (its inputs from its row) and in the crash-point matrix."""
    from closedloop import pipeline
    from closedloop.records.lineage import trace
    from closedloop.records.render import format_trace
    from closedloop.runtime.faults import matrix
    from closedloop.spec import load_spec
    from closedloop.spec.describe import describe
    from tests.fixtures.extra_step import BEFORE, ROW

    assert ROW.id not in pipeline.BY_ID and ROW.id not in matrix()  # not in the shipped table
    assert ROW.id in lineage_run["lines"]["TASKS"] and lineage_run["lines"]["EDGES"] == "['label']"
    labelled = names(lineage_run["done"]["label"], "outputs")
    assert names(lineage_run["done"][ROW.id], "inputs") == labelled and labelled
    with pipeline.with_row(ROW, before=BEFORE):
        assert matrix()[ROW.id] == pipeline.GENERIC_CRASH_POINTS
        text = describe(load_spec(lineage_run["root"] / "include" / "pipelines" / "acc_ol.yaml"))
        assert f"`{ROW.id}`: {ROW.doc}" in text
        order = [line.split("`")[1] for line in text.splitlines() if line[:1].isdigit() and ". `" in line]
        assert order.index("label") < order.index(ROW.id) < order.index(BEFORE)
        t = trace(lineage_run["lines"]["RUN"].strip())
        steps = [s["id"] for s in t["steps"]]
        assert steps.index("label") < steps.index(ROW.id) < steps.index(BEFORE)
        assert all(s["status"] == "FINISHED" for s in t["steps"]), t["steps"]
        assert f"{ROW.id} finished" in format_trace(t)
    from closedloop.runtime.tracking import finished_result, mlflow_client

    run = mlflow_client().get_run(next(s["run_id"] for s in t["steps"] if s["id"] == ROW.id))
    result = finished_result(run)
    label_version = lineage_run["done"]["label"]["outputs"][0]["facets"]["version"]["datasetVersion"]
    assert result["rows"] > 0 and result["mean_ego_speed"] > 0 and result["digest"] == label_version

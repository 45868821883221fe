"""validate_data's Great Expectations run: the compact report, GX's own result and its Data Docs, published on
the step's MLflow run (real Great Expectations, real MLflow on SQLite)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from closedloop.steps.validation import DOCS_ARTIFACTS, load_suite, publish, validate_frame

SUITE = {"name": "tiny", "expectations": [
    {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "gap"}},
    {"type": "expect_column_values_to_be_between", "kwargs": {"column": "ego_speed", "min_value": 0, "max_value": 60}},
]}


def test_a_failed_check_has_its_own_data_docs_page_on_the_steps_run(tmp_path):
    from mlflow import MlflowClient

    frame = pd.DataFrame({"gap": [5.0, None, 7.0], "ego_speed": [10.0, 20.0, 99.0]})
    docs = tmp_path / "docs"
    report, result = validate_frame(frame, SUITE, docs_dir=docs, run_name="acc/manual__2026-12-07T10:00:00+00:00")
    assert not report["success"] and report["failed"] == 2 and report["evaluated"] == 2
    assert result["success"] is False and len(result["results"]) == 2  # Great Expectations' own result
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("v", artifact_location=str(tmp_path / "artifacts")))
    links = publish(client, run, docs, result)
    assert links["run_id"] == run.info.run_id
    assert links["page"].startswith(f"{DOCS_ARTIFACTS}/validations/tiny/acc_manual__2026-12-07T10_00_00+00_00/")
    page = Path(client.download_artifacts(run.info.run_id, links["page"], str(tmp_path / "dl")))
    html = re.sub(r"<(style|script).*?</\1>", "", page.read_text(), flags=re.S)
    html = " ".join(re.sub(r"<[^>]+>", " ", html).split())  # the text a reader sees
    assert "values must be greater than or equal to 0.0 and less than or equal to 60.0" in html
    assert "values must never be null" in html and "Expectation Suite:" in html
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, links["result"], str(tmp_path / "r")))
                        .read_text())
    assert stored["success"] is False and stored["statistics"]["unsuccessful_expectations"] == 2
    listed = {a.path for a in client.list_artifacts(run.info.run_id, f"{DOCS_ARTIFACTS}/static")}
    assert f"{DOCS_ARTIFACTS}/static/styles" in listed and f"{DOCS_ARTIFACTS}/static/fonts" not in listed


def test_without_a_docs_folder_nothing_is_built_and_the_shipped_suite_passes_good_data(project):
    suite = load_suite(project / "include" / "expectations" / "drive_log_labels.json")
    columns = {e["kwargs"]["column"] for e in suite["expectations"] if "column" in e["kwargs"]}
    report, result = validate_frame(pd.DataFrame({c: [] for c in columns}), suite)
    assert report["suite"] == "drive_log_labels" and report["evaluated"] == len(suite["expectations"])
    assert result["results"]


@pytest.mark.parametrize("bad", [None])
def test_the_report_names_what_failed(bad, tmp_path):
    report, _ = validate_frame(pd.DataFrame({"gap": [bad], "ego_speed": [1.0]}), SUITE)
    failed = [c for c in report["checks"] if not c["success"]]
    assert [(c["expectation"], c["column"]) for c in failed] == [("expect_column_values_to_not_be_null", "gap")]

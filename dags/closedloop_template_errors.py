"""Template errors as this airflow DAG file's import error (it builds no DAG, so an error here hides nothing)."""

from pathlib import Path

from closedloop.dagbuilder import raise_template_errors

raise_template_errors(Path(__file__).resolve().parent.parent / "include" / "pipelines")

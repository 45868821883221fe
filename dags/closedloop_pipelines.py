"""One Airflow DAG per pipeline template in include/pipelines/ (airflow DAG file; no logic here)."""

from pathlib import Path

from closedloop.dagbuilder import build_dags

build_dags(Path(__file__).resolve().parent.parent / "include" / "pipelines", globals())

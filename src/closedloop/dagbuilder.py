"""Spec → DAG, in stages: load (YAML) → validate (schema) → build (Airflow objects).

Cheap on purpose: called by the DAG processor on every parse, it imports no mlflow,
great_expectations, sklearn, pandas or numpy. Each template is built in its own try, so a
broken one never hides the others; the broken ones are reported as this DAG file's import
error (see :func:`build_dags`).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG

from closedloop.describe import describe
from closedloop.errors import SpecError
from closedloop.operators.data import GenerateDatasetOperator, LabelOperator, ValidateDataOperator
from closedloop.operators.model import (
    OfflineEvalOperator,
    RegisterCandidateOperator,
    ReleaseGateOperator,
    TrainOperator,
)
from closedloop.operators.simulation import SimulateOperator
from closedloop.request import dag_params
from closedloop.spec import LoadedSpec, load_all

log = logging.getLogger(__name__)

INVALID_DAG_ID = "closedloop_invalid_templates"


def build_dag(loaded: LoadedSpec) -> DAG:
    """One DAG for one validated template; the task graph is the same for every pipeline."""
    spec = loaded.spec
    default_args = {
        "owner": spec.owner,
        "retries": 2,
        "retry_delay": timedelta(seconds=20),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
    }
    with DAG(
        dag_id=spec.name,
        description=spec.description.strip().split("\n")[0][:200],
        doc_md=describe(loaded),
        schedule=spec.schedule,
        start_date=datetime.combine(spec.start_date, datetime.min.time(), tzinfo=UTC) if spec.start_date else None,
        catchup=spec.catchup,
        max_active_runs=4,
        default_args=default_args,
        tags=sorted({"closedloop", *spec.tags}),
        params=dag_params(spec),
    ) as dag:
        common: dict[str, Any] = {"loaded": loaded}
        generate = GenerateDatasetOperator(task_id="generate_dataset", **common)
        label = LabelOperator(task_id="label", **common)
        validate = ValidateDataOperator(task_id="validate_data", **common)
        train = TrainOperator(task_id="train", **common)
        offline = OfflineEvalOperator(task_id="offline_eval", **common)
        simulate = SimulateOperator(task_id="simulate", **common)
        gate = ReleaseGateOperator(task_id="release_gate", retries=0, **common)
        register = RegisterCandidateOperator(task_id="register_candidate", **common)
        generate >> label >> validate >> train >> offline >> simulate >> gate >> register
        label >> offline  # evaluation reads the dataset as well as the model
        if spec.hil is not None:
            from closedloop.operators.governance import HilResultsOperator

            simulate >> HilResultsOperator(task_id="await_hil", retries=0, **common) >> gate
        if spec.approval is not None:
            from closedloop.operators.governance import PromoteOperator, ReviewOperator

            review = ReviewOperator(task_id="approval", retries=0, **common)
            promote = PromoteOperator(task_id="promote", **common)
            register >> review >> promote
    return dag


class InvalidTemplates(DAG):
    """Placeholder that carries template errors into Airflow's import errors.

    Airflow validates each DAG found in a file before keeping it and records a failure as the
    file's import error, while keeping the file's other DAGs. This DAG fails that validation
    with every template error, so they appear in the UI (and ``airflow dags list-import-errors``)
    and the valid pipelines still load.
    """

    def __init__(self, errors: list[SpecError]) -> None:
        super().__init__(dag_id=INVALID_DAG_ID, schedule=None)
        self.errors_text = "\n\n".join(str(e) for e in errors)

    def validate(self) -> None:
        raise SpecError(f"{self.errors_text}\n\nThe other pipeline templates were loaded. "
                        "Run `closedloop pipelines validate` to check templates before deploying.")


def build_dags(pipelines_dir: str | Path, namespace: dict[str, Any] | None = None) -> dict[str, DAG]:
    """Build every template in ``pipelines_dir``; put the DAGs (and any error carrier) in ``namespace``."""
    started = time.perf_counter()
    specs, errors = load_all(pipelines_dir)
    dags: dict[str, DAG] = {}
    for loaded in specs:
        try:
            dags[loaded.spec.name] = build_dag(loaded)
        except Exception as exc:  # one broken pipeline must not hide the others
            errors.append(SpecError(f"{loaded.path}: cannot build DAG: {type(exc).__name__}: {exc}",
                                    path=str(loaded.path)))
    for err in errors:
        log.error("%s", err)
    if namespace is not None:
        namespace.update({f"dag_{name}": dag for name, dag in dags.items()})
        namespace.pop("dag_" + INVALID_DAG_ID, None)
        if errors:
            namespace["dag_" + INVALID_DAG_ID] = InvalidTemplates(errors)
    log.info("closedloop: built %d pipeline DAGs (%d template errors) in %.1f ms",
             len(dags), len(errors), (time.perf_counter() - started) * 1000)
    return dags

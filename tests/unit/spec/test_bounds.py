"""Inputs stay in bounds: a rerun's pinned snapshot (Airflow's own param validation, then the step's
check), and values put into MLflow search filters (a real MLflow store)."""

from __future__ import annotations

import os

import pytest

from closedloop import settings
from closedloop.errors import PermanentError
from closedloop.spec import load_spec
from closedloop.steps.dataset import check_pin

D = "ab" * 32


@pytest.fixture(scope="module")
def dag(project):
    """The DAG as the API server holds it (serialized), whose params check a new run's conf."""
    from airflow.serialization.serialized_objects import DagSerialization

    from closedloop.dagbuilder import build_dag

    loaded = load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml")
    return DagSerialization.from_dict(DagSerialization.to_dict(build_dag(loaded)))


def pin(uri: str, digest: str = D) -> dict:
    return {"of": "acc_longitudinal/manual__1", "fresh_data": False,
            "raw": {"uri": uri, "digest": digest, "window_start": "2026-11-09", "window_end": "2026-11-23",
                    "rows": 10, "sources": ["fleet-eu"]}}


def test_airflow_refuses_a_rerun_conf_naming_data_outside_the_root(dag):
    from airflow.exceptions import ParamValidationError

    root = settings.data_root()
    dag.params.deep_merge({"closedloop_rerun": pin(f"{root}/acc_longitudinal/raw/{D}.parquet")}).validate()
    for uri in ("http://attacker.example/x.parquet", f"file://{root}/acc_longitudinal/raw/{D}.parquet",
                "/etc/passwd", f"{root}/acc_longitudinal/raw/../../../etc/{D}.parquet",
                f"{root}/other_pipeline/raw/{D}.parquet", f"{root}/acc_longitudinal/labelled/{D}.parquet"):
        with pytest.raises(ParamValidationError, match="closedloop_rerun"):
            dag.params.deep_merge({"closedloop_rerun": pin(uri)}).validate()
    with pytest.raises(ParamValidationError, match="does not match"):  # a short (display) digest
        dag.params.deep_merge({"closedloop_rerun": pin(f"{root}/acc_longitudinal/raw/{D}.parquet", D[:12])}).validate()
    with pytest.raises(ParamValidationError, match="Additional properties"):
        dag.params.deep_merge({"closedloop_rerun": {**pin(f"{root}/x"), "raw_uri": "http://x"}}).validate()


def test_the_step_checks_the_pin_again_and_resolves_symlinks(tmp_path):
    root = tmp_path / "data"
    (root / "p" / "raw").mkdir(parents=True)
    inside = f"{root}/p/raw/{D}.parquet"
    check_pin(pin(inside)["raw"], root=str(root), pipeline="p")
    with pytest.raises(PermanentError, match="outside this pipeline's data root"):
        check_pin(pin("http://x/y.parquet")["raw"], root=str(root), pipeline="p")
    with pytest.raises(PermanentError, match="not a sha256"):
        check_pin(pin(inside, "0" * 16)["raw"], root=str(root), pipeline="p")
    secret = tmp_path / "elsewhere.parquet"
    secret.write_bytes(b"not yours")
    os.symlink(secret, inside)  # a link planted inside the root, pointing out of it
    with pytest.raises(PermanentError, match="outside the data root"):
        check_pin(pin(inside)["raw"], root=str(root), pipeline="p")


def test_filter_values_are_quoted_never_spliced(tmp_path):
    from mlflow import MlflowClient

    from closedloop.runtime.tracking import literal

    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("bounds")
    c.create_run(exp, tags={"k": "it's", "other": "x"})
    c.create_run(exp, tags={"k": "plain", "other": "secret"})
    assert len(c.search_runs([exp], f"tags.k = {literal(chr(39).join(['it', 's']))}")) == 1
    hostile = "x' or tags.other = 'secret"  # would widen a naively quoted filter
    assert c.search_runs([exp], f"tags.k = {literal(hostile)}") == []
    for bad in ("both ' and \"", "line\nbreak"):
        with pytest.raises(ValueError, match="cannot|control"):
            literal(bad)


def test_impact_refuses_wildcards_and_pages_with_totals(tmp_path):
    from closedloop.records.lineage import MAX_LIMIT, LineageError, impact

    store = f"sqlite:///{tmp_path / 'empty.db'}"  # its own store: other tests' runs are not counted
    for kwargs in ({"source": "%"}, {"source": "fleet,eu"}, {"label_policy": "%"}, {"label_policy": "a@%"}):
        with pytest.raises(LineageError, match="wildcards"):
            impact(**kwargs, tracking_uri=store)
    with pytest.raises(LineageError, match="limit must be"):
        impact(source="fleet-eu", limit=MAX_LIMIT + 1, tracking_uri=store)
    out = impact(source="fleet-eu", limit=5, tracking_uri=store)
    assert out["totals"] == {"snapshots": 0, "training_runs": 0, "model_versions": 0} and out["limit"] == 5

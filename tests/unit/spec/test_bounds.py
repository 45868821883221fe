"""Inputs stay in bounds: a rerun's pinned snapshot (checked by the run's first step, then where the file
is read), and values put into MLflow search filters (a real MLflow store)."""

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


def pin(uri: str | None, digest: str = D) -> dict:
    return {"of": "acc_longitudinal/manual__1", "fresh_data": False,
            "raw": {"uri": uri, "digest": digest, "window_start": "2026-11-09", "window_end": "2026-11-23",
                    "rows": 10, "sources": ["fleet-eu"]}}


def test_a_rerun_names_its_snapshot_by_digest_and_nothing_else():
    """`closedloop_rerun` is checked by the run's first step: a snapshot named by a URI or path (anywhere, even
    the right one), a short digest, a malformed original or an unknown key is refused, naming the field."""
    from closedloop.spec.request import parse_rerun

    good = {"of": "acc_longitudinal/manual__1", "raw": {"digest": D, "window_start": "2026-11-09",
                                                        "window_end": "2026-11-23", "rows": 10, "sources": ["fleet-eu"]}}
    assert parse_rerun(good)["raw"] == {**good["raw"]}
    root = settings.data_root()
    for uri in ("http://attacker.example/x.parquet", f"file:///etc/{D}.parquet", "/etc/passwd",
                f"{root}/acc_longitudinal/raw/{D}.parquet"):
        with pytest.raises(ValueError, match=r"closedloop_rerun\.raw\.uri: extra inputs are not permitted"):
            parse_rerun({**good, "raw": {**good["raw"], "uri": uri}})
    with pytest.raises(ValueError, match=r"closedloop_rerun\.raw\.digest: string should match pattern"):
        parse_rerun({**good, "raw": {**good["raw"], "digest": D[:12]}})  # a short (display) digest
    with pytest.raises(ValueError, match=r"closedloop_rerun\.of: string should match pattern"):
        parse_rerun({**good, "of": "no slash"})
    with pytest.raises(ValueError, match=r"closedloop_rerun\.raw_uri: extra inputs"):
        parse_rerun({**good, "raw_uri": "http://x"})
    with pytest.raises(ValueError, match=r"closedloop_rerun: input should be a valid dictionary"):
        parse_rerun("acc_longitudinal/manual__1")


def test_the_trigger_form_shows_the_request_only_with_no_machine_path(dag, project):
    """The DAG's params (Airflow's trigger form) are the request's fields; nothing internal, no path."""
    import json

    from airflow.serialization.serialized_objects import DagSerialization

    from closedloop.dagbuilder import build_dag

    assert set(dag.params.keys()) == {"purpose", "change", "expected_impact", "scope", "ticket"}
    built = build_dag(load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml"))
    params = json.dumps(DagSerialization.to_dict(built)["dag"]["params"])
    assert "purpose" in params
    assert settings.data_root() not in params and str(settings.project_dir()) not in params


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

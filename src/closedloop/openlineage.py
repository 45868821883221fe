"""OpenLineage inputs and outputs of our tasks, for Airflow's OpenLineage provider (optional).

With ``apache-airflow-providers-openlineage`` installed and a transport configured, the
provider asks each finished task for ``get_openlineage_facets_on_complete``; our operators
answer with the datasets and models the step read and wrote (from its XCom results):

==================  =============================  ====================================
task                inputs                         outputs
==================  =============================  ====================================
generate_dataset    fleet log sources              raw snapshot
label               raw snapshot                   labelled snapshot
validate_data       labelled snapshot
train               labelled snapshot              model (MLflow run artifact)
offline_eval        labelled snapshot, model
simulate            model, scenario set
release_gate        model
register_candidate  model                          registered model version
promote             registered model version       production alias
==================  =============================  ====================================

Without the provider the package works as before: nothing here is imported.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

FLEET_NAMESPACE = "closedloop-fleet"


def _location(uri: str) -> tuple[str, str]:
    """OpenLineage (namespace, name) of a file or object URI."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return "file", parsed.path or uri
    return f"{parsed.scheme}://{parsed.netloc}", parsed.path.lstrip("/")


def _dataset(namespace: str, name: str, *, version: str | None = None, rows: int | None = None, output=False):
    from openlineage.client.event_v2 import Dataset, OutputDataset
    from openlineage.client.facet_v2 import dataset_version_dataset, output_statistics_output_dataset

    facets = {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=version)} if version else {}
    if output:
        out_facets = ({"outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=rows)} if rows is not None else {})
        return OutputDataset(namespace=namespace, name=name, facets=facets, outputFacets=out_facets)
    return Dataset(namespace=namespace, name=name, facets=facets)


def _snapshot(ref: dict | None, output: bool = False):
    if not ref or not ref.get("uri"):
        return []
    ns, name = _location(ref["uri"])
    return [_dataset(ns, name, version=ref.get("digest"), rows=ref.get("rows"), output=output)]


def _model(uri: str | None, tracking_uri: str, output: bool = False, version: str | None = None):
    if not uri:
        return []
    return [_dataset(f"mlflow:{tracking_uri}", uri, version=version, output=output)]


def operator_lineage(operator, task_instance) -> Any:
    """The ``OperatorLineage`` of one finished task of ours (None without the provider), from the
    results the task read and made (``operator.seen``)."""
    try:
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    from closedloop import pipeline, settings

    def result(task_id: str) -> dict:
        return operator.seen.get(task_id) or {}

    spec = operator.loaded.spec
    tracking = settings.tracking_uri()
    made_by = {kind: row.id for row in pipeline.STEPS for kind in row.lineage_out}  # kind → the row that makes it

    def made(kind: str) -> dict:
        return result(made_by[kind]) if kind in made_by else {}

    def datasets(kind: str, output: bool) -> list:
        got = made(kind)
        if kind == "sources":
            return [_dataset(FLEET_NAMESPACE, s) for s in made("raw").get("sources") or spec.dataset.sources]
        if kind in ("raw", "labelled"):
            return _snapshot(got, output=output)
        if kind == "model":
            return _model(got.get("model_uri"), tracking, output=output)
        if kind == "scenarios":
            return [_dataset("file", str(operator.loaded.scenario_path))]
        if kind == "registered":
            return _model(got.get("model_uri"), tracking, version=got.get("version"), output=output)
        # production
        return _model(f"models:/{spec.model.name}@production", tracking, version=str(got.get("version") or ""),
                      output=True) if got else []

    row = pipeline.BY_ID.get(pipeline.row_id(operator.task_id))
    if row is None:
        return OperatorLineage(inputs=[], outputs=[])
    return OperatorLineage(inputs=[d for k in row.lineage_in for d in datasets(k, False)],
                           outputs=[d for k in row.lineage_out for d in datasets(k, True)])

"""Online KPIs of the production model, as online monitoring logs them to MLflow.

Monitoring logs one MLflow run per report in the experiment ``closedloop-monitoring/<model>``,
tagged with the model version it observed (``closedloop.model_version``). The KPI watcher reads
the newest value of each metric for the version the ``production`` alias points at.
``closedloop kpi report`` logs such a run by hand (or from a monitoring job).
"""

from __future__ import annotations

from typing import Any

from closedloop import settings, vocab
from closedloop.runtime.tracking import alias_version, mlflow_client

PRODUCTION = "production"


def experiment_name(model: str) -> str:
    return f"closedloop-monitoring/{model}"


def production_version(client, model: str) -> str | None:
    return alias_version(client, model, PRODUCTION)


def report_kpis(model: str, metrics: dict[str, float], *, version: str | None = None,
                tracking_uri: str | None = None, source: str = "closedloop kpi report") -> dict[str, Any]:
    """Log one monitoring report for ``model`` (default: its production version).

    :raises LookupError: when the model has no production version and none was given.
    """
    c = mlflow_client(tracking_uri)
    version = version or production_version(c, model)
    if version is None:
        raise LookupError(f"model {model!r} has no 'production' version to report KPIs for; pass a version")
    exp = c.get_experiment_by_name(experiment_name(model))
    exp_id = exp.experiment_id if exp else c.create_experiment(
        experiment_name(model), artifact_location=settings.artifact_root(c.tracking_uri))
    run = c.create_run(exp_id, run_name=f"kpis v{version}", tags={
        vocab.MONITORED_MODEL: model, vocab.MODEL_VERSION: str(version), vocab.MONITORING_SOURCE: source})
    from closedloop.runtime.tracking import metric_entities

    c.log_batch(run.info.run_id, metrics=metric_entities(metrics))
    c.set_terminated(run.info.run_id, "FINISHED")
    return {"model": model, "version": str(version), "run_id": run.info.run_id, "metrics": dict(metrics)}


def latest_kpis(model: str, metrics: list[str], *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The newest value of each metric for the production version: ``{"version", "values"}``."""
    c = mlflow_client(tracking_uri)
    version = production_version(c, model)
    exp = c.get_experiment_by_name(experiment_name(model))
    if version is None or exp is None:
        return {"version": version, "values": {}}
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`closedloop.model_version` = '{version}'",
                         order_by=["attributes.start_time DESC"], max_results=50)
    values: dict[str, float] = {}
    for run in runs:
        for name in metrics:
            if name not in values and name in run.data.metrics:
                values[name] = float(run.data.metrics[name])
    return {"version": version, "values": values}

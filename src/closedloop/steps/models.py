"""Saving and loading models in MLflow's sklearn flavour (skops format)."""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def _allow_deserialization():
    # MLflow refuses to deserialize any model unless this is set. The models we load are the
    # ones our own train step wrote to our own registry, in skops format with an explicit
    # allow-list of types; the permission is granted for the duration of the load only.
    old = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = old


def load_model(model_uri: str):
    import mlflow

    with _allow_deserialization():
        return mlflow.sklearn.load_model(model_uri)


def log_model(model, *, trainer, pip_requirements: list[str]):
    """Log ``model`` to the active run; ``trainer.skops_trusted_types`` lists extra trusted types."""
    import warnings

    import mlflow

    with warnings.catch_warnings():
        # skops looks up objects without a module (scipy's ufuncs) in every loaded module; in a task
        # process that includes Airflow's deprecated import shims, each of which warns on the lookup:
        # a thousand warnings sent through the task log, seconds of a train task for nothing
        warnings.filterwarnings("ignore", message=r"The `airflow\.")
        return mlflow.sklearn.log_model(model, name="model", pip_requirements=pip_requirements,
                                        skops_trusted_types=getattr(trainer, "skops_trusted_types", None))

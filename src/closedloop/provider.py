"""Provider metadata, found by Airflow through the ``apache_airflow_provider`` entry point.

It registers the ``mlflow`` connection type (:class:`closedloop.hooks.mlflow.MLflowHook`): Airflow's connection
form then offers "MLflow" with its own fields, and ``airflow providers hooks`` lists it. The form is described
here, declaratively, so Airflow's API server builds it without importing the hook.
"""

from __future__ import annotations

MLFLOW_CONNECTION = {
    "connection-type": "mlflow",
    "hook-class-name": "closedloop.hooks.mlflow.MLflowHook",
    "hook-name": "MLflow",
    "conn-fields": {
        "tracking_uri": {
            "label": "Tracking URI",
            "description": "the whole MLflow tracking URI (e.g. https://mlflow.example.com or "
                           "postgresql://…); when set, host, port and scheme are not used",
            "schema": {"type": ["string", "null"]},
        },
    },
    "ui-field-behaviour": {
        "hidden-fields": ["extra"],
        "relabeling": {"host": "MLflow server host", "schema": "Scheme (http or https)",
                       "login": "MLflow user", "password": "MLflow password"},
        "placeholders": {"host": "mlflow.example.com", "port": "5000", "schema": "https",
                         "login": "closedloop-pipelines (the pipelines' service account)"},
    },
}


def get_provider_info() -> dict:
    from closedloop import __version__

    return {
        "package-name": "airflow-closedloop",
        "name": "Closed Loop",
        "description": "Closed-loop retraining of driving models: templates, gates, MLflow registry.",
        "versions": [__version__],
        "connection-types": [MLFLOW_CONNECTION],
        "extra-links": [],
    }

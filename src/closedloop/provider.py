"""Provider metadata, found by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations


def get_provider_info() -> dict:
    from closedloop import __version__

    return {
        "package-name": "airflow-closedloop",
        "name": "Closed Loop",
        "description": "Closed-loop retraining of driving models: templates, gates, MLflow registry.",
        "versions": [__version__],
        "connection-types": [],
        "extra-links": [],
    }

"""MLflowHook: the connection wins over the environment; credentials stay out of the URI."""

from __future__ import annotations

import json

from closedloop.hooks.mlflow import MLflowHook


def test_without_connection_the_environment_applies(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_MLFLOW_DEFAULT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x/mlflow.db")
    assert MLflowHook().tracking_uri() == "sqlite:////tmp/x/mlflow.db"
    assert MLflowHook().credentials_env() == {}


def test_connection_host_port_and_credentials(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps(
        {"conn_type": "mlflow", "host": "mlflow.internal", "port": 5000, "login": "svc", "password": "s3cret"}))
    hook = MLflowHook()
    assert hook.tracking_uri() == "http://mlflow.internal:5000"
    assert hook.credentials_env() == {"MLFLOW_TRACKING_USERNAME": "svc", "MLFLOW_TRACKING_PASSWORD": "s3cret"}


def test_connection_extra_tracking_uri_wins(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_PROD", json.dumps(
        {"conn_type": "mlflow", "host": "ignored", "extra": {"tracking_uri": "https://mlflow.example:8443"}}))
    assert MLflowHook("mlflow_prod").tracking_uri() == "https://mlflow.example:8443"

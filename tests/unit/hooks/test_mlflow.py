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


def test_the_test_button_reads_a_real_store_and_names_what_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_LOCAL", json.dumps(
        {"conn_type": "mlflow", "extra": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    ok, message = MLflowHook("mlflow_local").test_connection()
    assert ok and "is readable" in message
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_GONE", json.dumps({"conn_type": "mlflow", "host": "127.0.0.1",
                                                               "port": port}))
    ok, message = MLflowHook("mlflow_gone").test_connection()
    assert not ok and message.startswith(f"cannot reach MLflow at http://127.0.0.1:{port}")


def test_the_form_field_of_the_connection_type_is_read(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_FORM", json.dumps(
        {"conn_type": "mlflow", "host": "ignored", "extra": {"extra__mlflow__tracking_uri": "https://ml.example"}}))
    assert MLflowHook("mlflow_form").tracking_uri() == "https://ml.example"


def test_airflow_lists_the_mlflow_connection_type_with_its_form():
    """`airflow providers hooks` (Airflow's own CLI, a fresh process) lists the type; the form has its field."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "airflow", "providers", "hooks", "--output", "json"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    hooks = {h["connection_type"]: h for h in json.loads(out.stdout[out.stdout.index("["):])}
    assert hooks["mlflow"]["class"] == "closedloop.hooks.mlflow.MLflowHook"
    assert hooks["mlflow"]["package_name"] == "airflow-closedloop" and hooks["mlflow"]["hook_name"] == "MLflow"
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    assert "extra__mlflow__tracking_uri" in pm.connection_form_widgets
    assert pm.field_behaviours["mlflow"]["relabeling"]["host"] == "MLflow server host"
    assert pm.hooks["mlflow"].connection_testable

"""Where the CLI's Airflow is and who it is there: flags, then the environment, then the running local
deployment of this checkout (any port, its generated logins), then the default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from closedloop.records.airflow_api import AirflowAPI, local_deployment


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOSEDLOOP_HOME", str(tmp_path))
    for key in ("AIRFLOW_API_URL", "AIRFLOW_USERNAME", "AIRFLOW_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "pw.json").write_text(json.dumps({"safety-lead": "pw-of-lead"}))
    return tmp_path


def announce(home, pid: int) -> None:
    (home / "endpoint.json").write_text(json.dumps({"airflow": "http://127.0.0.1:8123", "mlflow": "http://127.0.0.1:5123",
                                                    "pid": pid, "passwords": str(home / "pw.json")}))


def test_the_running_local_deployment_is_found_on_its_port_with_its_logins(home):
    announce(home, os.getpid())
    api = AirflowAPI(user="safety-lead")
    assert (api.url, api.password) == ("http://127.0.0.1:8123", "pw-of-lead")
    assert AirflowAPI(user="nobody").password is None  # an unknown login gets no one's password


def test_flags_and_the_environment_win_and_a_remote_airflow_never_gets_local_passwords(home, monkeypatch):
    announce(home, os.getpid())
    assert AirflowAPI(url="http://airflow.example:8080", user="safety-lead").password is None
    monkeypatch.setenv("AIRFLOW_API_URL", "https://airflow.example")
    api = AirflowAPI(user="safety-lead")
    assert (api.url, api.password) == ("https://airflow.example", None)
    monkeypatch.setenv("AIRFLOW_PASSWORD", "from-env")
    monkeypatch.delenv("AIRFLOW_API_URL")
    assert AirflowAPI(user="safety-lead").password == "from-env"


def test_a_deployment_that_stopped_is_not_used(home):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    announce(home, gone.pid)
    assert local_deployment() is None
    assert AirflowAPI(user="safety-lead").url == "http://127.0.0.1:8080"
    (home / "endpoint.json").write_text("{not json")
    assert local_deployment() is None

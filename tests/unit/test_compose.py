"""docker-compose.yaml describes the production shape: its services, health checks, volumes and
security defaults. (`docker compose config` also runs when the Compose plugin is installed; Debian
does not package it, so here the file is checked as YAML with Compose's merge keys resolved.)"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

AIRFLOW = ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker")


@pytest.fixture(scope="module")
def compose(project) -> dict:
    return yaml.safe_load((project / "docker-compose.yaml").read_text())


def test_services_of_the_production_shape(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "mlflow", "airflow-init", "airflow-settings", *AIRFLOW}
    for name in AIRFLOW:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
        assert services[name]["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}
        assert "--extra production" in services[name]["build"]["dockerfile_inline"]  # the locked production set
    assert services["airflow-worker"]["deploy"]["replicas"] == 2
    assert "--backend-store-uri postgresql://" in services["mlflow"]["command"]
    assert "--serve-artifacts" in services["mlflow"]["command"]  # artifacts proxied through the server
    assert services["airflow-settings"]["command"] == "closedloop settings apply /opt/closedloop/airflow_settings.yaml"
    assert services["airflow-settings"]["depends_on"] == {"airflow-api-server": {"condition": "service_healthy"}}


def test_every_long_running_service_has_a_health_check(compose):
    for name, service in compose["services"].items():
        if name in ("airflow-init", "airflow-settings"):
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL") and check["retries"] >= 10, name
    deps = compose["services"]["airflow-scheduler"]["depends_on"]
    assert all(deps[s] == {"condition": "service_healthy"} for s in ("postgres", "redis", "mlflow"))


def test_volumes_are_declared_and_state_survives(compose):
    declared = set(compose["volumes"])
    used = {v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])
            if not v.startswith(".")}
    assert used == declared == {"postgres-data", "mlflow-artifacts", "closedloop-data", "airflow-logs"}
    for name in AIRFLOW:  # task logs shared, so the API server reads what a worker wrote
        assert "airflow-logs:/opt/airflow/logs" in compose["services"][name]["volumes"]


def test_nothing_listens_beyond_localhost_and_no_secret_is_written_down(compose, project):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    text = (project / "docker-compose.yaml").read_text()
    assert "${POSTGRES_PASSWORD:-" in text and "${AIRFLOW_ADMIN_PASSWORD:-" in text  # from the environment / .env


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_config_accepts_the_file(project):
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker CLI has no Compose plugin here (Debian does not package it)")
    out = subprocess.run(["docker", "compose", "-f", str(project / "docker-compose.yaml"), "config", "-q"],
                         capture_output=True, text=True, cwd=project)
    assert out.returncode == 0, out.stderr

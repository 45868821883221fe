"""docker-compose.yaml describes the production shape: its services, health checks, volumes and
security defaults; the image it builds; and Compose's own check, ``config`` (with the Compose
plugin when the docker CLI has it, else with Debian's ``docker-compose`` package, which
``.ci/run`` installs: neither needs a Docker engine)."""

from __future__ import annotations

import json
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
        assert services[name]["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert services["airflow-worker"]["deploy"]["replicas"] == 2
    assert "--backend-store-uri postgresql://" in services["mlflow"]["command"]
    assert "--serve-artifacts" in services["mlflow"]["command"]  # artifacts proxied through the server
    assert "--app-name basic-auth" in services["mlflow"]["command"]  # people read, the service account writes
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


def compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_the_image_installs_the_locked_production_set_and_the_project(project):
    lines = [x.strip() for x in (project / "Dockerfile").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert lines[0].startswith("FROM python:3.11")
    assert "RUN uv sync --frozen --no-dev --extra production --compile-bytecode" in lines  # uv.lock, not a fresh resolution
    assert lines.index("COPY pyproject.toml uv.lock README.md ./") < lines.index(
        "RUN uv sync --frozen --no-dev --extra production --compile-bytecode")
    for folder in ("src", "dags", "include"):
        assert any(x.startswith(f"COPY {folder} ") for x in lines), folder
    ignored = (project / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and ".closedloop/" in ignored  # the local state stays out of the image


@pytest.mark.skipif(compose_cli() is None, reason="neither `docker compose` nor `docker-compose` here "
                                                  "(.ci/run installs Debian's docker-compose)")
def test_docker_compose_config_accepts_the_file(project, tmp_path):
    cli = compose_cli()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_SERVICE_PASSWORD": "svc-secret-1",
           "MLFLOW_SECRET_KEY": "flask-secret"}
    from closedloop.runtime.signing import Signer

    signer = Signer.generate()
    unsigned = subprocess.run([*cli, "-f", str(project / "docker-compose.yaml"), "config"], capture_output=True,
                              text=True, cwd=project, env={**env, "CLOSEDLOOP_TRUSTED_KEYS": signer.verifier.published()})
    assert unsigned.returncode != 0 and "CLOSEDLOOP_SIGNING_KEY" in unsigned.stderr  # no key, no deployment
    key = signer.seed_b64()
    env["CLOSEDLOOP_SIGNING_KEY"] = key
    pinless = subprocess.run([*cli, "-f", str(project / "docker-compose.yaml"), "config"],
                             capture_output=True, text=True, cwd=project, env=env)
    assert pinless.returncode != 0 and "CLOSEDLOOP_TRUSTED_KEYS" in pinless.stderr  # no pinned key, no deployment
    env["CLOSEDLOOP_TRUSTED_KEYS"] = signer.verifier.published()
    out = subprocess.run([*cli, "-f", str(project / "docker-compose.yaml"), "config"],
                         capture_output=True, text=True, cwd=project, env=env)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert set(resolved["services"]) == {"postgres", "redis", "mlflow", "airflow-init", "airflow-settings", *AIRFLOW}
    # the defaults of ${...} resolved, and the anchors merged into every Airflow service
    worker = resolved["services"]["airflow-worker"]
    assert worker["environment"]["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
    assert worker["environment"]["CLOSEDLOOP_SIGNING_KEY"] == key
    assert worker["environment"]["CLOSEDLOOP_TRUSTED_KEYS"] == signer.verifier.published()
    assert not any(k.startswith("AIRFLOW_CONN_CLOSEDLOOP_SIGNING") for k in worker["environment"])
    mlflow_conn = json.loads(worker["environment"]["AIRFLOW_CONN_MLFLOW_DEFAULT"])
    assert (mlflow_conn["login"], mlflow_conn["password"]) == ("closedloop-service", "svc-secret-1")
    server = resolved["services"]["mlflow"]
    assert "--app-name basic-auth" in server["command"] and "default_permission = READ" in server["command"]
    assert "${POSTGRES_PASSWORD" not in out.stdout and "airflow:airflow@postgres" in out.stdout
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text((project / "docker-compose.yaml").read_text().replace(
        "    image: redis:7\n", "    image: redis:7\n    restart_polcy: always\n", 1))
    bad = subprocess.run([*cli, "-f", str(broken), "config"], capture_output=True, text=True, cwd=project, env=env)
    assert bad.returncode != 0 and "restart_polcy" in bad.stderr  # it does check the schema

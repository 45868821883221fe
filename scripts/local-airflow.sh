#!/usr/bin/env bash
# Local Airflow UI (api-server, scheduler, dag-processor, triggerer) and MLflow UI on 127.0.0.1 for this checkout: `make airflow`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/closedloop serve --port "${AIRFLOW_PORT:-8080}" --mlflow-port "${MLFLOW_PORT:-5000}"

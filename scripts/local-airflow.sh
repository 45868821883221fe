#!/usr/bin/env bash
# Local Airflow UI (standalone: api-server, scheduler, dag-processor, triggerer) and MLflow UI,
# both bound to 127.0.0.1, on this checkout's DAGs and the same store `make demo` uses.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"          # standalone starts `airflow` subprocesses
eval "$(closedloop env)"
export AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT="${AIRFLOW_PORT:-8080}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW_USERS:-admin:admin}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
mlflow_db="${MLFLOW_TRACKING_URI#sqlite:///}"
mkdir -p "$(dirname "$mlflow_db")/artifacts"

mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --backend-store-uri "$MLFLOW_TRACKING_URI" \
  --default-artifact-root "$(dirname "$mlflow_db")/artifacts" >"$CLOSEDLOOP_HOME/logs-mlflow-ui.log" 2>&1 &
mlflow_pid=$!
trap 'kill $mlflow_pid 2>/dev/null || true' EXIT

(
  for _ in $(seq 1 120); do
    if curl -fsS "http://127.0.0.1:$AIRFLOW__API__PORT/api/v2/monitor/health" >/dev/null 2>&1; then
      pwfile="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
      echo
      echo "=================================================================="
      echo " Airflow UI : http://127.0.0.1:$AIRFLOW__API__PORT   login: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(', '.join(f'{u} / {p}' for u,p in d.items()))" "$pwfile" 2>/dev/null || echo "see $pwfile")"
      echo " MLflow UI  : http://127.0.0.1:$MLFLOW_PORT"
      echo " DAGs from  : $AIRFLOW__CORE__DAGS_FOLDER   (Ctrl-C stops both)"
      echo "=================================================================="
      exit 0
    fi
    sleep 1
  done
  echo "Airflow did not answer on 127.0.0.1:$AIRFLOW__API__PORT within 120 s" >&2
) &
exec_status=0
airflow standalone || exec_status=$?
exit $exec_status

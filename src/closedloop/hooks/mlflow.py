"""Where MLflow is, from an Airflow connection (production) or the environment (embedded default)."""

from __future__ import annotations

import logging

from airflow.sdk import BaseHook

from closedloop import settings

log = logging.getLogger(__name__)


class MLflowHook(BaseHook):
    """Resolve the MLflow tracking URI.

    The connection (default ``mlflow_default``) wins: its ``extra.tracking_uri`` if set, else
    ``http(s)://host:port``. Without the connection: ``MLFLOW_TRACKING_URI``, else the local
    SQLite store under ``$CLOSEDLOOP_HOME``. Credentials stay in the connection (MLflow reads
    ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` from it via :meth:`credentials_env`), never in templates.

    :param mlflow_conn_id: the Airflow connection id.
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "mlflow"
    hook_name = "MLflow"

    def __init__(self, mlflow_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.mlflow_conn_id = mlflow_conn_id
        self._conn = None
        self._looked_up = False

    def _connection(self):
        if not self._looked_up:
            self._looked_up = True
            try:
                self._conn = self.get_connection(self.mlflow_conn_id)
            except Exception:  # not defined: the embedded default applies
                log.debug("no connection %r: using MLFLOW_TRACKING_URI or the local store", self.mlflow_conn_id)
        return self._conn

    def tracking_uri(self) -> str:
        conn = self._connection()
        if conn is None:
            return settings.tracking_uri()
        extra = conn.extra_dejson or {}
        given = extra.get("tracking_uri") or extra.get("extra__mlflow__tracking_uri")  # the form's field
        if given:
            return given
        scheme = conn.schema or ("https" if conn.port == 443 else "http")
        host = conn.host or "127.0.0.1"
        if "://" in host:
            return host if not conn.port else f"{host}:{conn.port}"
        return f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")

    def credentials_env(self) -> dict[str, str]:
        conn = self._connection()
        if conn is None or not conn.login:
            return {}
        return {"MLFLOW_TRACKING_USERNAME": conn.login, "MLFLOW_TRACKING_PASSWORD": conn.password or ""}

    def test_connection(self) -> tuple[bool, str]:
        """Airflow's *Test* button: can this connection read MLflow's experiments (credentials included)?"""
        uri = self.tracking_uri()
        if uri.startswith(("http://", "https://")):
            import base64
            import urllib.error
            import urllib.request

            request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
            creds = self.credentials_env()
            if creds:
                token = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds['MLFLOW_TRACKING_PASSWORD']}"
                request.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
            try:
                with urllib.request.urlopen(request, timeout=10):
                    pass
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    return False, f"MLflow at {uri} refused the credentials of connection {self.mlflow_conn_id!r} " \
                                  f"(HTTP {exc.code})"
                return False, f"MLflow at {uri} answered HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                return False, f"cannot reach MLflow at {uri}: {getattr(exc, 'reason', exc)}"
            who = f" as {creds['MLFLOW_TRACKING_USERNAME']}" if creds else ""
            return True, f"MLflow at {uri} answers{who}"
        try:
            from mlflow import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:
            return False, f"cannot read MLflow at {uri}: {exc}"
        return True, f"MLflow store {uri} is readable"

"""A small client for Airflow's REST API, with the user's own credentials.

``closedloop request/approve/reject/promote`` go through Airflow's API and its authorization —
never around it. Credentials come from ``--user`` / ``AIRFLOW_USERNAME`` and
``AIRFLOW_PASSWORD`` (never from templates); the server from ``AIRFLOW_API_URL``
(default ``http://127.0.0.1:8080``).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from closedloop.errors import ClosedLoopError


class AirflowAPIError(ClosedLoopError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def local_deployment() -> dict | None:
    """The running local deployment (``make airflow``) of this checkout, as it announced itself: its Airflow
    and MLflow URLs and its logins file; None when none runs."""
    from closedloop import settings

    try:
        found = json.loads(settings.local_endpoint().read_text())
        os.kill(int(found["pid"]), 0)  # still running
        return found
    except (OSError, ValueError, KeyError, TypeError):
        return None


class AirflowAPI:
    """Airflow's REST API as one person. Where: ``url``, else ``$AIRFLOW_API_URL``, else the running local
    deployment (any port), else http://127.0.0.1:8080. Who: ``user`` / ``$AIRFLOW_USERNAME``; the password
    ``password``, else ``$AIRFLOW_PASSWORD``, else — on the local deployment only — its generated logins file."""

    def __init__(self, url: str | None = None, user: str | None = None, password: str | None = None) -> None:
        local = local_deployment() if not (url or os.environ.get("AIRFLOW_API_URL")) else None
        self.url = (url or os.environ.get("AIRFLOW_API_URL") or (local or {}).get("airflow")
                    or "http://127.0.0.1:8080").rstrip("/")
        self.user = user or os.environ.get("AIRFLOW_USERNAME")
        self.password = password if password is not None else os.environ.get("AIRFLOW_PASSWORD")
        if self.password is None and self.user and local:
            try:
                self.password = json.loads(open(local["passwords"], encoding="utf-8").read()).get(self.user)
            except (OSError, ValueError):
                pass
        self._token: str | None = None

    def _open(self, req: urllib.request.Request) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                detail = json.loads(text).get("detail", text)
            except (json.JSONDecodeError, AttributeError):
                detail = text
            return e.code, {"detail": detail}
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise AirflowAPIError(f"cannot reach Airflow at {self.url} ({getattr(e, 'reason', e)}); "
                                  "is it running (`make airflow`)? set AIRFLOW_API_URL or --api-url otherwise") from None

    def token(self) -> str:
        if self._token is None:
            if not self.user or self.password is None:
                raise AirflowAPIError(f"Airflow credentials needed for {self.url}: set AIRFLOW_USERNAME and "
                                      "AIRFLOW_PASSWORD (or pass --user; on this checkout's running `make airflow` "
                                      "the login's password is found by itself)")
            body = json.dumps({"username": self.user, "password": self.password}).encode()
            status, data = self._open(urllib.request.Request(
                f"{self.url}/auth/token", data=body, headers={"Content-Type": "application/json"}, method="POST"))
            if status not in (200, 201) or not data or "access_token" not in data:
                raise AirflowAPIError(f"Airflow refused the login of user {self.user!r} (HTTP {status})", status)
            self._token = data["access_token"]
        return self._token

    def call(self, method: str, path: str, body: dict | None = None, *, root: bool = False) -> tuple[int, Any]:
        """``path`` under ``/api/v2`` (``root=True``: under the server's root, e.g. the plugin's ``/closedloop/…``)."""
        req = urllib.request.Request(
            f"{self.url}{'' if root else '/api/v2'}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token()}"})
        return self._open(req)

    def get(self, path: str, *, missing_ok: bool = False) -> Any:
        status, data = self.call("GET", path)
        if status == 404 and missing_ok:
            return None
        if status != 200:
            raise AirflowAPIError(f"GET {path}: HTTP {status}: {data.get('detail') if data else ''}", status)
        return data

    @staticmethod
    def q(part: str) -> str:
        return urllib.parse.quote(part, safe="")

    def run_path(self, dag_id: str, run_id: str) -> str:
        return f"/dags/{self.q(dag_id)}/dagRuns/{self.q(run_id)}"


def xcom_value(entry: dict | None):
    """The value of a REST ``xcomEntries`` answer (Airflow returns it as JSON or Python-literal text)."""
    if not entry:
        return None
    value = entry.get("value")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            import ast

            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return value
    return value

"""The plugin's FastAPI app on its own (in-process, no Airflow server): every route builds, asks for
a login, and states its page limits (the permission filtering runs against a real API server in
tests/integration/test_incident_scheduler.py)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from closedloop.records.lineage import MAX_LIMIT
from closedloop.web.app import MAX_HEALTH_PIPELINES, create_app


def test_every_route_wants_a_login_and_says_its_limits():
    client = TestClient(create_app())
    for path in ("/api/trace?ref=x", "/api/impact?source=fleet-eu", "/api/health"):
        assert client.get(path).status_code == 401, path
    schema = client.get("/openapi.json").json()

    def param(path: str, name: str) -> dict:
        return next(p["schema"] for p in schema["paths"][path]["get"]["parameters"] if p["name"] == name)

    assert param("/api/impact", "limit")["maximum"] == MAX_LIMIT and param("/api/impact", "offset")["minimum"] == 0
    assert param("/api/health", "limit")["maximum"] == MAX_HEALTH_PIPELINES
    names = {p["name"] for route in schema["paths"].values() for p in route["get"].get("parameters", [])}
    assert "dag_id" not in names  # no parameter steers whose records are read

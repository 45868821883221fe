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

    for path in ("/api/impact", "/api/trace"):
        assert param(path, "limit")["maximum"] == MAX_LIMIT and param(path, "offset")["minimum"] == 0
    assert param("/api/health", "limit")["maximum"] == MAX_HEALTH_PIPELINES
    steering = {path for path, route in schema["paths"].items()
                if "dag_id" in {p["name"] for p in route.get("get", {}).get("parameters", [])}}
    # only the review card names a run by its DAG, and that DAG is checked against what the caller may read
    assert steering == {"/api/review", "/review"}
    assert client.get("/api/review?dag_id=acc_longitudinal&run_id=r").status_code == 401
    # the incident reporters' way in: a login first, then the template's reporters (integration tests)
    assert "post" in schema["paths"]["/api/incidents"]
    assert client.post("/api/incidents", json={"model": "m"}).status_code == 401


def test_a_review_card_of_a_dag_the_caller_may_not_read_is_not_found(project, monkeypatch):
    """Checked before any record is read: the same 404 as a run that registered nothing."""
    import pytest
    from fastapi import HTTPException

    from closedloop.web import app

    monkeypatch.setattr(app, "_pipelines_dir", lambda: project / "include" / "pipelines")
    monkeypatch.setattr(app, "_tracking_uri", lambda: pytest.fail("read MLflow for a DAG the caller may not read"))
    for dag_id in ("acc_longitudinal", "acc_longitudinal_incident", "not_a_pipeline"):
        with pytest.raises(HTTPException) as err:
            app.review_of(app.Caller(user=None, dags=frozenset({"some_other_dag"})), dag_id, "manual__1")
        assert err.value.status_code == 404 and "that you may read" in err.value.detail

"""The plugin's web app, mounted by Airflow's API server under ``/closedloop``.

- ``GET /closedloop/api/trace?ref=…`` and ``GET /closedloop/api/impact?source=…|label_policy=…|dataset=…``:
  the same answers as ``closedloop trace`` / ``impact --json``.
- ``GET /closedloop/lineage``: a page (linked from Airflow's navigation, *Browse → Lineage*) that
  asks those endpoints.
- ``GET /closedloop/api/health?days=7`` and ``GET /closedloop/health?days=7`` (*Browse → Pipeline
  health*): runs, failure rate, queue wait, lead times, retries, pending approvals and the current
  versions per pipeline, as JSON and as a page with charts.

Behind Airflow's authentication: the caller's Airflow token (the UI's session cookie or an
``Authorization: Bearer`` header), and the right to read DAGs. MLflow is found the way tasks
find it (connection ``mlflow_default``, else ``MLFLOW_TRACKING_URI``, else the local store).
"""

from __future__ import annotations

import html
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from closedloop.web import template as page


async def reader(request: Request):
    """The Airflow user, who must be allowed to read DAGs (401 without a login, 403 without the right)."""
    from airflow.api_fastapi.core_api.security import requires_access_dag, resolve_user_from_token

    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get("_token")
    user = await resolve_user_from_token(token)
    requires_access_dag("GET")(request, user)
    return user


Reader = Annotated[object, Depends(reader)]


async def _login_or_redirect(request: Request):
    """None for a reader; a redirect to Airflow's login page (then back) for a browser without a login."""
    try:
        await reader(request)
    except HTTPException as exc:
        if exc.status_code == 401:
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        raise
    return None


def health_figures(days: int) -> dict:
    from datetime import UTC, datetime, timedelta

    from closedloop.records.health import cache_figures, current_versions, figures, pipelines_of, records_from_db
    from closedloop.spec import load_all

    specs, _ = load_all(_pipelines_dir())
    until = datetime.now(UTC)
    since = until - timedelta(days=days)
    pipelines = pipelines_of(specs)
    runs, tis = records_from_db([d for ids in pipelines.values() for d in ids], since)
    out = figures(pipelines, runs, tis, since=since, until=until)
    out["versions"] = current_versions(specs, _tracking_uri())
    out["cache"] = cache_figures(specs, since, _tracking_uri())
    return out


def _pipelines_dir():
    """The templates next to the DAG folder Airflow reads (as the DAG file finds them)."""
    from airflow.configuration import conf

    from closedloop import settings

    return settings.pipelines_beside(conf.get("core", "dags_folder"))


def _tracking_uri() -> str:
    from closedloop.hooks.mlflow import MLflowHook

    return MLflowHook().tracking_uri()


def create_app() -> FastAPI:
    app = FastAPI(title="airflow-closedloop", description="Lineage of closed-loop models: trace and impact.")

    @app.get("/api/trace")
    def api_trace(user: Reader, ref: Annotated[str, Query(min_length=1, max_length=500)]):
        from closedloop.records.lineage import LineageError, trace

        try:
            return JSONResponse(trace(ref, _tracking_uri()))
        except LineageError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    @app.get("/api/impact")
    def api_impact(user: Reader, source: str | None = None, label_policy: str | None = None,
                   dataset: str | None = None):
        from closedloop.records.lineage import LineageError, impact

        try:
            return JSONResponse(impact(source=source, label_policy=label_policy, dataset=dataset,
                                       tracking_uri=_tracking_uri()))
        except LineageError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @app.get("/api/health")
    def api_health(user: Reader, days: Annotated[int, Query(ge=1, le=366)] = 7):
        return JSONResponse(health_figures(days))

    @app.get("/health", response_class=HTMLResponse)
    async def health_page(request: Request, days: Annotated[int, Query(ge=1, le=366)] = 7):
        denied = await _login_or_redirect(request)
        if denied is not None:
            return denied
        from closedloop.web.health_page import render

        return HTMLResponse(render(health_figures(days), days))

    @app.get("/lineage", response_class=HTMLResponse)
    async def lineage_page(request: Request):
        denied = await _login_or_redirect(request)
        if denied is not None:
            return denied
        return HTMLResponse(page("lineage.html").replace(
            "{{ref}}", html.escape(request.query_params.get("ref", ""), quote=True)))

    return app

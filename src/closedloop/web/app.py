"""The plugin's web app, mounted by Airflow's API server under ``/closedloop``.

- ``GET /closedloop/api/trace?ref=…`` and ``GET /closedloop/api/impact?source=…|label_policy=…|dataset=…``:
  the same answers as ``closedloop trace`` / ``impact --json``.
- ``GET /closedloop/lineage``: a page (linked from Airflow's navigation, *Browse → Lineage*) that
  asks those endpoints.
- ``GET /closedloop/api/health?days=7`` and ``GET /closedloop/health?days=7`` (*Browse → Pipeline
  health*): runs, failure rate, queue wait, lead times, retries, pending approvals and the current
  versions per pipeline, as JSON and as a page with charts.

Behind Airflow's authentication: the caller's Airflow token (the UI's session cookie or an
``Authorization: Bearer`` header). Every answer holds only what the caller may read: the
pipelines' DAGs are checked one by one with Airflow's auth manager (never steered by a query
parameter such as ``?dag_id=``), and a trace, an impact row or a health section of a DAG the
caller may not read is left out (a trace of one is "not found"). Lists page with ``limit`` /
``offset`` and say their totals. The work (MLflow, the metadata database) runs in worker threads,
never on the API server's event loop. MLflow is found the way tasks find it (connection
``mlflow_default``, else ``MLFLOW_TRACKING_URI``, else the local store).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from closedloop.records.lineage import MAX_LIMIT

MAX_HEALTH_PIPELINES = 100
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]


@dataclass(frozen=True)
class Caller:
    user: object
    dags: frozenset[str]
    """The closedloop DAG ids this user may read (Airflow's auth manager, DAG by DAG)."""

    def pipelines(self, specs) -> list:
        """The templates whose periodic DAG the caller may read."""
        return [s for s in specs if s.spec.name in self.dags]


def readable_dags(user) -> frozenset[str]:
    """Of every DAG the templates define, those ``user`` may read (asked of Airflow's auth manager)."""
    from airflow.api_fastapi.app import get_auth_manager

    from closedloop.records.health import pipelines_of
    from closedloop.spec import load_all

    specs, _ = load_all(_pipelines_dir())
    every = {d for ids in pipelines_of(specs).values() for d in ids}
    return frozenset(get_auth_manager().filter_authorized_dag_ids(dag_ids=every, user=user, method="GET"))


async def reader(request: Request) -> Caller:
    """The Airflow user and the closedloop DAGs they may read (401 without a login, 403 with none)."""
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get("_token")
    user = await resolve_user_from_token(token)
    dags = await run_in_threadpool(readable_dags, user)
    if not dags:
        raise HTTPException(status_code=403, detail="you may read none of the closedloop pipelines' DAGs")
    return Caller(user, dags)


Reader = Annotated[Caller, Depends(reader)]


async def _caller_or_redirect(request: Request) -> Caller | RedirectResponse:
    """The reader; or, for a browser without a login, a redirect to Airflow's login page (then back)."""
    try:
        return await reader(request)
    except HTTPException as exc:
        if exc.status_code == 401:
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        raise


def health_figures(days: int, caller: Caller, *, limit: int = MAX_HEALTH_PIPELINES, offset: int = 0) -> dict:
    """Health of the pipelines the caller may read (``limit`` of them from ``offset``, by name); an
    incident DAG the caller may not read is left out of its pipeline's figures."""
    from datetime import UTC, datetime, timedelta

    from closedloop.records.health import (
        cache_figures,
        current_versions,
        figures,
        pipelines_of,
        recall_figures,
        records_from_db,
    )
    from closedloop.runtime.faults import inject
    from closedloop.spec import load_all

    inject(dag_id="closedloop_web", task_id="health", try_number=1, point="start")  # a drill can hold it here
    specs, errors = load_all(_pipelines_dir())
    visible = sorted(caller.pipelines(specs), key=lambda s: s.spec.name)
    page_specs = visible[offset:offset + limit]
    until = datetime.now(UTC)
    since = until - timedelta(days=days)
    pipelines = {name: [d for d in ids if d in caller.dags] for name, ids in pipelines_of(page_specs).items()}
    runs, tis = records_from_db([d for ids in pipelines.values() for d in ids], since)
    out = figures(pipelines, runs, tis, since=since, until=until)
    out["versions"] = current_versions(page_specs, _tracking_uri())
    out["cache"] = cache_figures(page_specs, since, _tracking_uri())
    out["recalls"] = recall_figures(_tracking_uri())  # deployment-wide: a recall spans pipelines
    out["template_errors"] = readable_template_errors(caller, specs, errors)
    out.update(total_pipelines=len(visible), limit=limit, offset=offset)
    return out


def readable_template_errors(caller: Caller, specs, errors) -> list[dict]:
    """Broken templates whose held-back DAG the caller may read (a template whose name cannot be read
    at all is shown to those who may read every closedloop DAG)."""
    from airflow.api_fastapi.app import get_auth_manager

    from closedloop.records.health import pipelines_of
    from closedloop.spec.schema import template_problems

    problems = template_problems(_pipelines_dir(), errors)
    names = {p["pipeline"] for p in problems if p["pipeline"]}
    allowed = set(get_auth_manager().filter_authorized_dag_ids(dag_ids=names, user=caller.user, method="GET")) \
        if names else set()
    every = {d for ids in pipelines_of(specs).values() for d in ids}
    return [p for p in problems if (p["pipeline"] in allowed) or (p["pipeline"] is None and every <= caller.dags)]


def visible_trace(t: dict, caller: Caller, specs) -> bool:
    """A trace is the caller's to read when the run behind it is in a DAG they may read (a version
    registered outside a pipeline run: when they may read a pipeline of its model)."""
    dag_id = (t.get("airflow_run") or {}).get("dag_id")
    if dag_id:
        return dag_id in caller.dags
    model = (t.get("model_version") or {}).get("name")
    return any(s.spec.model.name == model for s in caller.pipelines(specs))


def review_of(caller: Caller, dag_id: str, run_id: str) -> dict:
    """The review card of the version ``dag_id``/``run_id`` registered (404: a DAG the caller may
    not read — said the same way as a run that registered nothing)."""
    from closedloop.records.health import pipelines_of
    from closedloop.runtime.tracking import literal, mlflow_client
    from closedloop.spec import load_all
    from closedloop.steps.cards import review_card

    specs, _ = load_all(_pipelines_dir())
    spec = next((s.spec for s in specs if dag_id in pipelines_of([s]).get(s.spec.name, ())), None)
    nothing = HTTPException(status_code=404, detail=f"no candidate registered by {dag_id} run {run_id} that you may read")
    if spec is None or dag_id not in caller.dags:
        raise nothing
    client = mlflow_client(_tracking_uri())
    versions = client.search_model_versions(f"name = {literal(spec.model.name)} and tags.`airflow.run_id` = "
                                            f"{literal(run_id)} and tags.`airflow.dag_id` = {literal(dag_id)}")
    if not versions:
        raise nothing
    return review_card(client, spec.model.name, str(versions[0].version))


DOCS_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "text/javascript",
              ".png": "image/png", ".svg": "image/svg+xml", ".ico": "image/x-icon", ".json": "application/json"}


def data_docs_file(caller: Caller, run_id: str, path: str) -> tuple[bytes, str]:
    """A file of the Great Expectations Data Docs a ``validate_data`` run published (404: not such a run, a
    DAG the caller may not read, or a path outside its Data Docs — said the same way)."""
    import posixpath
    import tempfile

    from closedloop import vocab
    from closedloop.runtime.tracking import mlflow_client
    from closedloop.steps.validation import DOCS_ARTIFACTS

    nothing = HTTPException(status_code=404, detail=f"no Data Docs {path!r} of run {run_id!r} that you may read")
    clean = posixpath.normpath(path)
    if clean.startswith(("/", "..")) or posixpath.splitext(clean)[1] not in DOCS_TYPES or not run_id.isalnum():
        raise nothing
    client = mlflow_client(_tracking_uri())
    try:
        run = client.get_run(run_id)
    except Exception:
        raise nothing from None
    tags = run.data.tags
    if tags.get(vocab.STEP) != "validate_data" or tags.get(vocab.AIRFLOW_DAG_ID) not in caller.dags:
        raise nothing
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, f"{DOCS_ARTIFACTS}/{clean}", tmp)
            with open(local, "rb") as fh:
                return fh.read(), DOCS_TYPES[posixpath.splitext(clean)[1]]
        except Exception:
            raise nothing from None


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
    def api_trace(caller: Reader, ref: Annotated[str, Query(min_length=1, max_length=500)],
                  limit: Limit = 100, offset: Offset = 0):
        """One model's chain (one record per link; its regression scenarios paged, with their total)."""
        from closedloop.records.lineage import LineageError, trace
        from closedloop.spec import load_all

        try:
            t = trace(ref, _tracking_uri(), limit=limit, offset=offset)
        except LineageError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        if not visible_trace(t, caller, load_all(_pipelines_dir())[0]):
            raise HTTPException(status_code=404, detail=f"{ref!r}: nothing you may read")  # no hint it exists
        return JSONResponse(t)

    @app.get("/api/impact")
    def api_impact(caller: Reader, source: Annotated[str | None, Query(max_length=200)] = None,
                   label_policy: Annotated[str | None, Query(max_length=200)] = None,
                   dataset: Annotated[str | None, Query(max_length=64)] = None,
                   limit: Limit = 100, offset: Offset = 0):
        from closedloop.records.lineage import LineageError, impact

        try:
            return JSONResponse(impact(source=source, label_policy=label_policy, dataset=dataset,
                                       tracking_uri=_tracking_uri(), limit=limit, offset=offset,
                                       dag_ids=caller.dags))
        except LineageError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @app.get("/api/health")
    def api_health(caller: Reader, days: Annotated[int, Query(ge=1, le=366)] = 7,
                   limit: Annotated[int, Query(ge=1, le=MAX_HEALTH_PIPELINES)] = MAX_HEALTH_PIPELINES,
                   offset: Offset = 0):
        return JSONResponse(health_figures(days, caller, limit=limit, offset=offset))

    @app.get("/health", response_class=HTMLResponse)
    async def health_page(request: Request, days: Annotated[int, Query(ge=1, le=366)] = 7):
        caller = await _caller_or_redirect(request)
        if isinstance(caller, RedirectResponse):
            return caller
        from closedloop.web.health_page import render

        figures = await run_in_threadpool(health_figures, days, caller)  # off the event loop
        return HTMLResponse(render(figures, days))

    @app.post("/api/incidents")
    async def api_report_incident(request: Request):
        """Report an incident as the caller (``incidents.reporters`` of the model's template): the
        deployment posts the asset event, with the caller recorded as its poster."""
        from airflow.api_fastapi.core_api.security import resolve_user_from_token

        from closedloop.web.incidents import report_incident

        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get("_token")
        user = await resolve_user_from_token(token)
        try:
            data = await request.json()
        except ValueError:
            raise HTTPException(status_code=400, detail="the body must be one incident as a JSON object") from None
        return JSONResponse(await run_in_threadpool(report_incident, user.get_name(), data, _pipelines_dir()))

    @app.get("/api/review")
    def api_review(caller: Reader, dag_id: Annotated[str, Query(min_length=1, max_length=250)],
                   run_id: Annotated[str, Query(min_length=1, max_length=250)]):
        """The review card of the candidate a pipeline run registered, against the current production."""
        return JSONResponse(review_of(caller, dag_id, run_id))

    @app.get("/review", response_class=HTMLResponse)
    async def review_page(request: Request, dag_id: Annotated[str, Query(min_length=1, max_length=250)],
                          run_id: Annotated[str, Query(min_length=1, max_length=250)]):
        caller = await _caller_or_redirect(request)
        if isinstance(caller, RedirectResponse):
            return caller
        from closedloop.steps.cards import render_html

        card = await run_in_threadpool(review_of, caller, dag_id, run_id)
        return HTMLResponse(render_html(card))

    @app.get("/data-docs/{run_id}/{path:path}")
    async def data_docs(request: Request, run_id: str, path: str):
        """Great Expectations' Data Docs of a data validation, from its MLflow run (linked from the review card
        and the trace), behind Airflow's login and the caller's read rights on the run's DAG."""
        caller = await _caller_or_redirect(request)
        if isinstance(caller, RedirectResponse):
            return caller
        from fastapi.responses import Response

        body, media = await run_in_threadpool(data_docs_file, caller, run_id, path)
        return Response(body, media_type=media, headers={"Content-Security-Policy": "script-src 'none'"}
                        if media.startswith("text/html") else None)

    @app.get("/dossier", response_class=HTMLResponse)
    async def dossier_page(request: Request, ref: Annotated[str, Query(min_length=1, max_length=500)]):
        """The release dossier of the version ``ref`` names, as its bundle renders it (read rights as for its
        trace); ``closedloop dossier verify`` checks the bundle itself."""
        caller = await _caller_or_redirect(request)
        if isinstance(caller, RedirectResponse):
            return caller

        def page() -> str:
            import fsspec

            from closedloop.records.lineage import LineageError, dossier_of, trace
            from closedloop.spec import load_all

            try:
                t = trace(ref, _tracking_uri(), limit=1)
                if not visible_trace(t, caller, load_all(_pipelines_dir())[0]):
                    raise LineageError("nothing you may read")
                found = dossier_of(ref, _tracking_uri())
                with fsspec.open(found["html"], "rb") as fh:
                    return fh.read().decode("utf-8")
            except (LineageError, OSError) as exc:
                raise HTTPException(status_code=404, detail=f"{ref!r}: no release dossier you may read ({exc})") \
                    from None

        return HTMLResponse(await run_in_threadpool(page))

    @app.get("/lineage", response_class=HTMLResponse)
    async def lineage_page(request: Request):
        caller = await _caller_or_redirect(request)
        if isinstance(caller, RedirectResponse):
            return caller
        from closedloop.runtime.pages import render as render_page

        return HTMLResponse(render_page("lineage.html", ref=request.query_params.get("ref", "")))

    return app

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
        return HTMLResponse(PAGE.replace("{{ref}}", html.escape(request.query_params.get("ref", ""), quote=True)))

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>closedloop lineage</title>
<style>
 body{font:14px system-ui,sans-serif;margin:1.5rem;color:#1f2937}
 h1{font-size:1.3rem} h2{font-size:1.05rem;margin:1.2rem 0 .4rem}
 form{display:flex;gap:.5rem;flex-wrap:wrap;margin:.5rem 0 1rem} input,select{padding:.35rem;font:inherit}
 button{padding:.35rem .9rem;font:inherit;cursor:pointer}
 table{border-collapse:collapse;margin:.3rem 0} td,th{border:1px solid #d1d5db;padding:.25rem .5rem;text-align:left}
 .live{background:#fef3c7;font-weight:600} .err{color:#b91c1c} code{background:#f3f4f6;padding:0 .2rem}
 .chain li{margin:.25rem 0}
</style></head><body>
<h1>Model lineage</h1>
<form id="trace-form"><input id="ref" size="50" placeholder="models:/NAME@production, NAME/VERSION, MLflow or Airflow run id"
 value="{{ref}}"><button>Trace</button></form>
<form id="impact-form"><select id="kind"><option value="source">source</option>
<option value="label_policy">label policy</option><option value="dataset">dataset digest</option></select>
<input id="what" size="30" placeholder="fleet-eu, expert_idm_smoothed@2, a digest"><button>Impact</button></form>
<div id="out"></div>
<script>
const out = document.getElementById('out');
const esc = s => String(s ?? '-').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
async function ask(url){
  const r = await fetch(url, {credentials: 'same-origin'});
  const body = await r.json();
  if(!r.ok){ throw new Error(body.detail || r.statusText); }
  return body;
}
function showTrace(t){
  const mv = t.model_version || {}, tr = t.training_run || {}, ar = t.airflow_run || {}, sb = ar.started_by || {};
  let h = `<h2>Trace of <code>${esc(t.ref)}</code></h2><ol class="chain">`;
  if(mv.name) h += `<li id="mv">model version <b>${esc(mv.name)} v${esc(mv.version)}</b> ${mv.aliases.map(a=>'@'+esc(a)).join(' ')}</li>`;
  if(tr.run_id) h += `<li>training run <code>${esc(tr.run_id)}</code>, code ${esc(tr.code_version)}</li>`;
  for(const d of t.datasets) h += `<li>dataset ${esc(d.kind)} <code class="digest">${esc(d.digest)}</code>
     ${d.sources ? 'sources '+esc(d.sources.join(', '))+', window '+esc(d.window_start)+'..'+esc(d.window_end) : ''}
     ${d.rows != null ? '('+esc(d.rows)+' rows)' : ''}</li>`;
  h += `<li>label policy <code id="policy">${esc(t.label_policy)}</code></li>`;
  h += `<li>template ${esc(t.template.pipeline)} (${esc(t.template.file)}, hash ${esc(t.template.hash)})</li>`;
  h += `<li>Airflow run ${esc(ar.dag_id)} / ${esc(ar.run_id)}, started by <b id="trigger">${esc(sb.trigger)}</b>
     ${sb.incident ? ' incident '+esc(sb.incident.id)+' ('+esc(sb.incident.scenario_type)+', '+esc(sb.incident.severity)+')' : ''}
     ${sb.requester ? ' by '+esc(sb.requester) : ''}</li>`;
  if(t.gates) h += `<li>gates ${t.gates.passed ? 'passed' : 'FAILED'}: <table><tr><th>metric</th><th>value</th><th>verdict</th></tr>`
     + (t.gates.report||[]).map(g=>`<tr><td>${esc(g.metric)}</td><td>${esc(g.value)}</td><td>${g.passed?'pass':'FAIL'}</td></tr>`).join('') + '</table></li>';
  if(t.review) h += `<li>review: ${esc(t.review.decision)} by ${esc(t.review.reviewer)} at ${esc(t.review.at)}</li>`;
  out.innerHTML = h + '</ol>';
}
function showImpact(i){
  let h = `<h2>Impact of ${esc(i.query)}</h2><p id="counts">${i.snapshots.length} snapshots, ${i.training_runs.length} training runs,
    ${i.model_versions.length} model versions, ${i.live.length} live</p>`;
  h += '<table><tr><th>model</th><th>version</th><th>aliases</th></tr>' + i.model_versions.map(v =>
    `<tr class="${v.live.length ? 'live' : ''}"><td>${esc(v.model)}</td><td>${esc(v.version)}</td><td>${v.aliases.map(a=>'@'+esc(a)).join(' ')}</td></tr>`).join('') + '</table>';
  h += '<h2>Training runs</h2><table><tr><th>run</th><th>Airflow run</th><th>label policy</th></tr>' + i.training_runs.map(e =>
    `<tr><td><code>${esc(e.run_id)}</code></td><td>${esc(e.dag_id)} / ${esc(e.airflow_run_id)}</td><td>${esc(e.label_policy)}</td></tr>`).join('') + '</table>';
  out.innerHTML = h;
}
const fail = e => { out.innerHTML = `<p class="err" id="error">${esc(e.message)}</p>`; };
document.getElementById('trace-form').onsubmit = ev => { ev.preventDefault();
  ask('api/trace?ref=' + encodeURIComponent(document.getElementById('ref').value)).then(showTrace, fail); };
document.getElementById('impact-form').onsubmit = ev => { ev.preventDefault();
  const k = document.getElementById('kind').value, v = document.getElementById('what').value;
  ask('api/impact?' + k + '=' + encodeURIComponent(v)).then(showImpact, fail); };
if(document.getElementById('ref').value) document.getElementById('trace-form').requestSubmit();
</script></body></html>
"""

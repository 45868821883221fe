"""``closedloop incident report | kpi report | runs``: events that start runs, and what started each run."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from closedloop.cli.common import arg_dir, arg_json, arg_login, exit_code
from closedloop.records.airflow_api import AirflowAPI, AirflowAPIError, xcom_value
from closedloop.records.health import REJECTED, outcome


def _routes(args):
    from closedloop.cli.common import pipelines_dir
    from closedloop.spec import load_all
    from closedloop.spec.incident import routes_of

    specs, _ = load_all(pipelines_dir(args))
    return specs, routes_of(specs)


def incident_from_args(args) -> dict:
    data: dict = {}
    if args.file:
        try:
            data = json.loads(Path(args.file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{args.file}: not a readable JSON incident: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{args.file}: expected a JSON object, got {type(data).__name__}")
    for key, value in (("model", args.model), ("scenario_type", args.scenario_type), ("severity", args.severity),
                       ("kind", args.kind), ("occurred_at", args.occurred_at), ("vehicle", args.vehicle),
                       ("description", args.description), ("id", args.id)):
        if value is not None:
            data[key] = value
    if args.log_ref:
        data["log_refs"] = list(args.log_ref)
    data.setdefault("reported_by", os.environ.get("AIRFLOW_USERNAME") or os.environ.get("USER") or "cli")
    data.setdefault("id", f"inc-{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.urandom(3).hex()}")
    return data


def incident_asset_id(api: AirflowAPI, model: str) -> int:
    from closedloop.spec.incident import asset_uri

    uri = asset_uri(model)
    data = api.get(f"/assets?uri_pattern={api.q(uri)}&limit=100")
    for asset in data.get("assets", []):
        if asset["uri"] == uri:
            return int(asset["id"])
    raise AirflowAPIError(f"Airflow does not know the incident asset {uri} yet: has the DAG processor parsed "
                          "the template's incident DAG? (`airflow dags list-import-errors` shows problems)")


def post_incident(api: AirflowAPI, incident: dict) -> dict:
    """Report a validated incident through the plugin (``POST /closedloop/api/incidents``: the caller must
    be one of the template's ``incidents.reporters``; no ``op`` role needed); return the event record."""
    status, data = api.call("POST", "/closedloop/api/incidents", incident, root=True)
    if status != 200:
        detail = data.get("detail") if isinstance(data, dict) else data
        raise AirflowAPIError(f"Airflow refused the incident (HTTP {status}): {detail}", status)
    return data


def write_to_inbox(incident: dict, inbox: Path) -> Path:
    """Drop an incident file in the inbox atomically (a watcher never sees half a file)."""
    inbox.mkdir(parents=True, exist_ok=True)
    final = inbox / f"{incident['id']}-{time.time_ns()}.json"
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.write_text(json.dumps(incident, indent=1), encoding="utf-8")
    os.replace(tmp, final)
    return final


def wait_for_run(api: AirflowAPI, dag_id: str, event_id: int, timeout: float) -> dict | None:
    """The run that consumed asset event ``event_id`` (None if none within ``timeout``)."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        runs = api.get(f"/dags/{api.q(dag_id)}/dagRuns?order_by=-run_after&limit=20").get("dag_runs", [])
        for run in runs:
            if run["dag_run_id"] in seen:
                continue
            status, data = api.call("GET", f"{api.run_path(dag_id, run['dag_run_id'])}/upstreamAssetEvents")
            if status >= 500:  # a run being created this instant can answer 500 once: look again
                continue
            events = (data or {}).get("asset_events", []) if status == 200 else []
            if any(int(e["id"]) == int(event_id) for e in events):
                return run
            if run["state"] not in ("queued",):
                seen.add(run["dag_run_id"])
        time.sleep(0.5)
    return None


def cmd_incident_report(args) -> int:
    from closedloop import settings
    from closedloop.spec.incident import IncidentError, parse_incident, summary

    specs, routes = _routes(args)
    try:
        incident = parse_incident(incident_from_args(args), routes)
    except (IncidentError, ValueError) as exc:
        print(f"error: {exc}\nnothing was reported", file=sys.stderr)
        return 2
    if args.inbox:
        path = write_to_inbox(incident, Path(args.inbox_dir) if args.inbox_dir else settings.incident_inbox())
        print(f"reported {summary(incident)}: {path} (the inbox watcher picks it up)")
        return 0
    api = AirflowAPI(url=args.api_url, user=args.user)
    try:
        event = post_incident(api, incident)
    except AirflowAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc.status)
    print(f"reported {summary(incident)}: asset event {event['id']} at {event['timestamp']}")
    if args.wait:
        dag_id = next(s.spec.incident_dag_id for s in specs if s.spec.model.name == incident["model"])
        run = wait_for_run(api, dag_id, event["id"], args.wait)
        if run is None:
            print(f"no run of {dag_id} took the event within {args.wait:g} s", file=sys.stderr)
            return 1
        print(f"started: {dag_id} run {run['dag_run_id']} ({run['state']})")
    return 0


def cmd_kpi_report(args) -> int:
    from closedloop.steps.monitoring import report_kpis

    metrics = {}
    for item in args.metric:
        name, sep, value = item.partition("=")
        try:
            metrics[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            print(f"error: --metric {item!r}: expected name=number, e.g. online.cut_in.min_ttc_s=1.2", file=sys.stderr)
            return 2
    try:
        out = report_kpis(args.model, metrics, version=args.version)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"logged KPIs of {out['model']} version {out['version']} (MLflow run {out['run_id']}): "
          + ", ".join(f"{k}={v:g}" for k, v in out["metrics"].items()))
    return 0


def origin(api: AirflowAPI, dag_id: str, run: dict) -> str:
    """What started one run, in words."""
    from closedloop.spec.incident import payload_of

    kind = run.get("run_type")
    if kind == "scheduled":
        return "schedule"
    if kind == "backfill":
        return "backfill"
    if kind == "manual":
        conf = run.get("conf") or {}
        who = run.get("triggering_user_name") or "?"
        if "incident" in conf:
            return f"manual incident by {who}"
        purpose = conf.get("purpose")
        return f"request by {who}: {str(purpose)[:60]}" if purpose else f"request by {who} (the standing request)"
    if kind == "asset_triggered":
        events = api.get(f"{api.run_path(dag_id, run['dag_run_id'])}/upstreamAssetEvents").get("asset_events", [])
        parts = []
        for e in events:
            p = payload_of(e.get("extra") or {})
            if isinstance(p, dict) and "scenario_type" in p:
                parts.append(f"incident {p.get('id') or '?'} ({p.get('kind', 'other')}, {p['scenario_type']}, "
                             f"{p.get('severity')}, by {p.get('reported_by') or '?'}; event {e['id']})")
            else:
                parts.append(f"asset event {e['id']}")
        return "; ".join(parts) or "asset event"
    return str(kind)


def admission_note(api: AirflowAPI, dag_id: str, run: dict) -> str:
    status, entry = api.call("GET", f"{api.run_path(dag_id, run['dag_run_id'])}/taskInstances/admit_incident/"
                                    "xcomEntries/return_value")
    value = xcom_value(entry) if status == 200 and isinstance(entry, dict) else None
    if not isinstance(value, dict):
        return "rejected (see admit_incident log)" if run.get("state") == "failed" else ""
    if value.get("admitted"):
        return "admitted, mining " + ", ".join(value.get("focus_types") or [])
    return "debounced → " + ", ".join(sorted(set((value.get("merged_into") or {}).values())))


def reason_of(api: AirflowAPI, dag_id: str, run: dict) -> str:
    """Why a run ended as it did: a gate's rejection (the run's note), or the tasks that failed with
    their error; empty for a run that succeeded or still goes."""
    if run.get("state") != "failed":
        return ""
    note = str(run.get("note") or "")
    if note.startswith(REJECTED):
        return note
    status, data = api.call("GET", f"{api.run_path(dag_id, run['dag_run_id'])}/taskInstances?state=failed")
    failed = [t["task_id"] for t in (data or {}).get("task_instances", [])] if status == 200 else []
    parts = []
    for task in failed[:3]:
        st, entry = api.call("GET", f"{api.run_path(dag_id, run['dag_run_id'])}/taskInstances/{task}/xcomEntries/error")
        err = xcom_value(entry) if st == 200 and isinstance(entry, dict) else None
        first = str((err or {}).get("message") or "").splitlines()[:1]
        parts.append(f"{task} failed" + (f" ({err.get('error_class')}: {first[0][:160]})" if err and first else ""))
    return "; ".join(parts) or (note or "failed (see the task logs)")


def cmd_runs(args, find) -> int:
    loaded = find(args, args.pipeline)
    if loaded is None:
        return 2
    api = AirflowAPI(url=args.api_url, user=args.user)
    dag_ids = [loaded.spec.name] + ([loaded.spec.incident_dag_id] if loaded.spec.incidents else [])
    rows = []
    try:
        for dag_id in dag_ids:
            runs = api.get(f"/dags/{api.q(dag_id)}/dagRuns?order_by=-run_after&limit={args.limit}", missing_ok=True)
            for run in (runs or {}).get("dag_runs", []):
                row = {"dag_id": dag_id, "run_id": run["dag_run_id"], "run_type": run["run_type"],
                       "state": run["state"], "outcome": outcome({"state": run["state"], "note": run.get("note")}),
                       "reason": reason_of(api, dag_id, run), "run_after": run.get("run_after"),
                       "started_by": origin(api, dag_id, run)}
                if dag_id.endswith("_incident"):
                    row["admission"] = admission_note(api, dag_id, run)
                rows.append(row)
    except AirflowAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows.sort(key=lambda r: r["run_after"] or "", reverse=True)
    rows = rows[: args.limit]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs of {', '.join(dag_ids)} yet")
        return 0
    for r in rows:
        when = datetime.fromisoformat(r["run_after"].replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M") \
            if r["run_after"] else "-"
        extra = f"  [{r['admission']}]" if r.get("admission") else ""
        print(f"{when}  {r['dag_id']:<30} {r['outcome']:<8} {r['run_id']}\n    started by: {r['started_by']}{extra}"
              + (f"\n    reason: {r['reason']}" if r.get("reason") else ""))
    return 0


def cmd_health(args) -> int:
    from datetime import timedelta

    from closedloop.cli.common import pipelines_dir
    from closedloop.cli.render import format_health
    from closedloop.records.health import (
        cache_figures,
        current_versions,
        figures,
        pipelines_of,
        records_from_api,
    )
    from closedloop.spec import load_all

    specs, _ = load_all(pipelines_dir(args))
    pipelines = pipelines_of(specs)
    until = datetime.now(UTC)
    since = until - timedelta(days=args.days)
    try:
        runs, tis = records_from_api(AirflowAPI(url=args.api_url, user=args.user),
                                     [d for ids in pipelines.values() for d in ids], since)
    except AirflowAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    h = figures(pipelines, runs, tis, since=since, until=until)
    h["versions"] = current_versions(specs)
    h["cache"] = cache_figures(specs, since)
    from closedloop.spec.schema import template_problems

    h["template_errors"] = template_problems(pipelines_dir(args))
    print(json.dumps(h, indent=2, default=str) if args.json else format_health(h))
    return 0


def add_parsers(sub, find) -> None:
    sp = sub.add_parser("incident", help="report a fleet incident: starts a high-priority retrain of its model")
    isub = sp.add_subparsers(dest="incident_action", required=True)
    sp = isub.add_parser("report", help="validate an incident and post it as an Airflow asset event (or to the inbox)")
    sp.add_argument("--model", help="registered model the incident concerns")
    sp.add_argument("--scenario-type", help="e.g. hard_braking, cut_in, stop_and_go")
    sp.add_argument("--severity", help="low, medium, high or critical")
    sp.add_argument("--kind", help="collision, disengagement, near_miss, kpi_degradation or other")
    sp.add_argument("--log-ref", action="append", help="URI of a log of the incident (repeatable)")
    sp.add_argument("--occurred-at", help="ISO 8601 time of the incident")
    sp.add_argument("--vehicle")
    sp.add_argument("--description")
    sp.add_argument("--id", help="the incident's id in your tracker (default: derived from its content)")
    sp.add_argument("--file", help="JSON file with the incident (flags override its fields)")
    sp.add_argument("--inbox", action="store_true", help="drop it in the incident inbox folder instead of REST")
    sp.add_argument("--inbox-dir", help="inbox folder (default $CLOSEDLOOP_INCIDENT_INBOX or .closedloop/incidents/inbox)")
    sp.add_argument("--wait", type=float, metavar="SECONDS", help="wait this long for the run the event starts")
    arg_dir(sp)
    arg_login(sp)
    sp.set_defaults(func=cmd_incident_report)

    sp = sub.add_parser("kpi", help="online KPIs of production models (what the KPI watcher reads)")
    ksub = sp.add_subparsers(dest="kpi_action", required=True)
    sp = ksub.add_parser("report", help="log online KPIs of a model's production version to MLflow")
    sp.add_argument("model")
    sp.add_argument("--metric", action="append", required=True, help="name=number (repeatable)")
    sp.add_argument("--version", help="model version observed (default: the production version)")
    sp.set_defaults(func=cmd_kpi_report)

    sp = sub.add_parser("health", help="per pipeline: runs, failure rate, queue wait, lead times, retries, "
                        "pending approvals, current versions (from Airflow's records)")
    sp.add_argument("--days", type=int, default=7, help="window (default 7 days)")
    arg_json(sp)
    arg_dir(sp)
    arg_login(sp)
    sp.set_defaults(func=cmd_health)

    sp = sub.add_parser("runs", help="recent runs of a pipeline (periodic and incident) and what started each")
    sp.add_argument("pipeline")
    sp.add_argument("--limit", type=int, default=20)
    arg_json(sp)
    arg_dir(sp)
    arg_login(sp)
    sp.set_defaults(func=lambda a: cmd_runs(a, find))

"""``closedloop incident report | kpi report | runs``: events that start runs, and what started each run."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from closedloop.cli.common import arg_dir, arg_json, arg_login
from closedloop.records.airflow_api import AirflowAPI
from closedloop.records.health import outcome
from closedloop.records.runs import (
    admission_note,
    origin,
    post_incident,
    reason_of,
    wait_for_run,
)


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


def write_to_inbox(incident: dict, inbox: Path) -> Path:
    """Drop an incident file in the inbox atomically (a watcher never sees half a file)."""
    inbox.mkdir(parents=True, exist_ok=True)
    final = inbox / f"{incident['id']}-{time.time_ns()}.json"
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.write_text(json.dumps(incident, indent=1), encoding="utf-8")
    os.replace(tmp, final)
    return final


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
    event = post_incident(api, incident)
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
    out = report_kpis(args.model, metrics, version=args.version)
    print(f"logged KPIs of {out['model']} version {out['version']} (MLflow run {out['run_id']}): "
          + ", ".join(f"{k}={v:g}" for k, v in out["metrics"].items()))
    return 0


def cmd_runs(args, find) -> int:
    loaded = find(args, args.pipeline)
    if loaded is None:
        return 2
    api = AirflowAPI(url=args.api_url, user=args.user)
    dag_ids = [loaded.spec.name] + ([loaded.spec.incident_dag_id] if loaded.spec.incidents else [])
    rows = []
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
    from closedloop.records.health import (
        cache_figures,
        current_versions,
        figures,
        pipelines_of,
        recall_figures,
        records_from_api,
    )
    from closedloop.records.render import format_health
    from closedloop.spec import load_all

    specs, _ = load_all(pipelines_dir(args))
    pipelines = pipelines_of(specs)
    until = datetime.now(UTC)
    since = until - timedelta(days=args.days)
    runs, tis = records_from_api(AirflowAPI(url=args.api_url, user=args.user),
                                 [d for ids in pipelines.values() for d in ids], since)
    h = figures(pipelines, runs, tis, since=since, until=until)
    h["versions"] = current_versions(specs)
    h["cache"] = cache_figures(specs, since)
    h["recalls"] = recall_figures()
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
    sp.add_argument("--vehicle", help="vehicle id, e.g. VIN or fleet number")
    sp.add_argument("--description", help="what happened, in a sentence")
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
    sp.add_argument("model", help="registered model name, e.g. acc_longitudinal_policy")
    sp.add_argument("--metric", action="append", required=True, help="name=number (repeatable)")
    sp.add_argument("--version", help="model version observed (default: the production version)")
    sp.set_defaults(func=cmd_kpi_report, local_env=True)

    sp = sub.add_parser("health", help="per pipeline: runs, failure rate, queue wait, lead times, retries, "
                        "pending approvals, current versions (from Airflow's records)")
    sp.add_argument("--days", type=int, default=7, help="window (default 7 days)")
    arg_json(sp)
    arg_dir(sp)
    arg_login(sp)
    sp.set_defaults(func=cmd_health, local_env=True)

    sp = sub.add_parser("runs", help="recent runs of a pipeline (periodic and incident) and what started each")
    sp.add_argument("pipeline", help="pipeline name, e.g. acc_longitudinal")
    sp.add_argument("--limit", type=int, default=20, help="list at most this many runs, newest first")
    arg_json(sp)
    arg_dir(sp)
    arg_login(sp)
    sp.set_defaults(func=lambda a: cmd_runs(a, find))

"""``closedloop request | approve | reject | promote | rollback | audit``."""

from __future__ import annotations

import json
import os
import sys

from closedloop.airflow_api import AirflowAPI, AirflowAPIError, xcom_value
from closedloop.errors import ApprovalError


def _api(args) -> AirflowAPI:
    return AirflowAPI(url=args.api_url, user=args.user)


def _ctx():
    from closedloop import settings
    from closedloop.steps.context import RunContext

    return RunContext(pipeline="", template_digest="", dag_id="", run_id="", tracking_uri=settings.tracking_uri())


def cmd_request(args, find) -> int:
    from closedloop.request import validate_request

    if find(args, args.pipeline) is None:
        return 2
    try:
        conf = validate_request({"purpose": args.purpose, "change": args.change, "expected_impact": args.impact,
                                 "scope": args.scope or "", "ticket": args.ticket or ""})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    api = _api(args)
    status, data = api.call("POST", f"/dags/{api.q(args.pipeline)}/dagRuns",
                            {"logical_date": None, "conf": conf, "note": f"model update request: {args.purpose[:200]}"})
    if status != 200:
        print(f"error: Airflow refused the request (HTTP {status}): {data.get('detail')}", file=sys.stderr)
        return 2 if status in (400, 404, 422) else 1
    print(f"requested: {args.pipeline} run {data['dag_run_id']} (state {data['state']}, requester {api.user})")
    return 0


def cmd_decide(args, decision: str) -> int:
    api = _api(args)
    path = f"{api.run_path(args.pipeline, args.run_id)}/taskInstances/approval/-1/hitlDetails"
    status, data = api.call("PATCH", path, {"chosen_options": [decision], "params_input": {"comment": args.comment or ""}})
    if status == 200:
        print(f"{decision.lower()}d: {args.pipeline} run {args.run_id} by {data['responded_by']['name']}")
        return 0
    detail = data.get("detail") if isinstance(data, dict) else data
    hint = {403: "you are not an assigned reviewer of this run (requesters cannot review their own request)",
            404: "no such run, or it has no approval step waiting", 409: "a decision was already recorded"}.get(status, "")
    print(f"error: Airflow refused the decision (HTTP {status}): {detail}" + (f"\n  {hint}" if hint else ""),
          file=sys.stderr)
    return 2 if status in (404, 409, 422) else 1


def cmd_hil_report(args) -> int:
    results = {}
    try:
        if args.results:
            with open(args.results, encoding="utf-8") as fh:
                results.update(json.load(fh))
        for item in args.metric or []:
            key, _, value = item.partition("=")
            results[key.strip()] = float(value)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the results: {exc}; expected --results FILE.json with an object of numbers "
              "and/or --metric name=number", file=sys.stderr)
        return 2
    if not results:
        print("error: no results given (--results FILE.json or --metric name=number)", file=sys.stderr)
        return 2
    api = _api(args)
    path = f"{api.run_path(args.pipeline, args.run_id)}/taskInstances/await_hil/-1/hitlDetails"
    status, data = api.call("PATCH", path, {"chosen_options": ["Report"], "params_input": {"results": results}})
    if status != 200:
        print(f"error: Airflow refused the report (HTTP {status}): {data.get('detail')}", file=sys.stderr)
        return 2 if status in (404, 409, 422) else 1
    print(f"reported {len(results)} hardware-in-the-loop metric(s) for {args.pipeline} run {args.run_id}")
    return 0


def evidence_from_airflow(api: AirflowAPI, model: str, version: str, tags: dict, approvers: list[str]):
    """Read what Airflow recorded about the run that registered ``model``/``version``."""
    from closedloop.steps.governance import PromotionEvidence

    dag_id, run_id = tags.get("airflow.dag_id"), tags.get("airflow.run_id")
    if not dag_id or not run_id:
        raise ApprovalError(f"refusing to promote {model} version {version}: it was not registered by a "
                            "closedloop pipeline run (no airflow.dag_id / airflow.run_id)")
    base = api.run_path(dag_id, run_id)
    run = api.get(base, missing_ok=True)
    reg = api.get(f"{base}/taskInstances/register_candidate/xcomEntries/return_value", missing_ok=True)
    gate = api.get(f"{base}/taskInstances/release_gate/xcomEntries/return_value", missing_ok=True)
    hitl = api.get(f"{base}/taskInstances/approval/-1/hitlDetails", missing_ok=True)
    reg_value = xcom_value(reg)
    gate_value = xcom_value(gate)
    responded = (hitl or {}).get("responded_by_user") or {}
    return PromotionEvidence(
        model=model, version=str(version), dag_id=dag_id, run_id=run_id, run_found=run is not None,
        requester=(run or {}).get("triggering_user_name"),
        registered_version=str(reg_value["version"]) if reg_value and reg_value.get("version") else None,
        gate_passed=gate_value.get("passed") if gate_value else None,
        hitl_received=bool(hitl and hitl.get("response_received")),
        chosen_options=list((hitl or {}).get("chosen_options") or []),
        responded_by=responded.get("id"), responded_at=(hitl or {}).get("responded_at"),
        comment=str(((hitl or {}).get("params_input") or {}).get("comment") or ""), approvers=approvers)


def _approvers_for(tags: dict) -> list[str]:
    from closedloop import settings
    from closedloop.spec import load_all

    specs, _ = load_all(settings.include_dir() / "pipelines")
    for s in specs:
        if s.spec.name == tags.get("closedloop.pipeline") and s.spec.approval:
            return list(s.spec.approval.approvers)
    return []


def cmd_promote(args) -> int:
    from mlflow import MlflowClient

    from closedloop import settings
    from closedloop.steps.governance import promote

    try:
        mv = MlflowClient(settings.tracking_uri()).get_model_version(args.model, args.version)
    except Exception as exc:
        print(f"error: no model version {args.model}/{args.version} in {settings.tracking_uri()}: "
              f"{str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    api = _api(args)
    try:
        evidence = evidence_from_airflow(api, args.model, args.version, mv.tags, _approvers_for(mv.tags))
        out = promote(_ctx(), evidence, actor=api.user or "unknown")
    except (ApprovalError, AirflowAPIError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{out['model']} version {out['version']} is production"
          + (f" (previous-production: {out['previous']})" if out["changed"] and out["previous"] else "")
          + ("" if out["changed"] else " already; nothing changed"))
    return 0


def cmd_rollback(args) -> int:
    from closedloop.steps.governance import rollback

    try:
        out = rollback(_ctx(), args.model, actor=args.user or os.environ.get("AIRFLOW_USERNAME") or os.environ.get("USER", "unknown"))
    except ApprovalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{out['model']}: production is version {out['production']} again"
          + (f"; version {out['previous-production']} is previous-production" if out["previous-production"] else ""))
    return 0


def cmd_audit(args) -> int:
    from closedloop.steps.governance import audit_trail

    try:
        trail = audit_trail(_ctx(), args.model, args.version)
    except Exception as exc:
        print(f"error: cannot read {args.model} version {args.version}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(trail, indent=2, default=str))
        return 0
    print(format_audit(trail))
    return 0


def format_audit(t: dict) -> str:
    from closedloop.steps.gates import format_report

    r = t["request"]
    out = [f"audit of {t['model']} version {t['version']}  (aliases: {', '.join('@' + a for a in t['aliases']) or '-'})",
           f"registered {t['created']} by Airflow run {t['run']['dag_id']}/{t['run']['run_id']}", "",
           "1. request", f"   requester: {r.get('requester', '-')}", f"   purpose:   {r.get('purpose', '-')}",
           f"   change:    {r.get('change', '-')}", f"   impact:    {r.get('expected_impact', '-')}",
           f"   scope:     {r.get('scope') or '-'}", f"   ticket:    {r.get('ticket') or '-'}", "",
           f"2. release gates: {t['gates_verdict'] or '-'}"]
    if t["gates"]:
        out.append(format_report(t["gates"]))
    rv = t["review"]
    out += ["", "3. review", f"   decision: {rv.get('decision', 'none yet')}" +
            (f" by {rv['reviewer']}" if rv.get("reviewer") else "") + (f" at {rv['at']}" if rv.get("at") else ""),
            f"   comment:  {rv.get('comment') or '-'}", "", "4. events"]
    for e in t["events"]:
        extra = ", ".join(f"{k}={v}" for k, v in sorted(e.items()) if k not in ("event", "at") and v not in (None, ""))
        out.append(f"   {e['at']}  {e['event']:<28} {extra}")
    if not t["events"]:
        out.append("   (none)")
    return "\n".join(out)


def add_parsers(sub, find) -> None:
    def creds(sp):
        sp.add_argument("--user", help="Airflow user (default $AIRFLOW_USERNAME); password from $AIRFLOW_PASSWORD")
        sp.add_argument("--api-url", help="Airflow API (default $AIRFLOW_API_URL or http://127.0.0.1:8080)")

    sp = sub.add_parser("request", help="file a model update request: start a run through Airflow's REST API")
    sp.add_argument("pipeline")
    sp.add_argument("--purpose", required=True, help="why (at least 10 characters)")
    sp.add_argument("--change", required=True, action="append",
                    help="what changed: data, label_policy, architecture, hyperparameters, code, other (repeatable)")
    sp.add_argument("--impact", required=True, help="expected impact")
    sp.add_argument("--scope", help="vehicles / regions / ODD concerned")
    sp.add_argument("--ticket", help="linked incident or ticket")
    sp.add_argument("--dir", help="templates folder (default: include/pipelines)")
    creds(sp)
    sp.set_defaults(func=lambda a: cmd_request(a, find))
    for name, decision in (("approve", "Approve"), ("reject", "Reject")):
        sp = sub.add_parser(name, help=f"{name} a waiting release candidate (as an assigned reviewer)")
        sp.add_argument("pipeline")
        sp.add_argument("run_id")
        sp.add_argument("--comment", default="")
        creds(sp)
        sp.set_defaults(func=lambda a, d=decision: cmd_decide(a, d))
    sp = sub.add_parser("hil", help="hardware-in-the-loop rig: report results for a waiting run")
    hs = sp.add_subparsers(dest="hil_action", required=True)
    sp = hs.add_parser("report", help="report results (as the rig's Airflow user)")
    sp.add_argument("pipeline")
    sp.add_argument("run_id")
    sp.add_argument("--results", help="JSON file: an object of metric name -> number")
    sp.add_argument("--metric", action="append", help="name=number (repeatable)")
    creds(sp)
    sp.set_defaults(func=cmd_hil_report)
    sp = sub.add_parser("promote", help="move alias production to an approved version (checked against Airflow)")
    sp.add_argument("model")
    sp.add_argument("version")
    creds(sp)
    sp.set_defaults(func=cmd_promote)
    sp = sub.add_parser("rollback", help="give production back to the previous-production version")
    sp.add_argument("model")
    sp.add_argument("--user", help="who rolls back (recorded)")
    sp.set_defaults(func=cmd_rollback)
    sp = sub.add_parser("audit", help="request, gates, review and alias changes of one model version")
    sp.add_argument("model")
    sp.add_argument("version")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_audit)

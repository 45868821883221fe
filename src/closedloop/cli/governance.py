"""``closedloop request | approve | reject | promote | rollback | audit``."""

from __future__ import annotations

import json
import sys
import time

from closedloop.cli.common import arg_dir, arg_json, arg_login, exit_code
from closedloop.records.airflow_api import AirflowAPI, AirflowAPIError, xcom_value


def _api(args) -> AirflowAPI:
    return AirflowAPI(url=args.api_url, user=args.user)


def _ctx():
    from closedloop import settings
    from closedloop.runtime.context import RunContext

    return RunContext(pipeline="", template_digest="", dag_id="", run_id="", tracking_uri=settings.tracking_uri())


def cmd_request(args, find) -> int:
    from closedloop.spec.request import validate_request

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
        return exit_code(status)
    print(f"requested: {args.pipeline} run {data['dag_run_id']} (state {data['state']}, requester {api.user})")
    return 0


def parked_review(api, pipeline: str, run_id: str, wait: float, prefix: str = "approval") -> str | None:
    """The approval task of the run that waits for a decision now (``approval``, or ``approval_2`` …
    of a quorum), waiting up to ``wait`` seconds for the review to open — an answer sent before the
    task is parked would race Airflow. None when none opened in time."""
    deadline = time.monotonic() + wait
    while True:
        status, data = api.call("GET", f"{api.run_path(pipeline, run_id)}/taskInstances?limit=100")
        if status != 200:
            return None
        waiting = sorted(t["task_id"] for t in data.get("task_instances", [])
                         if t["task_id"].startswith(prefix) and t.get("state") == "awaiting_input")
        if waiting:
            return waiting[0]
        if time.monotonic() >= deadline:
            return None
        time.sleep(1.0)


def why_no_review(api, pipeline: str, run_id: str, prefix: str = "approval") -> tuple[str, int]:
    """Why no review of the run is open, and the exit code: no such run (2), a decision already recorded or
    a run that ended (1), or a run still on its way to review (1)."""
    status, run = api.call("GET", api.run_path(pipeline, run_id))
    if status == 404:
        return f"{pipeline} has no run {run_id!r} (`closedloop runs {pipeline}` lists them)", 2
    _, data = api.call("GET", f"{api.run_path(pipeline, run_id)}/taskInstances?limit=100")
    reviews = {t["task_id"]: t.get("state") for t in (data or {}).get("task_instances", [])
               if t["task_id"].startswith(prefix)}
    decided = {k: v for k, v in reviews.items() if v in ("success", "failed")}
    if decided:
        return (f"the review of {pipeline} run {run_id} was already decided ("
                + ", ".join(f"{k}: {v}" for k, v in sorted(decided.items())) + "); a new review needs a new run"), 1
    if not reviews:
        return f"{pipeline} run {run_id} has no review step (its template has no `approval`)", 1
    state = (run or {}).get("state")
    if state in ("success", "failed"):
        return f"{pipeline} run {run_id} ended ({state}) before its review opened (e.g. a gate stopped it)", 1
    return (f"the review of {pipeline} run {run_id} is not open yet (run {state}); a run waits for review once "
            "its candidate is registered: try again, or --wait longer"), 1


def cmd_decide(args, decision: str) -> int:
    api = _api(args)
    task = parked_review(api, args.pipeline, args.run_id, args.wait)
    if task is None:
        why, code = why_no_review(api, args.pipeline, args.run_id)
        print(f"error: {why}", file=sys.stderr)
        return code
    path = f"{api.run_path(args.pipeline, args.run_id)}/taskInstances/{task}/-1/hitlDetails"
    body = {"chosen_options": [decision], "params_input": {"comment": args.comment or ""}}
    status, data = api.call("PATCH", path, body)
    for wait in (1, 2, 4):  # Airflow's own database busy (5xx): nothing was recorded, say it again
        if status < 500:
            break
        time.sleep(wait)
        status, data = api.call("PATCH", path, body)
    if status == 200:
        print(f"{'approved' if decision == 'Approve' else 'rejected'}: {args.pipeline} run {args.run_id} ({task}) by "
              f"{data['responded_by']['name']}")
        return 0
    detail = data.get("detail") if isinstance(data, dict) else data
    hint = {403: "you are not an assigned reviewer of this run (requesters cannot review their own request)",
            404: "no such run, or it has no approval step waiting", 409: "a decision was already recorded"}.get(status, "")
    print(f"error: Airflow refused the decision (HTTP {status}): {detail}" + (f"\n  {hint}" if hint else ""),
          file=sys.stderr)
    return exit_code(status)


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
    if parked_review(api, args.pipeline, args.run_id, args.wait, prefix="await_hil") is None:
        print(f"error: {args.pipeline} run {args.run_id} does not wait for hardware-in-the-loop results (waited "
              f"{args.wait:g} s)", file=sys.stderr)
        return 2
    path = f"{api.run_path(args.pipeline, args.run_id)}/taskInstances/await_hil/-1/hitlDetails"
    status, data = api.call("PATCH", path, {"chosen_options": ["Report"], "params_input": {"results": results}})
    if status != 200:
        print(f"error: Airflow refused the report (HTTP {status}): {data.get('detail')}", file=sys.stderr)
        return exit_code(status)
    print(f"reported {len(results)} hardware-in-the-loop metric(s) for {args.pipeline} run {args.run_id}")
    return 0


def dag_action(api: AirflowAPI, dag_id: str, task_id: str, conf: dict, *, note: str,
               timeout: float = 300) -> tuple[int, dict]:
    """Ask the deployment to act (a run of ``dag_id``, one task ``task_id``) as ``api.user`` and wait for
    its answer: ``(0, result)``, or ``(exit code, {"error": reason})``."""
    status, data = api.call("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf, "note": note})
    if status != 200:
        hint = {404: f"{dag_id} is not deployed (no template, or none with approval:)",
                403: "your Airflow role may not trigger DAG runs"}.get(status, "")
        return exit_code(status), {
            "error": f"Airflow refused the request (HTTP {status}): {data.get('detail') if data else ''}"
                     + (f"; {hint}" if hint else "")}
    run_path = api.run_path(dag_id, data["dag_run_id"])
    deadline = time.monotonic() + timeout
    state = data.get("state")
    while state not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(1)
        state = api.get(run_path)["state"]
    task = f"{run_path}/taskInstances/{task_id}"
    if state == "success":
        return 0, xcom_value(api.get(f"{task}/xcomEntries/return_value", missing_ok=True)) or {}
    if state != "failed":
        return 1, {"error": f"no answer within {timeout:g} s: run {data['dag_run_id']} of {dag_id} is {state}"}
    error = xcom_value(api.get(f"{task}/xcomEntries/error", missing_ok=True)) or {}
    code = 2 if error.get("error_class") == "RecallError" else 1
    return code, {"error": error.get("message") or f"run {data['dag_run_id']} of {dag_id} failed; see its log"}


def registry_action(api: AirflowAPI, conf: dict, *, timeout: float = 300) -> tuple[int, dict]:
    """Ask the deployment to act on the registry (DAG ``closedloop_registry``) as ``api.user`` and wait
    for its answer: ``(0, result)``, or ``(exit code, {"error": reason})``."""
    from closedloop.operators.registry import REGISTRY_DAG_ID

    return dag_action(api, REGISTRY_DAG_ID, "registry_action", conf, note=f"{conf['action']} {conf['model']}",
                      timeout=timeout)


def aliases_now(model: str) -> dict[str, str]:
    """The model's aliases as the caller sees them in MLflow (what a registry request names as its move)."""
    from closedloop.runtime.tracking import mlflow_client

    try:
        rm = mlflow_client().get_registered_model(model)
    except Exception as exc:  # no such model: the deployment says so with the reason
        from closedloop.runtime.tracking import not_found

        if not_found(exc):
            return {}
        raise
    return {a: str(v) for a, v in (rm.aliases or {}).items()}


def ask_registry(args, **conf: str) -> tuple[int, dict | None]:
    """Run one registry action as the caller (:func:`registry_action`); a refusal is printed.
    Returns ``(exit code, result)``. The request names the exact move: production as the caller sees it
    now (``from_version``) and where it goes."""
    if "from_version" not in conf:
        try:
            conf["from_version"] = aliases_now(conf["model"]).get("production") or "none"
        except Exception as exc:
            print(f"error: cannot read {conf['model']}'s aliases in MLflow ({str(exc).splitlines()[0]}); a registry "
                  "request names the move it asks for", file=sys.stderr)
            return 2, None
    try:
        code, out = registry_action(_api(args), {"version": "", "reason": "", "to_version": "", **conf})
    except AirflowAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1, None
    if code:
        print(f"error: {out['error']}", file=sys.stderr)
        return code, None
    return 0, out


def cmd_promote(args) -> int:
    code, out = ask_registry(args, action="promote", model=args.model, version=str(args.version))
    if code:
        return code
    print(f"{out['model']} version {out['version']} is production"
          + (f" (previous-production: {out['previous']})" if out["changed"] and out.get("previous") else "")
          + ("" if out["changed"] else " already; nothing changed")
          + f"; approved by {', '.join(out.get('approved_by') or [])}")
    return 0


def cmd_rollback(args) -> int:
    try:
        now = aliases_now(args.model)
    except Exception as exc:
        print(f"error: cannot read {args.model}'s aliases in MLflow: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    to = str(args.to) if getattr(args, "to", None) else now.get("previous-production", "")
    code, out = ask_registry(args, action="rollback", model=args.model, reason=args.reason,
                             from_version=now.get("production") or "none", to_version=to)
    if code:
        return code
    print(f"{out['model']}: production is version {out['production']} again"
          + (f"; version {out['previous-production']} is previous-production" if out["previous-production"] else "")
          + f" (by {out['by']}: {args.reason})")
    return 0


def cmd_verify(args) -> int:
    """``closedloop audit --verify MODEL [--restore --reason …]``: aliases against the sealed records."""
    from closedloop.errors import EvidenceError
    from closedloop.runtime.signing import trusted_keys
    from closedloop.runtime.tracking import mlflow_client
    from closedloop.steps.governance import check_aliases

    try:
        verifier = trusted_keys()
        where = verifier.where
        state = check_aliases(mlflow_client(), args.model, verifier)
    except EvidenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from closedloop.runtime.tracking import not_found

        why = "no such registered model" if not_found(exc) else str(exc).splitlines()[0]
        print(f"error: cannot verify model {args.model!r}: {why}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**state, "public_key": verifier.published(), "key_from": where}, indent=2, default=str))
    else:
        last = state["last_promotion"]
        print(f"{args.model}: aliases {', '.join(f'@{a}={v}' for a, v in sorted(state['aliases'].items())) or 'none'}")
        print("  last sealed promotion: " + (f"version {last['version']} ({last['kind']} by {last['by']} at "
                                             f"{last['at']}, seq {last['seq']})" if last else "none"))
        print(f"  verified with key {verifier.key_id} ({where})")
        for p in state["problems"]:
            print(f"  UNEXPLAINED: {p}")
        if state["ok"]:
            print("  OK: every alias is explained by a sealed record")
    if state["ok"] or not args.restore:
        return 0 if state["ok"] else 1
    if not args.reason:
        print("error: --restore needs --reason", file=sys.stderr)
        return 2
    last = state["last_promotion"] or {}
    code, out = ask_registry(args, action="restore", model=args.model, reason=args.reason,
                             from_version=state["aliases"].get("production") or "none",
                             to_version=str(last.get("version") or ""))
    if code:
        return code
    print(f"restored: {args.model}@production is version {out['production']} again (was {out['was']})")
    return 0


def cmd_keys(args) -> int:
    """``closedloop keys generate|show|rotate``: the deployment's signing key and its pinned public keys."""
    from closedloop.runtime.signing import Signer, trusted_keys

    if args.keys_action == "generate":
        key = Signer.generate()
        print("# private key: give it to the deployment's tasks as CLOSEDLOOP_SIGNING_KEY (environment) or as the "
              "connection 'closedloop_signing' of your secrets backend; never in git, templates, logs or Airflow's "
              "metadata database. Pin the public key: include/keys/trusted_keys.json or CLOSEDLOOP_TRUSTED_KEYS",
              file=sys.stderr)
        print(f"CLOSEDLOOP_SIGNING_KEY={key.seed_b64()}")
        print(f"CLOSEDLOOP_TRUSTED_KEYS={key.verifier.published()}")
        return 0
    if args.keys_action == "rotate":
        return rotate_keys(args)
    ring = trusted_keys()
    shown = [{"key": k.verifier.published(), "key_id": k.verifier.key_id, "retired": k.retired,
              "state": "retired" if k.retired else ("current" if k.verifier is ring.current else "active")}
             for k in ring.keys]
    if getattr(args, "json", False):
        import json

        print(json.dumps({"pinned_in": str(ring.where), "keys": shown}, indent=2, default=str))
        return 0
    for k in shown:
        state = f"retired {k['retired']}" if k["retired"] else k["state"]
        print(f"{k['key']}  (key id {k['key_id']}, {state})")
    print(f"pinned in {ring.where}")
    return 0


def rotate_keys(args) -> int:
    """A new signing key appended to the pinned set, the old one retired (its records stay verifiable).

    Production: writes the new pin file to ``--pins`` (commit it, reviewed like code) and prints the
    new private key for the secrets backend. Embedded default: replaces the local key file (the old
    one is kept beside it) and its pin file."""
    import os
    from pathlib import Path

    from closedloop.runtime.signing import PinnedKey, Signer, keyring_from_json, local_key_path, trusted_keys
    from closedloop.runtime.timeutil import utc_now_iso

    ring = trusted_keys()
    now = utc_now_iso()
    fresh = Signer.generate()
    keys = [PinnedKey(k.verifier, k.added, k.retired or now, k.note) for k in ring.keys]
    keys.append(PinnedKey(fresh.verifier, added=now, note=args.note or "rotated"))
    doc = json.dumps({"keys": [k.as_dict() for k in keys]}, indent=1) + "\n"
    local = local_key_path()
    target = Path(args.pins) if args.pins else Path(ring.where)
    if not args.pins and target != local.with_name("trusted_keys.json"):
        print(f"error: the pins live in {ring.where} (reviewed with the deployment): write the new set with --pins FILE "
              "and commit it; then give the tasks the new private key", file=sys.stderr)
        return 2
    keyring_from_json(doc, str(target))  # what is written reads back
    if not args.pins:  # embedded default: the key file and its pin, side by side
        old = local.read_text() if local.exists() else ""
        if old:
            kept = local.with_name(f"release-signing.{ring.key_id}.retired")
            kept.write_text(old)
            kept.chmod(0o600)
        tmp = local.with_suffix(".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(fresh.seed_b64() + "\n")
        os.replace(tmp, local)
        local.with_suffix(".pub").write_text(fresh.verifier.published() + "\n")
    target.write_text(doc)
    print(f"pinned key {fresh.verifier.key_id} in {target}; retired {', '.join(ring.ids())} (records they sealed "
          "stay verifiable)")
    if args.pins:
        print(f"CLOSEDLOOP_SIGNING_KEY={fresh.seed_b64()}")
        print("# give the tasks the new private key (environment or secrets backend) once the pin file is deployed",
              file=sys.stderr)
    return 0


def cmd_audit(args) -> int:
    from closedloop.records.audit import audit_trail

    if args.verify:
        return cmd_verify(args)
    if not args.version:
        print("error: audit needs MODEL VERSION (or --verify MODEL)", file=sys.stderr)
        return 2

    try:
        trail = audit_trail(_ctx(), args.model, args.version)
    except Exception as exc:
        print(f"error: cannot read {args.model} version {args.version}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(trail, indent=2, default=str))
        return 0
    from closedloop.records.render import format_audit

    print(format_audit(trail))
    return 0


def add_parsers(sub, find) -> None:
    sp = sub.add_parser("request", help="file a model update request: start a run through Airflow's REST API")
    sp.add_argument("pipeline", help="pipeline name, e.g. acc_longitudinal")
    sp.add_argument("--purpose", required=True, help="why (at least 10 characters)")
    sp.add_argument("--change", required=True, action="append",
                    help="what changed: data, label_policy, architecture, hyperparameters, code, other (repeatable)")
    sp.add_argument("--impact", required=True, help="expected impact")
    sp.add_argument("--scope", help="vehicles / regions / ODD concerned")
    sp.add_argument("--ticket", help="linked incident or ticket")
    arg_dir(sp)
    arg_login(sp)
    sp.set_defaults(func=lambda a: cmd_request(a, find))
    for name, decision in (("approve", "Approve"), ("reject", "Reject")):
        sp = sub.add_parser(name, help=f"{name} a waiting release candidate (as an assigned reviewer)")
        sp.add_argument("pipeline", help="pipeline name, e.g. acc_longitudinal")
        sp.add_argument("run_id", help="Airflow run id of the run under review, e.g. "
                        "manual__2026-12-07T10:00:00+00:00 (`closedloop runs PIPELINE` lists them)")
        sp.add_argument("--comment", default="", help="the reviewer's comment, recorded with the decision")
        sp.add_argument("--wait", type=float, default=60, help="seconds to wait for the review to open (default 60)")
        arg_login(sp)
        sp.set_defaults(func=lambda a, d=decision: cmd_decide(a, d))
    sp = sub.add_parser("hil", help="hardware-in-the-loop rig: report results for a waiting run")
    hs = sp.add_subparsers(dest="hil_action", required=True)
    sp = hs.add_parser("report", help="report results (as the rig's Airflow user)")
    sp.add_argument("pipeline", help="pipeline name, e.g. acc_longitudinal")
    sp.add_argument("run_id", help="Airflow run id of the run waiting for the rig")
    sp.add_argument("--results", help="JSON file: an object of metric name -> number")
    sp.add_argument("--metric", action="append", help="name=number (repeatable)")
    sp.add_argument("--wait", type=float, default=60, help="seconds to wait for the run to ask (default 60)")
    arg_login(sp)
    sp.set_defaults(func=cmd_hil_report)
    sp = sub.add_parser("promote", help="move alias production to an approved version (through Airflow: the "
                        "deployment checks the sealed release record and approvals)")
    sp.add_argument("model", help="registered model name, e.g. acc_longitudinal_policy")
    sp.add_argument("version", help="model version number, e.g. 3")
    arg_login(sp)
    sp.set_defaults(func=cmd_promote, local_env=True)
    sp = sub.add_parser("rollback", help="give production back to the previous-production version (through "
                        "Airflow, as an approver; audited)")
    sp.add_argument("model", help="registered model name, e.g. acc_longitudinal_policy")
    sp.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    sp.add_argument("--to", metavar="VERSION", help="roll back to this older version instead (one a sealed promotion "
                    "once put in production and no recall holds: what `closedloop recall show` proposes)")
    arg_login(sp)
    sp.set_defaults(func=cmd_rollback, local_env=True)
    sp = sub.add_parser("audit", help="request, gates, review and alias changes of one model version; "
                        "--verify MODEL checks the aliases against the sealed records")
    sp.add_argument("model", help="registered model name, e.g. acc_longitudinal_policy")
    sp.add_argument("version", nargs="?", help="model version number (default: with --verify, every version)")
    arg_json(sp)
    sp.add_argument("--verify", action="store_true", help="exit 1 naming every alias no sealed record explains")
    sp.add_argument("--restore", action="store_true", help="with --verify: put production back on the last "
                    "governed version (through Airflow, as an approver)")
    sp.add_argument("--reason", help="with --restore: why")
    arg_login(sp)
    sp.set_defaults(func=cmd_audit, local_env=True)
    sp = sub.add_parser("keys", help="the deployment's signing key: generate one, show the pinned public keys, "
                        "or rotate (a new key pinned, the old one retired)")
    sp.add_argument("keys_action", choices=["generate", "show", "rotate"],
                    help="generate the key pair, show the pinned public keys, or rotate to a new key")
    sp.add_argument("--pins", help="rotate: write the new pinned set to this file (production: commit it)")
    sp.add_argument("--note", help="rotate: why (kept in the pinned set)")
    arg_json(sp, "show: print the pinned keys as JSON")
    sp.set_defaults(func=cmd_keys)

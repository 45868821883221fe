"""``closedloop trace | impact | rerun``: where a model came from, what a change touches, run it again."""

from __future__ import annotations

import json
import sys

from closedloop.cli.common import arg_dir, arg_json, arg_login, arg_paging, exit_code
from closedloop.records.airflow_api import AirflowAPI


def _answer(compute, fmt, as_json: bool) -> int:
    result = compute()
    print(json.dumps(result, indent=2, default=str) if as_json else fmt(result))
    return 0


def cmd_trace(args) -> int:
    from closedloop.records.lineage import trace
    from closedloop.records.render import format_trace

    return _answer(lambda: trace(args.ref, limit=args.limit, offset=args.offset), format_trace, args.json)


def cmd_impact(args) -> int:
    from closedloop.records.lineage import impact
    from closedloop.records.render import format_impact

    return _answer(lambda: impact(source=args.source, label_policy=args.label_policy, dataset=args.dataset,
                                  limit=args.limit, offset=args.offset),
                   format_impact, args.json)


def cmd_rerun(args) -> int:
    from closedloop.cli.common import pipelines_dir
    from closedloop.records.lineage import rerun_plan
    from closedloop.spec import load_all

    specs, _ = load_all(pipelines_dir(args))
    plan = rerun_plan(args.ref, specs, fresh_data=args.fresh_data, allow_template_change=args.allow_template_change,
                      no_cache=args.no_cache)
    if args.dry_run:
        from closedloop.records.render import format_rerun_plan

        print(json.dumps(plan, indent=2) if args.json else format_rerun_plan(plan))
        return 0
    for note in plan["notes"]:
        print(f"note: {note}", file=sys.stderr)
    api = AirflowAPI(url=args.api_url, user=args.user)
    status, run = api.call("POST", f"/dags/{api.q(plan['dag_id'])}/dagRuns", {
        "logical_date": None, "conf": plan["conf"], "note": f"rerun of {plan['original']}"
        + (" with fresh data" if args.fresh_data else f" on pinned snapshot {plan['pinned']}")
        + (", step cache off" if args.no_cache else "")})
    if status != 200:
        print(f"error: Airflow refused the rerun (HTTP {status}): {run.get('detail')}", file=sys.stderr)
        return exit_code(status)
    what = "fresh data" if args.fresh_data else f"the pinned snapshot {plan['pinned']}"
    print(f"rerun of {plan['original']}: {plan['dag_id']} run {run['dag_run_id']} on {what}")
    return 0


def cmd_scenarios_list(args) -> int:
    from closedloop import settings
    from closedloop.records.render import format_scenarios
    from closedloop.steps.regression import catalog

    def listed() -> dict:
        found = catalog(settings.data_root(), args.model)
        if not found["entries"]:  # no scenario yet, or no such model at all (exit 2, like trace)
            from closedloop.records.lineage import registered_model

            registered_model(args.model)
        return found

    return _answer(listed, format_scenarios, args.json)


def cmd_dossier_show(args) -> int:
    from closedloop.records.lineage import dossier_of
    from closedloop.records.render import format_dossier

    return _answer(lambda: dossier_of(args.ref), format_dossier, args.json)


def cmd_dossier_verify(args) -> int:
    """Offline: the bundle and a public key, nothing else (no Airflow, no MLflow, no network)."""
    from pathlib import Path

    from closedloop.errors import EvidenceError
    from closedloop.steps.dossier import verify

    if not Path(args.path).is_dir():
        print(f"error: {args.path}: no such dossier folder (`closedloop dossier show REF` says where it is)",
              file=sys.stderr)
        return 2
    keys = _keys(args.key)
    try:
        body = verify(args.path, keys)
    except EvidenceError as exc:
        print(f"NOT VERIFIED: {exc}", file=sys.stderr)
        return 1
    statements = body.get("approvals", {}).get("statements") or []
    print(f"verified: release dossier of {body['model']} v{body['version']} ({body['verdict']['verdict']}); "
          f"signature, every cited file and {1 + len(statements)} sealed record(s) match key "
          f"{', '.join(keys.ids()) if hasattr(keys, 'ids') else keys.key_id}")
    return 0


def _keys(key: str | None):
    """``--key``: the published key (``ed25519:…``), a file holding it, or a pinned-keys JSON file; without
    it, the deployment's pinned keys."""
    from pathlib import Path

    from closedloop.runtime.signing import Verifier, keyring_from_json, trusted_keys

    if not key:
        return trusted_keys()
    path = Path(key)
    text = path.read_text() if path.is_file() else key
    return keyring_from_json(text, str(path)) if text.lstrip().startswith(("{", "[")) else Verifier.from_text(text)


def add_parsers(sub) -> None:
    sp = sub.add_parser("trace", help="the chain behind a model version or run: data, labels, template, run, gates, review")
    sp.add_argument("ref", help="models:/NAME@ALIAS, models:/NAME/VERSION, NAME/VERSION, an MLflow run id or an "
                               "Airflow dag run id")
    arg_paging(sp, "regression scenarios")
    arg_json(sp)
    sp.set_defaults(func=cmd_trace, local_env=True)
    sp = sub.add_parser("impact", help="snapshots, training runs and model versions a source, label policy or "
                                      "dataset touches (live ones flagged)")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", help="fleet log source, e.g. fleet-eu")
    g.add_argument("--label-policy", help="NAME or NAME@VERSION")
    g.add_argument("--dataset", help="dataset snapshot digest (raw or labelled; its first 8+ hex digits will do)")
    arg_paging(sp, "each")
    arg_json(sp)
    sp.set_defaults(func=cmd_impact, local_env=True)
    dp = sub.add_parser("dossier", help="a model version's signed release dossier: where it is, and offline "
                                        "verification")
    dps = dp.add_subparsers(dest="action", required=True)
    sp = dps.add_parser("show", help="where the version's dossier is, its digest and verdict")
    sp.add_argument("ref", help="models:/NAME@ALIAS, NAME/VERSION, an MLflow run id or an Airflow dag run id")
    arg_json(sp)
    sp.set_defaults(func=cmd_dossier_show, local_env=True)
    sp = dps.add_parser("verify", help="check a dossier bundle with the published public key only (offline): "
                                       "signature, every file's digest, every sealed record")
    sp.add_argument("path", help="the bundle's folder or its dossier.json")
    sp.add_argument("--key", help="the published public key (ed25519:…), a file holding it, or a pinned-keys "
                                  "JSON file (default: this deployment's pinned keys)")
    sp.set_defaults(func=cmd_dossier_verify)
    sc = sub.add_parser("scenarios", help="a model's regression scenarios (one per admitted incident)")
    scs = sc.add_subparsers(dest="action", required=True)
    sp = scs.add_parser("list", help="the model's regression catalog: version, and each scenario by incident")
    sp.add_argument("model", help="registered model name, e.g. acc_longitudinal_policy")
    arg_json(sp)
    sp.set_defaults(func=cmd_scenarios_list)
    sp = sub.add_parser("rerun", help="run a pipeline run again exactly: same request, pinned snapshot, label policy")
    sp.add_argument("ref", help="the run to repeat: DAG_ID/RUN_ID (as trace and runs print it), an Airflow run id, "
                    "an MLflow run id or a model version (NAME/VERSION, models:/NAME@ALIAS)")
    sp.add_argument("--fresh-data", action="store_true", help="build a new snapshot instead of the pinned one")
    sp.add_argument("--allow-template-change", action="store_true",
                    help="rerun even though the template changed since (not exact)")
    sp.add_argument("--no-cache", action="store_true",
                    help="do every step again: bypass the step cache (results of identical earlier steps)")
    sp.add_argument("--dry-run", action="store_true", help="print the plan (DAG, conf, notes) and start nothing")
    arg_json(sp, "with --dry-run: print the plan as JSON")
    arg_dir(sp)
    arg_login(sp)
    sp.set_defaults(func=cmd_rerun, local_env=True)

"""The ``closedloop`` command.

``closedloop pipelines list|validate|describe``  work on templates (no Airflow start-up needed)
``closedloop demo``                               the governed path through a local Airflow
``closedloop serve``                              local Airflow UI + MLflow UI (``make airflow``)
``closedloop run PIPELINE``                       one run in-process through Airflow (``dag.test``)
``closedloop request|approve|reject``             model update requests and reviews, via Airflow's REST API
``closedloop hil report``                         a hardware-in-the-loop rig reports results
``closedloop promote|rollback|audit``             production alias, checked against Airflow's records
``closedloop incident report``                    a fleet incident starts a high-priority retrain (REST or inbox)
``closedloop kpi report MODEL``                    log online KPIs of the production version (the KPI watcher reads them)
``closedloop runs PIPELINE``                       recent periodic and incident runs, and what started each
``closedloop health``                              failure rate, queue wait, lead times per pipeline (Airflow's records)
``closedloop trace REF`` / ``impact`` / ``rerun``   lineage: a model's origins, what a change touches, exact reruns
``closedloop summary PIPELINE RUN_ID``            the readable summary of any earlier run
``closedloop dossier show REF`` / ``verify PATH``  a version's signed release dossier; verified offline
``closedloop recall open|close|retrain|list|show`` a bad input: hold what it touched, roll back, retrain, close

Exit codes (one error path, :func:`closedloop.cli.common.failure`): 0 success, 1 the operation was refused,
Airflow was unreachable or the run failed, 2 bad input (unknown
pipeline, model or version, invalid template or request).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from closedloop import settings
from closedloop.cli.common import arg_dir, arg_json, arg_login, failure, find_pipeline, pipelines_dir

PROJECT = settings.project_dir()
DEMO_PIPELINE = "acc_longitudinal"


def local_defaults() -> None:
    """Embedded defaults for a laptop: everything under $CLOSEDLOOP_HOME, nothing to configure.

    Must run before Airflow is imported (Airflow reads its configuration at import time).
    """
    home = settings.home()
    os.environ.setdefault("CLOSEDLOOP_HOME", str(home))
    os.environ.setdefault("AIRFLOW_HOME", str(home / "airflow"))
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT / "dags"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.update(settings.thread_env())  # before numpy or scikit-learn is imported
    os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri())
    Path(os.environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    (home / "mlflow").mkdir(parents=True, exist_ok=True)


ENV_KEYS = ("CLOSEDLOOP_HOME", "AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__LOAD_EXAMPLES",
            "AIRFLOW__CORE__UNIT_TEST_MODE", "GX_ANALYTICS_ENABLED", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
            "MLFLOW_TRACKING_URI", *settings.THREAD_VARS)


def cmd_list(args) -> int:
    from closedloop.spec import load_all

    specs, errors = load_all(pipelines_dir(args))
    if args.json:
        print(json.dumps({"pipelines": [{"name": s.spec.name, "schedule": s.spec.schedule, "model": s.spec.model.name,
                                         "file": str(s.path), "hash": s.digest} for s in specs],
                          "invalid": [{"file": str(e.path), "error": str(e)} for e in errors]}, indent=2))
        return 2 if errors else 0
    for s in specs:
        print(f"{s.spec.name:<28} {s.spec.schedule or '-':<14} model {s.spec.model.name:<30} {s.path.name}")
    for e in errors:
        print(f"INVALID {e.path}", file=sys.stderr)
    return 2 if errors else 0


def cmd_validate(args) -> int:
    from closedloop.spec import load_all, load_spec

    if args.files:
        from closedloop.errors import SpecError

        specs, errors = [], []
        for f in args.files:
            try:
                specs.append(load_spec(f))
            except SpecError as exc:
                errors.append(exc)
    else:
        specs, errors = load_all(pipelines_dir(args))
    from closedloop.spec.deployment import deployment_check

    problems, warnings = deployment_check(specs, one_file=bool(args.files))
    bad = {p.split(": ", 1)[0] for p in problems}
    invalid = len(errors) + len(bad)
    if args.json:
        print(json.dumps({"valid": [{"file": str(s.path), "name": s.spec.name, "hash": s.digest} for s in specs
                                    if str(s.path) not in bad],
                          "invalid": [str(e) for e in errors] + list(problems), "warnings": list(warnings)}, indent=2))
        return 2 if invalid else 0
    for s in specs:
        if str(s.path) not in bad:
            print(f"ok       {s.path}  ({s.spec.name}, hash {s.digest})")
    for e in errors:
        print(f"INVALID  {e}", file=sys.stderr)
    for p in problems:
        print(f"INVALID  {p}", file=sys.stderr)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    sys.stderr.flush()
    print(f"{len(specs) + len(errors) - invalid} valid, {invalid} invalid")
    return 2 if invalid else 0


def cmd_describe(args) -> int:
    from closedloop.spec.describe import describe

    loaded = find_pipeline(args, args.name)
    if loaded is None:
        return 2
    if args.json:
        from closedloop import pipeline

        s = loaded.spec
        tasks = [t.id for t in pipeline.steps_of(hil=s.hil is not None, approval=s.approval is not None,
                                                 shards=s.simulation.shards is not None)]
        print(json.dumps({"name": s.name, "file": str(loaded.path), "hash": loaded.digest, "tasks": tasks,
                          "dag_ids": [s.name] + ([s.incident_dag_id] if s.incidents else []),
                          "template": s.model_dump(mode="json")}, indent=2))
        return 0
    print(describe(loaded))
    return 0


def cmd_run(args) -> int:
    local_defaults()
    if find_pipeline(args, args.pipeline) is None:
        return 2
    from closedloop.local.run import run_pipeline

    try:
        summary = run_pipeline(args.pipeline, logical_date=args.date, quiet=not args.verbose)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 2
    return _print_summary(summary, args)


def cmd_env(args) -> int:
    """Print the embedded defaults as shell exports (``eval "$(closedloop env)"``)."""
    local_defaults()
    for key in ENV_KEYS:
        print(f"export {key}={shlex.quote(os.environ[key])}")
    return 0


def cmd_summary(args) -> int:
    local_defaults()
    from closedloop.local.run import collect_summary

    try:
        summary = collect_summary(args.pipeline, args.run_id)
    except Exception as exc:  # no local Airflow database yet: nothing has run here
        if "no such table" not in str(exc):
            raise
        summary = None
    if summary is None:
        print(f"error: no run {args.run_id!r} of pipeline {args.pipeline!r} in {os.environ['AIRFLOW_HOME']}",
              file=sys.stderr)
        return 2
    return _print_summary(summary, args)


def _print_summary(summary: dict, args) -> int:
    from closedloop.records.render import format_summary

    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0 if summary["state"] == "success" else 1


def cmd_demo(args) -> int:
    local_defaults()
    from closedloop.local.demo import run
    from closedloop.local.run import ensure_db

    ensure_db()
    return run()


def cmd_serve(args) -> int:
    local_defaults()
    from closedloop.local.run import ensure_db
    from closedloop.local.server import serve

    ensure_db()
    return serve(args.port, args.mlflow_port)


EXAMPLES = {
    "pipelines list": "closedloop pipelines list",
    "pipelines validate": "closedloop pipelines validate include/pipelines/acc_longitudinal.yaml",
    "pipelines describe": "closedloop pipelines describe acc_longitudinal",
    "run": "closedloop run acc_longitudinal --date 2026-11-30",
    "demo": "closedloop demo",
    "serve": "closedloop serve --port 8081 --mlflow-port 5001",
    "request": "closedloop request acc_longitudinal --purpose 'EU-only policy for the winter fleet' --change data "
               "--impact 'fewer EU cut-in errors'",
    "approve": "closedloop approve acc_longitudinal manual__2026-12-07T10:00:00+00:00 --comment 'gates and shift ok'",
    "reject": "closedloop reject acc_longitudinal manual__2026-12-07T10:00:00+00:00 --comment 'too few cut-ins'",
    "hil report": "closedloop hil report acc_longitudinal manual__2026-12-07T10:00:00+00:00 "
                  "--metric collision_rate=0 --metric max_decel=7.9",
    "promote": "closedloop promote acc_longitudinal_policy 3",
    "rollback": "closedloop rollback acc_longitudinal_policy --reason 'harsh braking reported in the field'",
    "audit": "closedloop audit acc_longitudinal_policy 3",
    "keys": "closedloop keys show",
    "incident report": "closedloop incident report --model acc_longitudinal_policy --scenario-type hard_braking "
                       "--severity high --log-ref s3://fleet/logs/veh42/2026-12-06.mcap",
    "kpi report": "closedloop kpi report acc_longitudinal_policy --metric hard_brake_rate=0.02",
    "health": "closedloop health --days 7",
    "runs": "closedloop runs acc_longitudinal --limit 5",
    "trace": "closedloop trace models:/acc_longitudinal_policy@production",
    "impact": "closedloop impact --source fleet-eu",
    "dossier show": "closedloop dossier show models:/acc_longitudinal_policy@production",
    "dossier verify": "closedloop dossier verify ./dossier-v3 --key ed25519:2f1c…",
    "scenarios list": "closedloop scenarios list acc_longitudinal_policy",
    "rerun": "closedloop rerun acc_longitudinal/manual__2026-12-07T10:00:00+00:00 --dry-run",
    "recall open": "closedloop recall open --source fleet-eu --window 2026-11-01..2026-11-08 "
                   "--reason 'logs mis-synchronised'",
    "recall close": "closedloop recall close R-0123456789 --reason 'fleet-eu re-synchronised; versions stay held'",
    "recall retrain": "closedloop recall retrain R-0123456789",
    "recall list": "closedloop recall list --state open",
    "recall show": "closedloop recall show R-0123456789",
    "settings apply": "closedloop settings apply airflow_settings.yaml",
    "prodlike": "closedloop prodlike --workers 2",
    "env": "eval \"$(closedloop env)\"",
    "summary": "closedloop summary acc_longitudinal manual__2026-12-07T10:00:00+00:00",
}
"""One example per command (its help shows it; the tests parse each and check the table covers every command)."""


def commands(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command of the parser, depth first: (words after ``closedloop``, its parser, whether it has
    subcommands)."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                has = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                yield (*path, name), sub, has
                yield from commands(sub, (*path, name))


def parser() -> argparse.ArgumentParser:
    from closedloop import __version__

    p = argparse.ArgumentParser(
        prog="closedloop", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Closed-loop retraining of driving models on Airflow and MLflow: pipelines from YAML\n"
                    "templates, gates, review, governed promotion, lineage and recalls.",
        epilog="Exit codes: 0 done; 1 refused, a check failed or Airflow was unreachable; 2 bad input or not "
               "found.\nExample: closedloop pipelines validate; closedloop demo; closedloop trace "
               "models:/acc_longitudinal_policy@production")
    p.add_argument("--version", action="version", version=f"closedloop {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pl = sub.add_parser("pipelines", help="list, validate and describe pipeline templates")
    pls = pl.add_subparsers(dest="action", required=True)
    for name, fn, helptext in (("list", cmd_list, "list valid pipelines"),
                               ("validate", cmd_validate, "validate templates (all, or the files given)"),
                               ("describe", cmd_describe, "purpose, inputs, outputs, dependencies, schedule")):
        sp = pls.add_parser(name, help=helptext)
        arg_dir(sp)
        arg_json(sp)
        sp.set_defaults(func=fn)
        if name == "validate":
            sp.add_argument("files", nargs="*", help="template files (default: every file in --dir)")
        if name == "describe":
            sp.add_argument("name", help="pipeline name (its template's `name`), e.g. acc_longitudinal")

    sp = sub.add_parser("run", help="run one pipeline end to end through Airflow (dag.test); a review step "
                        "waits for a decision from the UI (`make airflow`) or `closedloop approve`")
    sp.add_argument("pipeline", help="pipeline name, e.g. acc_longitudinal")
    sp.add_argument("--date", help="logical date YYYY-MM-DD (default: now); the data window ends there")
    arg_dir(sp)
    arg_json(sp, "print the summary as JSON")
    sp.add_argument("-v", "--verbose", action="store_true", help="show Airflow's task logs")
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("demo", help=f"the governed path of {DEMO_PIPELINE} through a local Airflow: request, "
                        "gates, candidate, approval by a reviewer, production, audit")
    sp.set_defaults(func=cmd_demo)
    sp = sub.add_parser("serve", help="local Airflow UI + MLflow UI on 127.0.0.1 (make airflow)")
    sp.add_argument("--port", type=int, default=8080, help="Airflow's port on 127.0.0.1")
    sp.add_argument("--mlflow-port", type=int, default=5000, help="MLflow's port on 127.0.0.1")
    sp.set_defaults(func=cmd_serve)

    from closedloop.cli.governance import add_parsers

    add_parsers(sub, find_pipeline)
    from closedloop.cli.events import add_parsers as add_event_parsers

    add_event_parsers(sub, find_pipeline)
    from closedloop.cli.lineage import add_parsers as add_lineage_parsers

    add_lineage_parsers(sub)
    from closedloop.cli.recall import add_parsers as add_recall_parsers

    add_recall_parsers(sub)
    add_settings_parsers(sub)

    sp = sub.add_parser("prodlike", help="the production shape on this machine: PostgreSQL, Redis, MLflow server, "
                                         "Airflow with Celery workers, all on 127.0.0.1 (make prodlike)")
    sp.add_argument("--workers", type=int, default=2, help="Celery workers to start")
    sp.add_argument("--dir", help="scratch folder (default: a new temporary one)")
    sp.set_defaults(func=cmd_prodlike)

    sp = sub.add_parser("env", help="print the embedded defaults as shell exports")
    sp.set_defaults(func=cmd_env)

    sp = sub.add_parser("summary", help="summary of an earlier run")
    sp.add_argument("pipeline", help="pipeline name, e.g. acc_longitudinal")
    sp.add_argument("run_id", help="Airflow run id, as `closedloop runs PIPELINE` prints it")
    arg_json(sp)
    sp.set_defaults(func=cmd_summary)
    for words, sp, has_subcommands in commands(p):
        if not has_subcommands and " ".join(words) in EXAMPLES:
            sp.epilog = f"example: {EXAMPLES[' '.join(words)]}"
            sp.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def cmd_prodlike(args) -> int:
    from closedloop.local.prodlike import main as prodlike

    return prodlike(args.dir, args.workers)


def cmd_settings_apply(args) -> int:
    from closedloop.local.airflow_settings import apply_settings, load_settings
    from closedloop.records.airflow_api import AirflowAPI

    settings = load_settings(args.file)
    done = apply_settings(AirflowAPI(url=args.api_url, user=args.user), settings)
    for kind, name, state in done:
        print(f"{kind[:-1]:<11} {name:<32} {state}")
    return 0


def add_settings_parsers(sub) -> None:
    sp = sub.add_parser("settings", help="Airflow connections, pools and variables from airflow_settings.yaml")
    ss = sp.add_subparsers(dest="settings_command", required=True)
    ap = ss.add_parser("apply", help="create or update them in an Airflow through its REST API (idempotent)")
    ap.add_argument("file", nargs="?", default="airflow_settings.yaml", help="settings file (Astro CLI format)")
    arg_login(ap)
    ap.set_defaults(func=cmd_settings_apply)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "local_env", False):  # the command reads the local stores (set where it is added)
        local_defaults()
    try:
        return args.func(args)
    except Exception as exc:
        code = failure(exc)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())

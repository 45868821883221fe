"""Spec → DAG, in stages: load (YAML) → validate (schema) → build (Airflow objects).

Cheap on purpose: called by the DAG processor on every parse, it imports no mlflow,
great_expectations, sklearn, pandas or numpy. Each template is built in its own try, so a
broken one never hides the others: its DAGs are held back (a placeholder that says why) and its
error is the import error of a second DAG file that builds no DAGs (see :func:`build_dags`).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG

from closedloop import pipeline
from closedloop.errors import SpecError
from closedloop.spec import LoadedSpec, load_all
from closedloop.spec.describe import describe
from closedloop.spec.request import dag_params
from closedloop.spec.schema import claimed_name

log = logging.getLogger(__name__)

def _default_args(loaded: LoadedSpec, **extra: Any) -> dict[str, Any]:
    """Owner, the template's retries and backoff, and its failure alerts, for every task."""
    from closedloop.notifiers import alert_notifiers

    rel = loaded.spec.reliability
    return {
        "owner": loaded.spec.owner,
        "on_failure_callback": alert_notifiers(loaded.spec),
        "retries": rel.retries,
        "retry_delay": timedelta(seconds=rel.retry_delay_seconds),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=rel.max_retry_delay_seconds),
        **extra,
    }


def _loop(loaded: LoadedSpec, incident_asset: Any = None):
    """The closed loop's tasks (inside an open DAG context), from the step table
    (:mod:`closedloop.pipeline`): each row's operator, retries, fan-out and edges; with
    ``incident_asset`` (the incident DAG) also the rows that need incidents, which read that asset."""
    from closedloop.runtime.context import resolve
    from closedloop.steps.approvals import approval_task_ids

    spec = loaded.spec
    pods = spec.kubernetes
    tasks: dict[str, Any] = {}
    for row in pipeline.steps_of(hil=spec.hil is not None, approval=spec.approval is not None,
                                 shards=spec.simulation.shards is not None, incidents=incident_asset is not None):
        kwargs: dict[str, Any] = {"loaded": loaded, "retries": spec.reliability.retries_of(row.id)
                                  if row.retry in ("transient", "decision") else 0}
        if row.when == "incidents":
            kwargs["asset"] = incident_asset
        operator = resolve(row.operator)
        if row.pod and pods is not None and getattr(pods, row.id, None):
            from closedloop.operators.pod import StepPodOperator

            operator, kwargs = StepPodOperator, {**kwargs, "step": row.id}
        if row.fan_out == "quorum":  # one human decision per required approval, by distinct people
            ids = approval_task_ids(spec.approval.required)
            made = [operator(task_id=t, prior=ids[:i], **kwargs) for i, t in enumerate(ids)]
            for earlier, later in zip(made, made[1:], strict=False):
                earlier >> later
        elif row.fan_out == "shards" and spec.simulation.shards is not None:  # one mapped task instance per shard
            from closedloop.steps.simulation import shard_names

            shards = shard_names(loaded)
            made = [operator.partial(task_id=row.id, shards=shards, **kwargs).expand(shard=list(range(len(shards))))]
        else:
            made = [operator(task_id=row.id, **kwargs)]
        for up in row.upstream:
            if up in tasks:
                tasks[up] >> made[0]
        tasks[row.id] = made[-1]
    return next(iter(tasks.values()))


def build_dag(loaded: LoadedSpec) -> DAG:
    """The pipeline's DAG: schedule, backfills, manual requests. The task graph is the same for
    every pipeline."""
    spec = loaded.spec
    with DAG(
        dag_id=spec.name,
        description=spec.description.strip().split("\n")[0][:200],
        doc_md=describe(loaded),
        schedule=spec.schedule,
        start_date=datetime.combine(spec.start_date, datetime.min.time(), tzinfo=UTC) if spec.start_date else None,
        catchup=spec.catchup,
        max_active_runs=4,
        default_args=_default_args(loaded),
        tags=sorted({"closedloop", *spec.tags}),
        params=dag_params(spec),
    ) as dag:
        _loop(loaded)
    return dag


def incident_asset(loaded: LoadedSpec, routes: dict[str, list[str]] | None = None):
    """The model's incident asset, with its watchers: the inbox folder, the production KPIs, and
    (production) a message queue through Airflow's common messaging provider."""
    from airflow.sdk import Asset, AssetWatcher

    from closedloop import settings
    from closedloop.spec.incident import asset_name, asset_uri, routes_of

    spec = loaded.spec
    inc = spec.incidents
    assert inc is not None
    routes = routes if routes is not None else routes_of([loaded])
    watchers = []
    if inc.inbox:
        from closedloop.triggers.incidents import IncidentInboxTrigger

        watchers.append(AssetWatcher(name=f"{spec.name}_inbox", trigger=IncidentInboxTrigger(
            inbox=str(settings.incident_inbox()), model=spec.model.name, routes=routes,
            max_bytes=inc.inbox_max_bytes)))
    if inc.kpis:
        from closedloop.triggers.incidents import KpiWatchTrigger

        watchers.append(AssetWatcher(name=f"{spec.name}_kpis", trigger=KpiWatchTrigger(
            model=spec.model.name, rules=json.dumps([r.model_dump(mode="json") for r in inc.kpis]),
            poll_interval=inc.kpi_poll_seconds)))
    if inc.queue:
        from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

        watchers.append(AssetWatcher(name=f"{spec.name}_queue", trigger=MessageQueueTrigger(**inc.queue)))
    return Asset(name=asset_name(spec.model.name), uri=asset_uri(spec.model.name), group="incidents",
                 watchers=watchers, extra={"pipeline": spec.name})


def build_incident_dag(loaded: LoadedSpec, routes: dict[str, list[str]] | None = None) -> DAG:
    """The pipeline's incident DAG (``<name>_incident``), for templates with ``incidents:``.

    Scheduled on the model's incident asset; its tasks run in the template's incident pool with
    a high absolute priority, so periodic runs never hold them up. ``admit_incident`` comes
    first: it rejects malformed incidents, debounces repeats and tells ``generate_dataset`` which
    scenario types to mine more of.
    """
    spec = loaded.spec
    inc = spec.incidents
    assert inc is not None
    asset = incident_asset(loaded, routes)
    with DAG(
        dag_id=spec.incident_dag_id,
        description=f"Incident retraining of {spec.model.name} ({spec.name})"[:200],
        doc_md=(f"# Incident retraining of `{spec.model.name}`\n\nThe incident DAG of pipeline `{spec.name}`: "
                "each run starts from incident asset events; `admit_incident` validates them, debounces "
                "repeats and tells `generate_dataset` which scenario types to mine more of; the rest is "
                "the pipeline's loop, below.\n\n" + describe(loaded)),
        schedule=[asset],
        start_date=None,
        catchup=False,
        max_active_runs=8,
        default_args=_default_args(loaded, pool=inc.pool, priority_weight=inc.priority_weight,
                                   weight_rule="absolute"),
        tags=sorted({"closedloop", "incident", *spec.tags}),
    ) as dag:
        _loop(loaded, incident_asset=asset)
    return dag


def build_registry_dags(specs: list[LoadedSpec]) -> dict[str, DAG]:
    """``closedloop_registry`` (promote / rollback / restore for a person, by the deployment) and
    ``closedloop_registry_watch`` (alerts on alias moves no sealed record explains), when any
    template has ``approval:``."""
    from airflow.sdk import Asset, AssetWatcher, Param

    from closedloop.operators.registry import (
        ACTIONS,
        REGISTRY_DAG_ID,
        WATCH_DAG_ID,
        AliasAlarmOperator,
        RegistryOperator,
    )
    from closedloop.triggers.registry import AliasWatchTrigger

    gov = [s for s in specs if s.spec.approval is not None]
    if not gov:
        return build_recall_dag(specs, []) if specs else {}
    models = sorted({s.spec.model.name for s in gov})
    with DAG(
        dag_id=REGISTRY_DAG_ID,
        description="Promote, roll back or restore a governed model's production version, for the person "
                    "who asks (checked, sealed, audited)",
        doc_md=("# Registry actions\n\nTriggered by `closedloop promote MODEL VERSION`, `closedloop rollback MODEL "
                "--reason …` and `closedloop audit --verify MODEL --restore --reason …` (or this form). The run "
                "records who asked; the task acts with the deployment's identity after the checks the pipelines' "
                "own `promote` makes. Rollback and restore are allowed to the template's approvers and "
                "`approval.rollback`.\n\nGoverned models: " + ", ".join(f"`{m}`" for m in models)),
        schedule=None, start_date=None, catchup=False, max_active_runs=1,
        tags=["closedloop", "governance"],
        params={"action": Param("promote", type="string", enum=list(ACTIONS), title="Action"),
                "model": Param(models[0], type="string", enum=models, title="Model"),
                "version": Param("", type="string", maxLength=20, title="Version (promote)"),
                "from_version": Param("", type="string", maxLength=20, title="Production now (as you see it; "
                                      "'none')", description="the move is made only from this version: a "
                                      "cleared or late run never moves production from anywhere else"),
                "to_version": Param("", type="string", maxLength=20, title="Version (rollback: previous-production; "
                                    "restore: the last governed version)"),
                "reason": Param("", type="string", maxLength=2000, title="Reason (rollback, restore)")},
    ) as registry:
        RegistryOperator(task_id="registry_action", specs=gov, retries=2)
    poll = min(s.spec.approval.alias_poll_seconds for s in gov)
    alarms = Asset(name="closedloop_registry_alarms", uri="closedloop://registry/alarms", group="governance",
                   watchers=[AssetWatcher(name="closedloop_alias_watch",
                                          trigger=AliasWatchTrigger(models=",".join(models), poll_interval=poll))])
    with DAG(
        dag_id=WATCH_DAG_ID,
        description="Alerts when production or candidate of a governed model moves outside the pipeline",
        doc_md="# Alias watch\n\nA watcher in the triggerer compares each governed model's `production` and "
               "`candidate` aliases with the last sealed promotion and release records every "
               f"{poll:g} s; an unexplained move starts this DAG, which checks again and alerts through the "
               "template's `alerts:`.",
        schedule=[alarms], start_date=None, catchup=False, max_active_runs=1,
        tags=["closedloop", "governance"],
    ) as watch:
        AliasAlarmOperator(task_id="alert", specs=gov, retries=1)
    from closedloop.operators.release import RELEASE_DAG_ID, ReleaseOperator

    productions = [Asset(name=u, uri=u, group="closedloop") for u in
                   (f"closedloop://models/{m}/production" for m in models)]
    schedule = productions[0]
    for more in productions[1:]:
        schedule = schedule | more
    with DAG(
        dag_id=RELEASE_DAG_ID,
        description="Example release process: verify each production version's release dossier, then deploy it",
        doc_md="# Release (example)\n\nRuns on every `production` asset event of a governed model. The event names "
               "the version's release dossier (URI and digest); this DAG verifies it with the deployment's pinned "
               "public keys — signature, every cited file, every sealed record — and only then deploys it (here: "
               "copies it to `$CLOSEDLOOP_HOME/deployed/<model>/v<version>`). A dossier that does not verify fails "
               "the run and nothing is deployed: anyone with role `op` can post an asset event.",
        schedule=schedule, start_date=None, catchup=False, max_active_runs=1,
        tags=["closedloop", "governance", "release"],
    ) as release:
        ReleaseOperator(task_id="verify_and_deploy", retries=0)
    return {REGISTRY_DAG_ID: registry, WATCH_DAG_ID: watch, RELEASE_DAG_ID: release,
            **build_recall_dag(specs, productions)}


def build_recall_dag(specs: list[LoadedSpec], productions: list) -> dict[str, DAG]:
    """``closedloop_recall``: a person opens, closes or re-starts the retrains of a recall; every
    ``production`` move of a governed model closes the recalls that are done."""
    from airflow.sdk import Param

    from closedloop.operators.recall import ACTIONS, RECALL_DAG_ID, RecallOperator

    schedule = None
    for asset in productions:
        schedule = asset if schedule is None else schedule | asset
    text = {"type": ["string", "null"], "maxLength": 200}
    with DAG(
        dag_id=RECALL_DAG_ID,
        description="Recall a bad data source, label policy or code version: hold what it touched, propose "
                    "a rollback, retrain without it, close when production is clean",
        doc_md=("# Recall\n\nTriggered by `closedloop recall open --source S [--window A..B] --reason …` "
                "(or `--label-policy NAME@VERSION`, `--code-digest HEX`, `--snapshot HEX`), `closedloop recall "
                "close ID` and `closedloop recall retrain ID` — or this form. The run records who asked; only the "
                "recall openers of every pipeline the recall touches may (`recall.openers`, default the approvers). "
                "Every affected model version gets a sealed hold: promote, rollback and restore refuse it and the "
                "alias watcher flags it in production. Each affected pipeline is retrained without the recalled "
                "input as an update request that goes through every gate and review. Runs on every `production` "
                "asset event too, and closes the recalls that are done."),
        schedule=schedule, start_date=None, catchup=False, max_active_runs=1,
        tags=["closedloop", "governance", "recall"],
        params={"action": Param("open", type="string", enum=list(ACTIONS), title="Action"),
                "source": Param(None, **text, title="Source (open)"),
                "window": Param(None, type=["string", "null"], pattern=r"^\d{4}-\d{2}-\d{2}\.\.\d{4}-\d{2}-\d{2}$",
                                title="Days of the source, FIRST..LAST (open; empty: all)"),
                "label_policy": Param(None, **text, title="Label policy NAME@VERSION (open)"),
                "code_digest": Param(None, **text, title="Code digest (open)"),
                "snapshot": Param(None, **text, title="Snapshot digest (open)"),
                "recall": Param(None, type=["string", "null"], pattern=r"^R-[0-9a-f]{10}$",
                                title="Recall id (close, retrain)"),
                "reason": Param("", type="string", maxLength=2000, title="Reason (open; close before it is done)")},
    ) as dag:
        RecallOperator(task_id="recall", specs=specs, retries=2)
    return {RECALL_DAG_ID: dag}


def held_back_dag(dag_id: str, error: SpecError) -> DAG:
    """What stands in for a pipeline whose template is broken: a DAG of the same id that says so
    (description, docs, tag ``template-error``) and whose one task fails with the error, instead of
    the pipeline silently going stale. Its runs do nothing else; fix the template and it is rebuilt."""
    from closedloop.operators.base import TemplateErrorOperator

    text = str(error)
    with DAG(
        dag_id=dag_id, schedule=None, start_date=None, catchup=False, max_active_runs=1,
        description=f"HELD BACK by a template error in {error.path or 'its template'}: fix it, nothing runs until then",
        doc_md="# Held back by a template error\n\nThis pipeline's template does not validate, so its DAG is "
               "not built; the other pipelines are not affected. The error (also Airflow's import error of "
               "`dags/closedloop_template_errors.py`, `closedloop pipelines validate` and the health page):\n\n"
               "```\n" + text + "\n```",
        tags=["closedloop", "template-error"],
    ) as dag:
        TemplateErrorOperator(task_id="template_error", message=text)
    return dag


def _build(pipelines_dir: str | Path) -> tuple[dict[str, DAG], list[SpecError]]:
    """Every DAG the templates define, and every template error (load, cross-checks, build). What
    failed to build is kept for :func:`template_errors` (:func:`_keep_build_errors`)."""
    fingerprint = _fingerprint(pipelines_dir)
    specs, errors = load_all(pipelines_dir)
    loaded_errors = len(errors)
    dags: dict[str, DAG] = {}
    routes = None
    for loaded in specs:
        try:
            built = {loaded.spec.name: build_dag(loaded)}
            if loaded.spec.incidents is not None:
                if routes is None:
                    from closedloop.spec.incident import routes_of

                    routes = routes_of(specs)
                built[loaded.spec.incident_dag_id] = build_incident_dag(loaded, routes)
            dags.update(built)
        except Exception as exc:  # one broken pipeline must not hide the others
            errors.append(SpecError(f"{loaded.path}: cannot build DAG: {type(exc).__name__}: {exc}",
                                    path=str(loaded.path)))
    try:
        dags.update(build_registry_dags(specs))
    except Exception as exc:  # the pipelines still load
        errors.append(SpecError(f"cannot build the registry DAGs: {type(exc).__name__}: {exc}"))
    _keep_build_errors(pipelines_dir, {s.path: s.digest for s in specs}, errors[loaded_errors:],
                       fingerprint=fingerprint, every=errors)
    return dags, errors


def _fingerprint(pipelines_dir: str | Path) -> str:
    """What a parse's verdict on the templates depends on, by name, time and size (no file is read):
    the templates, the suites and scenario sets beside them, and the code that validates and builds."""
    import hashlib

    folder = Path(pipelines_dir)
    here = Path(__file__).resolve().parent
    files = [*folder.glob("*.y*ml"), *(folder.parent / "expectations").glob("*"),
             *(folder.parent / "scenarios").glob("*"), *(here / "spec").glob("*.py"), here / "dagbuilder.py",
             here / "pipeline.py"]
    h = hashlib.sha256()
    for f in sorted(files):
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f}|{st.st_mtime_ns}|{st.st_size}\n".encode())
    return h.hexdigest()


def _build_errors_file(pipelines_dir: str | Path) -> Path:
    import hashlib

    from closedloop import settings

    key = hashlib.sha256(str(Path(pipelines_dir).resolve()).encode()).hexdigest()[:12]
    return settings.home() / "dag-processor" / f"build-errors-{key}.json"


def _keep_build_errors(pipelines_dir, digests: dict, errors: list[SpecError], *, fingerprint: str = "",
                       every: list[SpecError] = ()) -> None:
    """Record what failed to build, per template and its digest, for the errors file (which only loads
    and checks templates: building every DAG twice would double the parse time) — and every error of
    this parse with the folder's fingerprint, which the errors file takes as it is while nothing it
    depends on changed. Written only when it changes; never fails a parse."""
    found = {"templates": {str(p): {"digest": digests.get(Path(e.path)), "error": str(e)} for e in errors
                           if (p := e.path)}, "other": [str(e) for e in errors if not e.path],
             "fingerprint": fingerprint, "every": [[e.path, str(e)] for e in every]}
    path = _build_errors_file(pipelines_dir)
    try:
        text = json.dumps(found, sort_keys=True)
        if (path.read_text() if path.exists() else "") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{id(found)}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    except OSError as exc:
        log.warning("cannot keep the build errors for the template-errors DAG file: %s", exc)


def _kept_build_errors(pipelines_dir, specs: list[LoadedSpec]) -> list[SpecError]:
    """The build errors the pipelines' DAG file recorded, for templates that have not changed since."""
    path = _build_errors_file(pipelines_dir)
    try:
        found = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return []
    now = {str(s.path): s.digest for s in specs}
    out = [SpecError(e["error"], path=p) for p, e in (found.get("templates") or {}).items()
           if p in now and now[p] == e.get("digest")]
    return out + [SpecError(text) for text in found.get("other") or []]


def build_dags(pipelines_dir: str | Path, namespace: dict[str, Any] | None = None) -> dict[str, DAG]:
    """Build every template in ``pipelines_dir``; put the DAGs in ``namespace``.

    Never raises and never carries an error object: Airflow's DAG processor drops *every* DAG of a
    file that has an import error, so one broken template would hide every pipeline, the registry and
    its watcher. A broken template's DAGs are held back instead (:func:`held_back_dag`); its error is
    the import error of the other DAG file, ``dags/closedloop_template_errors.py``
    (:func:`raise_template_errors`), which builds no DAGs.
    """
    started = time.perf_counter()
    dags, errors = _build(pipelines_dir)
    for err in errors:
        log.error("%s", err)
        name, incidents = claimed_name(err.path)
        for dag_id in ([name, f"{name}_incident"] if incidents else [name]) if name else []:
            if dag_id not in dags:
                dags[dag_id] = held_back_dag(dag_id, err)
    if namespace is not None:
        namespace.update({f"dag_{name}": dag for name, dag in dags.items()})
    log.info("closedloop: built %d pipeline DAGs (%d template errors) in %.1f ms",
             len(dags), len(errors), (time.perf_counter() - started) * 1000)
    return dags


def template_errors(pipelines_dir: str | Path) -> list[SpecError]:
    """Every template error of the folder: what loading and checking the templates finds (cheap, done
    here), and what building their DAGs found, as the pipelines' DAG file recorded it on its last parse
    (for templates unchanged since)."""
    try:
        kept = json.loads(_build_errors_file(pipelines_dir).read_text())
    except (OSError, ValueError):
        kept = {}
    if kept.get("fingerprint") and kept["fingerprint"] == _fingerprint(pipelines_dir):
        return [SpecError(text, path=path) for path, text in kept.get("every") or []]  # nothing changed since
    specs, errors = load_all(pipelines_dir)
    return errors + _kept_build_errors(pipelines_dir, specs)


def raise_template_errors(pipelines_dir: str | Path) -> None:
    """Raise every template error as one :class:`SpecError` (the import error of the DAG file that
    calls it, which builds no DAGs: nothing else is hidden); return quietly when there is none."""
    errors = template_errors(pipelines_dir)
    if errors:
        raise SpecError("\n\n".join(str(e) for e in errors) + "\n\nOnly these templates are held back (their DAGs "
                        "say so); every other pipeline, the registry and its watcher are running. Run `closedloop "
                        "pipelines validate` to check templates before deploying.")

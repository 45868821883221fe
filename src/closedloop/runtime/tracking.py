"""MLflow bookkeeping shared by the steps: one experiment per pipeline, one parent run per
pipeline run, one child run per step — each found again (never duplicated) on a retry."""

from __future__ import annotations

import json
import logging

from closedloop import settings, vocab
from closedloop.runtime.context import RunContext, code_version
from closedloop.runtime.identity import git_commit
from closedloop.spec import LoadedSpec

log = logging.getLogger(__name__)

TAG = vocab.NAMESPACE
RESULT_TAG = vocab.RESULT


_READY: set[str] = set()


def ensure_store(uri: str) -> None:
    """Create a local SQLite store's tables once, under a file lock.

    MLflow creates and migrates a SQLite store on first use; several task processes doing that
    at once corrupt it ("duplicate column", "table _alembic_tmp_… already exists"). The lock
    makes the first use sequential; afterwards it costs nothing.
    """
    if uri in _READY:
        return
    if uri.startswith("sqlite:///"):
        import fcntl
        from pathlib import Path

        from mlflow import MlflowClient

        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{db}.init.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _READY.add(uri)


def not_found(exc: BaseException) -> bool:
    """Did MLflow answer "no such thing" (model, version, alias, run — or an id that cannot exist)?
    The one place that decides it."""
    text = str(exc)
    return (getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
            or "RESOURCE_DOES_NOT_EXIST" in text or "INVALID_PARAMETER_VALUE" in text or "not found" in text.lower())


def alias_version(client, model: str, alias: str) -> str | None:
    """The version ``model@alias`` points at (None: no such model or alias)."""
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except Exception as exc:
        if not_found(exc):
            return None
        raise


def mlflow_client(tracking_uri: str | None = None):
    """The one MLflow client factory: the given store (default: this process's), its tables made
    once under a lock (:func:`ensure_store`). Credentials come from the environment MLflow reads."""
    from mlflow import MlflowClient

    uri = tracking_uri or settings.tracking_uri()
    ensure_store(uri)
    return MlflowClient(tracking_uri=uri)


def pages(search) -> list:
    """Every result of an MLflow search, page by page (``search(page_token)`` returns one page)."""
    out, token = [], None
    while True:
        page = search(token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def literal(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter, whatever it holds.

    MLflow's filter parser has no escape character: a value is taken verbatim between single or
    double quotes. So a value is quoted with the quote it does not contain; one that holds both
    (or a control character) cannot be searched for and is refused, never spliced.

    :raises ValueError: naming the value.
    """
    value = str(value)
    if any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{value!r}: a control character cannot be searched for in MLflow")
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both kinds of quote; MLflow's search cannot express it")


def client(ctx: RunContext):
    """The step's client; also points MLflow's fluent API (``mlflow.register_model``…) at the same store."""
    import mlflow

    c = mlflow_client(ctx.tracking_uri)
    mlflow.set_tracking_uri(ctx.tracking_uri)
    return c


def experiment_id(ctx: RunContext) -> str:
    c = client(ctx)
    name = vocab.experiment_name(ctx.pipeline)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=settings.artifact_root(ctx.tracking_uri),
                                   tags={vocab.PIPELINE: ctx.pipeline})
    except Exception:  # created concurrently by another task
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def lineage_tags(loaded: LoadedSpec, ctx: RunContext, **extra: str | None) -> dict[str, str]:
    """The tags every run and model version carries."""
    tags = {
        vocab.PIPELINE: loaded.spec.name,
        vocab.TEMPLATE: str(loaded.path.name),
        vocab.TEMPLATE_HASH: loaded.digest,
        vocab.LABEL_POLICY: loaded.spec.label_policy.ref,
        vocab.CODE_VERSION: code_version(),
        **({vocab.GIT_COMMIT: commit} if (commit := git_commit()) else {}),
        vocab.RUN_KEY: ctx.run_key,
        vocab.AIRFLOW_DAG_ID: ctx.dag_id,
        vocab.AIRFLOW_RUN_ID: ctx.run_id,
        vocab.AIRFLOW_TASK_ID: ctx.task_id,
        vocab.AIRFLOW_TRY_NUMBER: str(ctx.try_number),
        **ctx.origin,
    }
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


def _find(ctx: RunContext, exp_id: str, step: str, key: str | None = None):
    """The step's run in this pipeline run (with ``key``: the one for these exact inputs)."""
    extra = f" and tags.`{vocab.CACHE_KEY}` = {literal(key)}" if key else ""
    runs = client(ctx).search_runs(
        [exp_id],
        filter_string=f"tags.`{vocab.RUN_KEY}` = {literal(ctx.run_key)} and tags.`{vocab.STEP}` = {literal(step)}{extra}",
        max_results=5, order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def step_run(loaded: LoadedSpec, ctx: RunContext, step: str, *, step_tags: dict[str, str] | None = None,
             **extra: str | None):
    """Get or create the MLflow run of ``step`` in this pipeline run (child of the pipeline run).

    ``extra`` tags go on the step run and the pipeline run, ``step_tags`` on the step run only.

    :return: the ``mlflow.entities.Run``. If it finished earlier (a retry or a cleared task),
        its recorded result is available through :func:`finished_result`.
    """
    c = client(ctx)
    exp_id = experiment_id(ctx)
    parent = _find(ctx, exp_id, "pipeline")
    if parent is None:
        parent = c.create_run(exp_id, run_name=f"{ctx.pipeline} {ctx.run_id}",
                              tags={**lineage_tags(loaded, ctx, **extra), vocab.STEP: "pipeline"})
    else:
        for k, v in extra.items():
            if v is not None and parent.data.tags.get(k) != str(v):
                c.set_tag(parent.info.run_id, k, str(v))
    # a step cleared after its inputs changed (new cache key) gets a new run; a retry finds its own
    run = _find(ctx, exp_id, step, (step_tags or {}).get(vocab.CACHE_KEY))
    tags = {**lineage_tags(loaded, ctx, **extra), vocab.STEP: step,
            "mlflow.parentRunId": parent.info.run_id, **(step_tags or {})}
    if run is None:
        run = c.create_run(exp_id, run_name=step, tags=tags)
        from closedloop.runtime.faults import strike

        strike(ctx, "run_created")
    else:
        for k in (vocab.AIRFLOW_TASK_ID, vocab.AIRFLOW_TRY_NUMBER, *(step_tags or {})):
            if run.data.tags.get(k) != tags[k]:
                c.set_tag(run.info.run_id, k, tags[k])
    return run


def finished_result(run) -> dict | None:
    """The result a FINISHED step run recorded, or None if the step has to (re)do its work."""
    if run.info.status == "FINISHED" and RESULT_TAG in run.data.tags:
        return json.loads(run.data.tags[RESULT_TAG])
    return None


def finish(ctx: RunContext, run_id: str, result: dict) -> dict:
    """Record the step's result on its run and mark it FINISHED (the idempotency marker)."""
    from closedloop.runtime.faults import strike

    strike(ctx, "before_finish")
    c = client(ctx)
    c.set_tag(run_id, RESULT_TAG, json.dumps(result, sort_keys=True, default=str))
    c.set_terminated(run_id, "FINISHED")
    return result


def fail(ctx: RunContext, run_id: str) -> None:
    try:
        client(ctx).set_terminated(run_id, "FAILED")
    except Exception:  # best effort: the original error matters more
        log.warning("could not mark MLflow run %s as failed", run_id, exc_info=True)


def log_dataset_input(ctx: RunContext, run_id: str, frame, ref: dict, *, context: str, name: str,
                      targets: str | None = None) -> None:
    """Log a snapshot as an MLflow dataset input, keyed by our content digest (MLflow keeps at most 36
    characters of a dataset digest: the first 32 hex digits; the full sha256 is in the source URI
    and in an input tag)."""
    import mlflow
    from mlflow.entities import InputTag

    dataset = mlflow.data.from_pandas(frame, source=ref["uri"], name=name, digest=ref["digest"][:32],
                                      targets=targets)
    client(ctx).log_inputs(run_id, datasets=[mlflow.entities.DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag(key="mlflow.data.context", value=context),
                                           InputTag(key=vocab.DATASET_INPUT_SHA256, value=ref["digest"])])])


def metric_entities(metrics: dict[str, float]):
    """MLflow ``Metric`` entities for one ``log_batch`` call (all at step 0, now)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key=k, value=float(v), timestamp=now, step=0) for k, v in metrics.items()]


def link_rerun(loaded: LoadedSpec, ctx: RunContext, *, of: str) -> None:
    """Record on the original pipeline run that ``ctx``'s run reruns it (``closedloop.reruns``);
    the rerun's own runs carry ``closedloop.rerun_of`` through the lineage tags."""
    c = client(ctx)
    original = _find(ctx.for_key(of), experiment_id(ctx), "pipeline")
    if original is None:
        log.warning("rerun of %s: its MLflow pipeline run is not in this store; linking one way only", of)
        return
    known = [k for k in original.data.tags.get(vocab.RERUNS, "").split(",") if k]
    if ctx.run_key not in known:
        c.set_tag(original.info.run_id, vocab.RERUNS, ",".join([*known, ctx.run_key])[:5000])

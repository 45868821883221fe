"""The step cache: reuse the result of an earlier finished step whose inputs were identical.

A step's **cache key** is a sha256 over what decides its result: the step, its code identity (the
content of the code it executes, its entry point's package, the computing libraries' versions and
a pod's image: :mod:`closedloop.runtime.identity`), its own template section, the content digests
it reads, and the cache keys of the steps before it (so a change anywhere upstream misses
everything downstream, like Kubeflow's and Flyte's caches). The key is tagged on the step's MLflow
run (``closedloop.cache_key``, with ``closedloop.code_digest``). Looking a key up is one indexed tag
query for a FINISHED run of the same step in the pipeline's experiment, younger than
``reliability.cache_ttl_days``.

On a hit the step still gets its own MLflow run in this pipeline run — tagged
``closedloop.cache=hit`` with the source run, carrying the source's params and metrics — so
lineage, gates and registration read this run exactly as if the work had been done; the
expensive part (generation, labelling, validation, training, evaluation, simulation) is skipped
and the task log says ``cache hit``. Gates, registration, review and promotion never come
from the cache: they judge and record this run.

Switches: ``reliability.cache`` and ``reliability.steps.<step>.cache`` in the template, and per
run the conf key ``closedloop_cache: false`` (``closedloop rerun --no-cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from closedloop import vocab
from closedloop.runtime import identity, tracking
from closedloop.runtime.context import RunContext
from closedloop.spec import LoadedSpec

log = logging.getLogger(__name__)

KEY_TAG = vocab.CACHE_KEY
STATE_TAG = vocab.CACHE  # hit | miss | off


def key_of(loaded: LoadedSpec, step: str, **inputs: Any) -> str:
    """The content address of one step execution: its code identity and its ``inputs``."""
    payload = {"step": step, "code": identity.of_step(loaded, step)["digest"], **inputs}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def enabled(loaded: LoadedSpec, ctx: RunContext, step: str) -> bool:
    return ctx.use_cache and loaded.spec.reliability.caches(step)


def lookup(loaded: LoadedSpec, ctx: RunContext, step: str, key: str,
           valid: Callable[[dict], bool] | None = None):
    """The newest FINISHED run of ``step`` with ``key`` from another pipeline run, or None."""
    import time

    c = tracking.client(ctx)
    ttl = loaded.spec.reliability.cache_ttl_days
    since = f" and attributes.start_time > {int((time.time() - ttl * 86_400) * 1000)}" if ttl else ""
    runs = c.search_runs(
        [tracking.experiment_id(ctx)],
        filter_string=(f"tags.`{KEY_TAG}` = {tracking.literal(key)} and tags.`{vocab.STEP}` = "
                       f"{tracking.literal(step)} and attributes.status = 'FINISHED'{since}"),
        max_results=10, order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.data.tags.get(vocab.RUN_KEY) == ctx.run_key:
            continue
        result = tracking.finished_result(run)
        if result is None:
            continue
        if valid is not None and not valid(result):
            log.info("cache: %s run %s has key %s but its output is gone; not reusing it", step, run.info.run_id, key)
            continue
        return run
    return None


def reuse(loaded: LoadedSpec, ctx: RunContext, step: str, key: str, *, tags: dict[str, str | None] | None = None,
          valid: Callable[[dict], bool] | None = None, step_tags: dict[str, str] | None = None) -> tuple[Any, dict | None]:
    """Get this pipeline run's ``step`` run; return ``(run, result)`` where ``result`` is what the
    step finished with earlier in this run (a retry), or a cache hit it just recorded, or None (do
    the work, then :func:`tracking.finish`)."""
    run = tracking.step_run(loaded, ctx, step, step_tags={KEY_TAG: key, **(step_tags or {}),
                            vocab.CODE_DIGEST: identity.of_step(loaded, step)["digest"]}, **(tags or {}))
    done = tracking.finished_result(run)
    if done is not None:
        log.info("%s already finished in this pipeline run (MLflow run %s): returning its result, doing nothing "
                 "again", step, run.info.run_id)
        return run, done
    c = tracking.client(ctx)
    if not enabled(loaded, ctx, step):
        c.set_tag(run.info.run_id, STATE_TAG, "off")
        log.info("cache off for %s (key %s)", step, key)
        return run, None
    source = lookup(loaded, ctx, step, key, valid)
    if source is None:
        c.set_tag(run.info.run_id, STATE_TAG, "miss")
        log.info("cache miss for %s (key %s): running it", step, key)
        return run, None
    result = tracking.finished_result(source)
    if "run_id" in result:
        result["run_id"] = run.info.run_id
    if "created" in result:
        result["created"] = False  # this run wrote nothing
    result["cache"] = {"hit": True, "key": key, "source_run_id": source.info.run_id,
                       "source_run_key": source.data.tags.get(vocab.RUN_KEY)}
    from mlflow.entities import Param, RunTag

    tags = {STATE_TAG: "hit", vocab.CACHE_SOURCE_RUN_ID: source.info.run_id,
            vocab.CACHE_SOURCE_RUN_KEY: result["cache"]["source_run_key"] or "",
            **{t: source.data.tags[t] for t in (vocab.MODEL_URI,) if t in source.data.tags}}
    c.log_batch(run.info.run_id, metrics=tracking.metric_entities(dict(source.data.metrics)),  # one call, not five
                params=[Param(k, v) for k, v in source.data.params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()])
    log.info("cache hit for %s (key %s): reusing the result of MLflow run %s (pipeline run %s); nothing recomputed",
             step, key, source.info.run_id, result["cache"]["source_run_key"])
    return run, tracking.finish(ctx, run.info.run_id, result)


def run_cached(loaded: LoadedSpec, ctx: RunContext, step: str, key: str, compute: Callable[[Any], dict], *,
               tags: dict[str, str | None] | None = None, valid: Callable[[dict], bool] | None = None) -> dict:
    """Run ``compute(mlflow_run)`` unless this run already did or the cache has the answer; record
    the result (with its cache key) as the step run's result."""
    run, result = reuse(loaded, ctx, step, key, tags=tags, valid=valid)
    if result is not None:
        return result
    try:
        out = compute(run)
        return tracking.finish(ctx, run.info.run_id, {**out, "cache_key": key, "cache": {"hit": False, "key": key},
                                                      "code_digest": identity.of_step(loaded, step)["digest"]})
    except BaseException:
        tracking.fail(ctx, run.info.run_id)
        raise


def snapshot_exists(result: dict) -> bool:
    """A cached snapshot is only reusable while its file is there, byte for byte as it was written."""
    from closedloop.runtime.storage import intact

    return intact(result["uri"], result["digest"])


PLAN_KEY = vocab.XCOM_CACHE_PLAN
"""XCom key (on ``generate_dataset``) of the results :func:`closedloop.runtime.plan.plan_ahead` found in the cache."""

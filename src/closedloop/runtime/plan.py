"""The cache plan: after ``generate_dataset`` was answered from the step cache (or a pinned
snapshot), follow the step table's cacheable steps (:data:`closedloop.pipeline.PLANNED`) in order.

Each step names in the table the function that computes its cache key and tags from the results
found so far (``plan`` column). Each hit is recorded in its own MLflow step run; the chain stops at
the first miss or switched-off step. The later tasks find their result here (XCom) and return it
without importing MLflow, which is most of what a task costs once its work is cached.
"""

from __future__ import annotations

import logging

from closedloop import pipeline
from closedloop.runtime.cache import enabled, reuse
from closedloop.runtime.context import RunContext, resolve
from closedloop.spec import LoadedSpec

log = logging.getLogger(__name__)


def plan_ahead(loaded: LoadedSpec, ctx: RunContext, raw: dict) -> dict[str, dict]:
    """The results of the later cacheable steps the cache already holds for this run's inputs."""
    found: dict[str, dict] = {}
    results = {pipeline.CACHEABLE[0]: raw}
    for step_id in pipeline.PLANNED:
        if not enabled(loaded, ctx, step_id):
            break
        key, tags, valid = resolve(pipeline.step(step_id).plan)(loaded, ctx, results)
        if key is None:  # a step that looks itself up (each shard of a sharded simulation)
            break
        result = reuse(loaded, ctx.for_task(step_id), step_id, key, tags=tags, valid=valid)[1]
        if result is None or not (result.get("cache") or {}).get("hit"):
            break
        found[step_id] = results[step_id] = result
    if found:
        log.info("cache: %s answered from the step cache ahead of time (their tasks will only read the result)",
                 ", ".join(found))
    return found

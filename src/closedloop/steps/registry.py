"""Step ``register_candidate``: one model version per pipeline run, aliased ``candidate``."""

from __future__ import annotations

import logging

from closedloop.errors import PermanentError
from closedloop.spec import LoadedSpec
from closedloop.steps import tracking
from closedloop.steps.context import RunContext

log = logging.getLogger(__name__)

CANDIDATE = "candidate"


def find_version(ctx: RunContext, model_name: str):
    """The version this pipeline run registered earlier, if any (so a retry registers nothing new)."""
    c = tracking.client(ctx)
    try:
        found = c.search_model_versions(
            f"name = '{model_name}' and tags.`closedloop.run_key` = '{ctx.run_key}'")
    except Exception as exc:  # the registered model does not exist yet
        if "RESOURCE_DOES_NOT_EXIST" in str(exc):
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def register_candidate(loaded: LoadedSpec, ctx: RunContext, *, trained: dict, labelled: dict,
                       gate: dict, request: dict | None = None, requester: str | None = None) -> dict:
    """Register the trained model (once) with its lineage and point the ``candidate`` alias at it.

    Refuses a model whose gates did not pass: the check lives here, not only in the DAG wiring.
    """
    import mlflow

    if not gate.get("passed"):
        raise PermanentError("refusing to register a candidate whose release gates did not pass")
    spec = loaded.spec
    c = tracking.client(ctx)
    version = find_version(ctx, spec.model.name)
    if version is None:
        tags = tracking.lineage_tags(loaded, ctx, **{
            "closedloop.dataset_version": labelled["digest"],
            "closedloop.raw_dataset_version": labelled.get("raw_digest"),
            "closedloop.training_run_id": trained["run_id"],
            "closedloop.dataset.sources": trained.get("sources"),
            "closedloop.gate_run_id": gate["run_id"],
            "closedloop.gates": "passed",
            "closedloop.request.requester": requester or "scheduler",
            **{f"closedloop.request.{k}": (", ".join(v) if isinstance(v, list) else str(v))
               for k, v in (request or {}).items()},
        })
        if not c.search_registered_models(f"name = '{spec.model.name}'"):
            try:
                c.create_registered_model(spec.model.name, description=spec.model.description or None,
                                          tags={"closedloop.pipeline": spec.name})
            except Exception as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                    raise
        version = mlflow.register_model(trained["model_uri"], spec.model.name, tags=tags)
        purpose = (request or {}).get("purpose")
        c.update_model_version(spec.model.name, version.version, description=(
            (f"Request by {requester or 'scheduler'}: {purpose}\n\n" if purpose else "")
            + f"Release candidate from pipeline {spec.name} run {ctx.run_id}; dataset {labelled['digest']}, "
            f"label policy {spec.label_policy.ref}, template {loaded.path.name}@{loaded.digest}."))
        log.info("registered %s version %s", spec.model.name, version.version)
    else:
        log.info("%s version %s was already registered by this run: reusing it", spec.model.name, version.version)
    c.set_registered_model_alias(spec.model.name, CANDIDATE, version.version)
    return {"model": spec.model.name, "version": str(version.version), "alias": CANDIDATE,
            "model_uri": f"models:/{spec.model.name}/{version.version}"}

"""Step ``register_candidate``: one model version per pipeline run, aliased ``candidate``."""

from __future__ import annotations

import json
import logging

from closedloop import vocab
from closedloop.errors import PermanentError
from closedloop.runtime import tracking
from closedloop.runtime.context import RunContext
from closedloop.runtime.faults import strike
from closedloop.spec import LoadedSpec

log = logging.getLogger(__name__)

CANDIDATE = vocab.CANDIDATE


def find_version(ctx: RunContext, model_name: str, model_uri: str | None = None):
    """The version this pipeline run registered earlier, if any (so a retry registers nothing new).

    Tags are anybody's to write in MLflow: with ``model_uri``, a version that carries this run's
    key but not this run's model (registered out of band and tagged to look like ours) is ignored.
    """
    c = tracking.client(ctx)
    try:
        found = c.search_model_versions(
            f"name = {tracking.literal(model_name)} and tags.`{vocab.RUN_KEY}` = {tracking.literal(ctx.run_key)}")
    except Exception as exc:  # the registered model does not exist yet
        if tracking.not_found(exc):
            return None
        raise
    if model_uri is not None:
        for v in found:
            if v.source != model_uri:
                log.warning("%s version %s carries this run's key but its source %s is not this run's model %s: "
                            "ignored (registered out of band?)", model_name, v.version, v.source, model_uri)
        found = [v for v in found if v.source == model_uri]
    return min(found, key=lambda v: int(v.version)) if found else None


#: files MLflow itself adds to a model's folder when it is registered or downloaded
_NOT_CONTENT = frozenset({"registered_model_meta"})


def artifact_digest(model_uri: str, tracking_uri: str | None = None) -> str:
    """``sha256:<hex>`` over the files a deployment would load for ``model_uri`` (paths and contents)."""
    import hashlib
    import os
    import tempfile
    from pathlib import Path

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in task logs
    location = model_uri
    name, _, version = model_uri.removeprefix("models:/").rpartition("/")
    if model_uri.startswith("models:/") and name and version.isdigit():  # where the registry says the files are
        location = tracking.mlflow_client(tracking_uri).get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                         tracking_uri=tracking_uri))
        h = hashlib.sha256()
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name not in _NOT_CONTENT)
        if not files:
            raise PermanentError(f"model {model_uri} has no files")
        for path in files:
            h.update(path.relative_to(local).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def register_candidate(loaded: LoadedSpec, ctx: RunContext, *, trained: dict, labelled: dict,
                       gate: dict, request: dict | None = None, requester: str | None = None,
                       keep=None, verifier=None) -> dict:
    """Register the trained model (once) with its lineage and point the ``candidate`` alias at it.

    Refuses a model whose gates did not pass: the check lives here, not only in the DAG wiring.

    :param keep: called with the release record before the alias moves (the operator seals it and
        keeps it on the version), so the alias never points at a version without its record.
    :param verifier: the deployment's public keys: a version a recall holds is refused here (never candidate).
    """
    import mlflow

    if not gate.get("passed"):
        raise PermanentError("refusing to register a candidate whose release gates did not pass")
    spec = loaded.spec
    c = tracking.client(ctx)
    version = find_version(ctx, spec.model.name, trained["model_uri"])
    if version is None:
        from closedloop.steps.recall import months_tag

        tags = tracking.lineage_tags(loaded, ctx, **{
            vocab.DATASET_VERSION: labelled["digest"],
            vocab.RAW_DATASET_VERSION: labelled.get("raw_digest"),
            vocab.TRAINING_RUN_ID: trained["run_id"],
            vocab.CODE_DIGEST: trained.get("code_digest"),  # the code that trained it (its identity)
            vocab.DATASET_SOURCES: trained.get("sources"),
            vocab.DATASET_WINDOW: "..".join(trained["window"]) if all(trained.get("window") or [None]) else None,
            vocab.DATASET_MONTHS: months_tag(*trained["window"]) if all(trained.get("window") or [None]) else None,
            vocab.DATASET_EXCLUDED: json.dumps(trained["excluded"], sort_keys=True) if trained.get("excluded")
            else None,
            vocab.GATE_RUN_ID: gate["run_id"],
            vocab.GATES: "passed",
            vocab.REQUEST_REQUESTER: requester or "scheduler",
            **{vocab.REQUEST_PREFIX + k: (", ".join(v) if isinstance(v, list) else str(v))
               for k, v in (request or {}).items()},
        })
        if not c.search_registered_models(f"name = '{spec.model.name}'"):
            try:
                c.create_registered_model(spec.model.name, description=spec.model.description or None,
                                          tags={vocab.PIPELINE: spec.name})
            except Exception as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                    raise
        version = mlflow.register_model(trained["model_uri"], spec.model.name, tags=tags)
        log.info("registered %s version %s", spec.model.name, version.version)
    else:
        log.info("%s version %s was already registered by this run: reusing it", spec.model.name, version.version)
    strike(ctx, "version_registered")
    from closedloop.steps import cards

    cards.describe(c, spec.model.name, str(version.version))  # the model card; also when a dead try left it bare
    cards.log_review_card(c, spec.model.name, str(version.version))
    strike(ctx, "version_described")
    record = release_record(loaded, ctx, version, trained=trained, labelled=labelled, gate=gate, requester=requester)
    if keep is not None:
        record = keep(record)
        if verifier is not None:  # a recall opened while this run trained: the version stays, never candidate
            from closedloop.steps.recall import refuse_if_held

            try:
                refuse_if_held(c, spec.model.name, str(version.version), verifier, what="make candidate")
            except Exception as exc:
                raise PermanentError(str(exc)) from None
    strike(ctx, "record_sealed")
    c.set_registered_model_alias(spec.model.name, CANDIDATE, version.version)
    strike(ctx, "alias_moved")
    cards.describe(c, spec.model.name, str(version.version))  # now it says it is the candidate
    return record


def release_record(loaded: LoadedSpec, ctx: RunContext, version, *, trained: dict, labelled: dict, gate: dict,
                   requester: str | None) -> dict:
    """What the release decision is about, re-derived from the registry: the exact version, what it
    loads (artifact digest), what judged it (gate report digest) and where it came from. The
    operator seals it; the reviewer approves its digest; ``promote`` believes nothing else."""
    from datetime import UTC, datetime

    from closedloop.runtime.signing import digest

    spec = loaded.spec
    uri = f"models:/{spec.model.name}/{version.version}"
    return {
        "kind": "release_record", "model": spec.model.name, "version": str(version.version), "alias": CANDIDATE,
        "model_uri": uri, "source": version.source, "source_run_id": version.run_id,
        "training_run_id": trained["run_id"], "artifact_digest": artifact_digest(uri, ctx.tracking_uri),
        "gates_passed": True, "gate_run_id": gate["run_id"], "gate_report_digest": digest(gate["report"]),
        "gate_summary": [{"metric": r["metric"], "value": r["value"], "passed": r["passed"]} for r in gate["report"]],
        "pipeline": spec.name, "template": loaded.path.name, "template_hash": loaded.digest,
        "dataset_digest": labelled["digest"], "raw_dataset_digest": labelled.get("raw_digest"),
        "label_policy": spec.label_policy.ref, "dag_id": ctx.dag_id, "run_id": ctx.run_id,
        # what a recall matches (closedloop.steps.recall): sealed here, so editing a tag hides nothing
        "sources": [s for s in str(trained.get("sources") or "").split(",") if s],
        "window": trained.get("window") if all(trained.get("window") or [None]) else None,
        "excluded": trained.get("excluded") or [], "code_digest": trained.get("code_digest"),
        "requester": requester or "scheduler",
        "registered_at": datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).isoformat(),
    }

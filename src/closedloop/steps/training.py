"""Step ``train``: fit the template's trainer on the labelled snapshot and log the model."""

from __future__ import annotations

import hashlib
import logging

from closedloop import vocab
from closedloop.runtime import tracking
from closedloop.runtime.context import RunContext, resolve
from closedloop.runtime.storage import read_snapshot
from closedloop.spec import LoadedSpec
from closedloop.steps import models

log = logging.getLogger(__name__)

#: Explicit requirements: MLflow's pip-requirement inference costs seconds per model and
#: guesses; the environment that trains is the environment that serves, so say it directly.
def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"scikit-learn=={version('scikit-learn')}", f"pandas=={version('pandas')}",
            f"numpy=={version('numpy')}"]


def split(frame, test_fraction: float, group: str = "episode_id"):
    """Deterministic train/test split by whole episodes (no leakage between time steps)."""
    if group not in frame:
        group = frame.columns[0]
    keys = frame[group].astype(str)
    buckets = {k: int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) % 1000 for k in keys.unique()}
    is_test = keys.map(buckets) < int(test_fraction * 1000)
    return frame[~is_test], frame[is_test]


def dataset_tags(raw: dict | None, labelled: dict, validation: dict | None) -> dict[str, str]:
    """Searchable lineage of the data a model learns from (``closedloop trace`` and ``impact`` read them)."""
    import json

    tags = {vocab.DATASET_VERSION: labelled["digest"]}
    if raw:
        tags.update({
            vocab.RAW_DATASET_VERSION: raw["digest"],
            vocab.DATASET_SOURCES: "," + ",".join(raw.get("sources") or []) + ",",  # ",a,b,": exact LIKE
            vocab.DATASET_WINDOW: f"{raw.get('window_start')}..{raw.get('window_end')}",
        })
        if raw.get("window_start") and raw.get("window_end"):
            from closedloop.steps.recall import months_tag

            tags[vocab.DATASET_MONTHS] = months_tag(raw["window_start"], raw["window_end"])
        if raw.get("excluded"):
            tags[vocab.DATASET_EXCLUDED] = json.dumps(raw["excluded"], sort_keys=True)
    manifest = {
        "raw": {k: raw.get(k) for k in ("uri", "digest", "rows", "sources", "scenarios", "window_start",
                                        "window_end", "focus", "rows_per_scenario", "excluded")} if raw else None,
        "labelled": {k: labelled.get(k) for k in ("uri", "digest", "rows", "label_policy", "raw_digest")},
        "validation": {k: validation.get(k) for k in ("suite", "success", "evaluated", "failed", "data_docs")}
        if validation else None,
    }
    tags[vocab.DATASET_MANIFEST] = json.dumps(manifest, sort_keys=True, default=str)
    return tags


def train(loaded: LoadedSpec, ctx: RunContext, *, labelled: dict, validation: dict | None = None,
          raw: dict | None = None) -> dict:
    """Train once per pipeline run; a retry after success returns the recorded result, a retry
    after a crash that had already logged the model reuses that model, and a run whose inputs
    match an earlier finished training reuses its model (the step cache).

    :param raw: the ``generate_dataset`` result (sources, window, sampling) for the lineage tags.
    :return: ``{run_id, model_uri, train_rows, test_rows, dataset_digest, cache_key}``.
    """
    from closedloop.runtime.cache import run_cached

    return run_cached(loaded, ctx, "train", train_key(loaded, labelled, validation),
                      lambda run: _fit(loaded, ctx, run, labelled, raw), tags=dataset_tags(raw, labelled, validation))


def logged_model(client, run) -> str | None:
    """The model an earlier try of this run logged completely (status READY) before it died, if any."""
    found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run.info.run_id}'", max_results=10)
    ready = [m for m in found if str(getattr(m.status, "name", m.status)).upper().endswith("READY")]
    return ready[0].model_uri if ready else None


def plan(loaded: LoadedSpec, ctx, results: dict):
    """The step table's cache-plan entry of ``train``."""
    raw, labelled, validation = results["generate_dataset"], results["label"], results["validate_data"]
    return train_key(loaded, labelled, validation), dataset_tags(raw, labelled, validation), None


def train_key(loaded: LoadedSpec, labelled: dict, validation: dict | None) -> str:
    """Cache key of ``train``: the labelled snapshot (validated) and the training section."""
    from closedloop.runtime.cache import key_of

    return key_of(loaded, "train", dataset=labelled["digest"], training=loaded.spec.training.model_dump(mode="json"),
                  upstream=(validation or {}).get("cache_key") or labelled.get("cache_key"))


def _fit(loaded: LoadedSpec, ctx: RunContext, run, labelled: dict, raw: dict | None) -> dict:
    import mlflow

    from closedloop.runtime.faults import strike

    spec = loaded.spec
    run_id = run.info.run_id
    frame = read_snapshot(labelled["uri"], labelled["digest"])
    train_df, test_df = split(frame, spec.training.test_fraction)
    client = tracking.client(ctx)
    model_uri = run.data.tags.get(vocab.MODEL_URI) or logged_model(client, run)
    if model_uri:  # an earlier try logged the model, then died before finishing: keep that model
        log.info("train: model %s was logged by an earlier try of this run; reusing it, not training again", model_uri)
    else:
        trainer = resolve(spec.training.entry_point)
        model = trainer(train_df, target=spec.training.target, **spec.training.hyperparameters)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_params({**spec.training.hyperparameters, "test_fraction": spec.training.test_fraction,
                               "trainer": spec.training.entry_point, "train_rows": len(train_df)})
            tracking.log_dataset_input(ctx, run_id, train_df, labelled, context="training",
                                       name=f"{spec.name}-labelled", targets=spec.training.target)
            info = models.log_model(model, trainer=trainer, pip_requirements=pip_requirements())
        model_uri = info.model_uri
    strike(ctx, "before_checkpoint")
    client.set_tag(run_id, vocab.MODEL_URI, model_uri)  # the checkpoint: the model is complete
    strike(ctx, "model_logged")
    return {"run_id": run_id, "model_uri": model_uri, "train_rows": int(len(train_df)),
            "test_rows": int(len(test_df)), "dataset_digest": labelled["digest"],
            "sources": "," + ",".join((raw or {}).get("sources") or []) + ",",
            "window": [(raw or {}).get("window_start"), (raw or {}).get("window_end")],
            "excluded": (raw or {}).get("excluded") or []}

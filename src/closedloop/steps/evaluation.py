"""Step ``offline_eval``: metrics of the trained model on the held-out episodes, per group."""

from __future__ import annotations

from closedloop import vocab
from closedloop.runtime import tracking
from closedloop.runtime.context import RunContext
from closedloop.runtime.storage import read_snapshot
from closedloop.spec import LoadedSpec
from closedloop.steps.models import load_model
from closedloop.steps.training import split


def offline_metrics(y_true, y_pred, names: list[str]) -> dict[str, float]:
    import numpy as np

    err = np.asarray(y_pred, dtype=float) - np.asarray(y_true, dtype=float)
    every = {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
             "max_abs_error": float(np.max(np.abs(err))), "bias": float(np.mean(err))}
    return {n: round(every[n], 5) for n in names}


def predict(model, frame):
    cols = getattr(model, "feature_names_in_", None)
    return model.predict(frame[list(cols)] if cols is not None else frame)


LEAK_METRIC = f"{vocab.OFFLINE}leaked_episodes"
"""Episodes of the test split that are also in training — by id, or as near-duplicates: a gate ``max: 0`` on it
stops a model judged on data it learnt from (ISO/PAS 8800: independence of training and test data)."""


def independence(frame, test_fraction: float) -> dict:
    """Train/test independence of a labelled snapshot, split as training splits it: episodes in both, and
    near-duplicate episodes (the same feature rows, rounded to 3 decimals) across the two sides."""
    import hashlib

    train, test = split(frame, test_fraction)
    features = [c for c in ("ego_speed", "lead_speed", "gap", "rel_speed", "lead_accel") if c in frame]

    def fingerprints(part) -> set[str]:
        if "episode_id" not in part or not features:
            return set()
        rounded = part[["episode_id", *features]].round(3)
        return {hashlib.sha256(g[features].to_csv(index=False).encode()).hexdigest()
                for _, g in rounded.groupby("episode_id")}

    has_ids = "episode_id" in frame
    both = set(train["episode_id"]) & set(test["episode_id"]) if has_ids else set()
    near = fingerprints(train) & fingerprints(test)
    return {"train_rows": int(len(train)), "test_rows": int(len(test)),
            "train_episodes": int(train["episode_id"].nunique()) if has_ids else None,
            "test_episodes": int(test["episode_id"].nunique()) if has_ids else None,
            "episodes_in_both": len(both), "near_duplicates": len(near),
            "independent": not both and not near,
            "method": "split by whole episodes (sha256 of the episode id); near-duplicates: episodes whose "
                      "feature rows, rounded to 3 decimals, are identical"}


def leak_metrics(frame, test_fraction: float) -> dict[str, float]:
    """The independence check as metrics the gates judge (:data:`LEAK_METRIC`)."""
    found = independence(frame, test_fraction)
    return {LEAK_METRIC: float(found["episodes_in_both"] + found["near_duplicates"])}


def offline_eval(loaded: LoadedSpec, ctx: RunContext, *, labelled: dict, trained: dict) -> dict:
    """Evaluate on the test split of the same snapshot the model was trained on.

    :return: ``{run_id, metrics: {"offline.rmse": …, "offline.cut_in.rmse": …}, cache_key}``.
    """
    from closedloop.runtime.cache import run_cached

    spec = loaded.spec
    key = evaluation_key(loaded, labelled, trained)

    def compute(run) -> dict:
        run_id = run.info.run_id
        frame = read_snapshot(labelled["uri"], labelled["digest"])
        _, test_df = split(frame, spec.training.test_fraction)
        model = load_model(trained["model_uri"])
        names = list(spec.evaluation.metrics)
        target = spec.training.target
        pred = predict(model, test_df)
        metrics = {f"{vocab.OFFLINE}{k}": v for k, v in offline_metrics(test_df[target], pred, names).items()}
        by = spec.evaluation.group_by
        if by in test_df:
            for value, idx in test_df.groupby(by).indices.items():
                part = offline_metrics(test_df[target].iloc[idx], pred[idx], names)
                metrics.update({f"{vocab.OFFLINE}{value}.{k}": v for k, v in part.items()})
        metrics.update(leak_metrics(frame, spec.training.test_fraction))
        tracking.log_dataset_input(ctx, run_id, test_df, labelled, context="evaluation",
                                   name=f"{spec.name}-labelled", targets=target)
        tracking.client(ctx).log_batch(run_id, metrics=tracking.metric_entities(metrics))
        return {"run_id": run_id, "metrics": metrics, "test_rows": int(len(test_df))}

    return run_cached(loaded, ctx, "offline_eval", key, compute,
                      tags={vocab.DATASET_VERSION: labelled["digest"]})


def plan(loaded: LoadedSpec, ctx, results: dict):
    """The step table's cache-plan entry of ``offline_eval``."""
    labelled = results["label"]
    return evaluation_key(loaded, labelled, results["train"]), {vocab.DATASET_VERSION: labelled["digest"]}, None


def evaluation_key(loaded: LoadedSpec, labelled: dict, trained: dict) -> str:
    """Cache key of ``offline_eval``: the model (through the training's key), the held-out split, the metrics."""
    from closedloop.runtime.cache import key_of

    spec = loaded.spec
    return key_of(loaded, "offline_eval", dataset=labelled["digest"], evaluation=spec.evaluation.model_dump(mode="json"),
                  split=[spec.training.test_fraction, spec.training.target],
                  upstream=trained.get("cache_key") or trained["model_uri"])

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

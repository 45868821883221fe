"""Step ``offline_eval``: metrics of the trained model on the held-out episodes, per group."""

from __future__ import annotations

from closedloop.spec import LoadedSpec
from closedloop.steps import tracking
from closedloop.steps.context import RunContext
from closedloop.steps.models import load_model
from closedloop.steps.storage import read_snapshot
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

    :return: ``{run_id, metrics: {"offline.rmse": …, "offline.cut_in.rmse": …}}``.
    """

    spec = loaded.spec
    run = tracking.step_run(loaded, ctx, "offline_eval", **{"closedloop.dataset_version": labelled["digest"]})
    done = tracking.finished_result(run)
    if done:
        return done
    run_id = run.info.run_id
    try:
        frame = read_snapshot(labelled["uri"], labelled["digest"])
        _, test_df = split(frame, spec.training.test_fraction)
        model = load_model(trained["model_uri"])
        names = list(spec.evaluation.metrics)
        target = spec.training.target
        pred = predict(model, test_df)
        metrics = {f"offline.{k}": v for k, v in offline_metrics(test_df[target], pred, names).items()}
        by = spec.evaluation.group_by
        if by in test_df:
            for value, idx in test_df.groupby(by).indices.items():
                part = offline_metrics(test_df[target].iloc[idx], pred[idx], names)
                metrics.update({f"offline.{value}.{k}": v for k, v in part.items()})
        tracking.log_dataset_input(ctx, run_id, test_df, labelled, context="evaluation",
                                   name=f"{spec.name}-labelled", targets=target)
        tracking.client(ctx).log_batch(run_id, metrics=tracking.metric_entities(metrics))
        return tracking.finish(ctx, run_id, {"run_id": run_id, "metrics": metrics, "test_rows": int(len(test_df))})
    except BaseException:
        tracking.fail(ctx, run_id)
        raise

"""Latency of ``closedloop trace`` and ``closedloop impact`` on a large MLflow store (SQLite).

Seeds a scratch store the way pipelines fill it — per pipeline run a parent run and four step
runs (train, offline_eval, simulate, release_gate) with the lineage tags, and a model version
for every other pipeline run — first to 1,000 runs / 100 versions, then to 10,000 runs /
1,000 versions, and measures each query in-process (interpreter start excluded), median of 5,
at both sizes. Goals: trace <= 0.2 s, impact <= 1 s at 10,000 runs.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PIPELINES = 10
SOURCES = [f"fleet-{r}" for r in ("eu", "us", "cn", "jp", "kr", "in", "br", "au", "ca", "mx")]
STEPS = ("train", "offline_eval", "simulate", "release_gate")


def seed(client, start: int, stop: int, versions_every: int = 2) -> None:
    """Pipeline runs ``start..stop-1`` (5 MLflow runs each), a model version for every other one."""
    from mlflow.entities import RunTag

    from closedloop.runtime.tracking import metric_entities

    for n in range(start, stop):
        p = n % PIPELINES
        pipeline, dag_id, run_id = f"bench_p{p}", f"bench_p{p}", f"scheduled__{n:06d}"
        exp = client.get_experiment_by_name(f"closedloop/{pipeline}")
        exp_id = exp.experiment_id if exp else client.create_experiment(f"closedloop/{pipeline}")
        sources = [SOURCES[p], SOURCES[(p + 1) % len(SOURCES)]]
        raw, labelled = f"r{n:015d}", f"l{n:015d}"
        policy = f"expert_idm@{1 + n % 3}"
        base = {"closedloop.pipeline": pipeline, "closedloop.template": f"{pipeline}.yaml",
                "closedloop.template_hash": f"h{p:015d}", "closedloop.label_policy": policy,
                "closedloop.code_version": "0.1.0+gbench", "closedloop.run_key": f"{dag_id}/{run_id}",
                "airflow.dag_id": dag_id, "airflow.run_id": run_id, "closedloop.trigger": "schedule",
                "closedloop.dataset_version": labelled, "closedloop.raw_dataset_version": raw,
                "closedloop.dataset.sources": "," + ",".join(sources) + ","}
        parent = client.create_run(exp_id, run_name=f"{pipeline} {run_id}", tags={**base, "closedloop.step": "pipeline"})
        ids = {}
        for step in STEPS:
            tags = {**base, "closedloop.step": step, "mlflow.parentRunId": parent.info.run_id,
                    "airflow.task_id": step}
            if step == "train":
                tags["closedloop.dataset.manifest"] = json.dumps({
                    "raw": {"uri": f"file:///data/{raw}.parquet", "digest": raw, "rows": 12000, "sources": sources,
                            "scenarios": ["cruise", "cut_in"], "window_start": "2026-11-01", "window_end": "2026-11-15"},
                    "labelled": {"digest": labelled, "rows": 12000, "label_policy": policy},
                    "validation": {"suite": "drive_log_labels", "success": True, "evaluated": 10, "failed": 0}})
            if step == "release_gate":
                tags["closedloop.result"] = json.dumps({"passed": True, "report": [
                    {"metric": "sim.collision_rate", "max": 0.0, "min": None, "value": 0.0, "passed": True,
                     "reason": ""}]})
            run = client.create_run(exp_id, run_name=step, tags=tags)
            client.log_batch(run.info.run_id, metrics=metric_entities({f"{step}.m": n % 7}),
                             tags=[RunTag("closedloop.bench", "1")])
            ids[step] = run.info.run_id
        if n % versions_every == 0:
            model = f"bench_model_{p}"
            if not client.search_registered_models(f"name = '{model}'"):
                client.create_registered_model(model, tags={"closedloop.pipeline": pipeline})
            mv = client.create_model_version(model, source=f"file:///models/{n}", run_id=ids["train"], tags={
                **{k: v for k, v in base.items() if k != "closedloop.dataset.sources"},
                "closedloop.training_run_id": ids["train"], "closedloop.dataset.sources": base["closedloop.dataset.sources"]})
            client.set_registered_model_alias(model, "candidate", mv.version)
            if n % 20 == 0:
                client.set_registered_model_alias(model, "production", mv.version)


def median_time(fn, repeats: int = 5) -> float:
    fn()  # warm (imports, connection)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(client, uri: str, pipeline_runs: int) -> dict[str, float]:
    from closedloop.records.lineage import impact, trace

    last = pipeline_runs - 2  # a recent pipeline run with a model version (even n)
    p = last % PIPELINES
    return {
        "trace models:/NAME/VERSION": median_time(lambda: trace(f"bench_model_{p}/{last // 2 // PIPELINES + 1}", uri)),
        "trace models:/NAME@production": median_time(lambda: trace("models:/bench_model_0@production", uri)),
        "trace AIRFLOW_RUN_ID": median_time(lambda: trace(f"scheduled__{last:06d}", uri)),
        "impact --source (2 of 10 pipelines)": median_time(lambda: impact(source=SOURCES[3], tracking_uri=uri)),
        "impact --dataset DIGEST": median_time(lambda: impact(dataset=f"r{last:015d}", tracking_uri=uri)),
        "impact --label-policy NAME@V (1/3 of runs)": median_time(
            lambda: impact(label_policy="expert_idm@2", tracking_uri=uri)),
    }


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="closedloop-bench-lineage-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from mlflow import MlflowClient

    from closedloop.runtime.tracking import ensure_store

    ensure_store(uri)
    client = MlflowClient(uri)
    results = {}
    seeded = 0
    for pipeline_runs in (200, 2000):
        t = time.perf_counter()
        seed(client, seeded, pipeline_runs)
        seeded = pipeline_runs
        runs = pipeline_runs * (1 + len(STEPS))
        print(f"seeded {runs} runs, {pipeline_runs // 2} model versions in {time.perf_counter() - t:.0f} s", flush=True)
        results[runs] = measure(client, uri, pipeline_runs)
    sizes = sorted(results)
    print(f"\nlatency, median of 5, in-process (MLflow on SQLite, {tmp})")
    print(f"{'query':<44}" + "".join(f"{s:>10} runs" for s in sizes) + "    growth")
    for name in results[sizes[0]]:
        a, b = results[sizes[0]][name], results[sizes[-1]][name]
        print(f"{name:<44}" + "".join(f"{results[s][name]:>13.3f} s" for s in sizes) + f"   x{b / a:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

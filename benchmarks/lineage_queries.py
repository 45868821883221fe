"""Latency of ``closedloop trace`` and ``closedloop impact`` on a large MLflow store (SQLite).

Seeds a scratch store the way pipelines fill it — per pipeline run a parent run and four step
runs (train, offline_eval, simulate, release_gate) with the lineage tags, and a model version
for every other pipeline run — to 1,000 runs / 100 versions through MLflow's client, then with the
same rows written straight into MLflow's tables (the client would take hours) to 10,000 runs /
1,000 versions and 100,000 runs / 10,000 versions (``--max-runs 10000`` stops earlier), and measures
each query in-process (interpreter start excluded), median of 5, at every size, with the growth per ×10.
Goals at 100,000 runs: trace <= 0.1 s, impact <= 0.3 s for a page.

    .venv/bin/python benchmarks/lineage_queries.py [--max-runs 100000]
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


def run_tags(n: int) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Pipeline run ``n``'s lineage tags (``base``) and each step run's own tags (parent link excluded)."""
    p = n % PIPELINES
    pipeline, dag_id, run_id = f"bench_p{p}", f"bench_p{p}", f"scheduled__{n:06d}"
    sources = [SOURCES[p], SOURCES[(p + 1) % len(SOURCES)]]
    raw, labelled = f"{n + 10**9:064x}", f"{n:064x}"  # sha256-shaped digests
    policy = f"expert_idm@{1 + n % 3}"
    base = {"closedloop.pipeline": pipeline, "closedloop.template": f"{pipeline}.yaml",
            "closedloop.template_hash": f"h{p:015d}", "closedloop.label_policy": policy,
            "closedloop.code_version": "0.1.0+gbench", "closedloop.run_key": f"{dag_id}/{run_id}",
            "airflow.dag_id": dag_id, "airflow.run_id": run_id, "closedloop.trigger": "schedule",
            "closedloop.dataset_version": labelled, "closedloop.raw_dataset_version": raw,
            "closedloop.dataset.sources": "," + ",".join(sources) + ","}
    steps = {step: {**base, "closedloop.step": step, "airflow.task_id": step} for step in STEPS}
    steps["train"]["closedloop.dataset.manifest"] = json.dumps({
        "raw": {"uri": f"file:///data/{raw}.parquet", "digest": raw, "rows": 12000, "sources": sources,
                "scenarios": ["cruise", "cut_in"], "window_start": "2026-11-01", "window_end": "2026-11-15"},
        "labelled": {"digest": labelled, "rows": 12000, "label_policy": policy},
        "validation": {"suite": "drive_log_labels", "success": True, "evaluated": 10, "failed": 0}})
    steps["release_gate"]["closedloop.result"] = json.dumps({"passed": True, "report": [
        {"metric": "sim.collision_rate", "max": 0.0, "min": None, "value": 0.0, "passed": True, "reason": ""}]})
    return base, steps


def seed(client, start: int, stop: int, versions_every: int = 2) -> None:
    """Pipeline runs ``start..stop-1`` (5 MLflow runs each), a model version for every other one."""
    from mlflow.entities import RunTag

    from closedloop.runtime.tracking import metric_entities

    for n in range(start, stop):
        p = n % PIPELINES
        base, steps = run_tags(n)
        pipeline, run_id = base["closedloop.pipeline"], base["airflow.run_id"]
        exp = client.get_experiment_by_name(f"closedloop/{pipeline}")
        exp_id = exp.experiment_id if exp else client.create_experiment(f"closedloop/{pipeline}")
        parent = client.create_run(exp_id, run_name=f"{pipeline} {run_id}", tags={**base, "closedloop.step": "pipeline"})
        ids = {}
        for step in STEPS:
            run = client.create_run(exp_id, run_name=step, tags={**steps[step],
                                                                  "mlflow.parentRunId": parent.info.run_id})
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


def bulk_seed(path: Path, start: int, stop: int, versions_every: int = 2) -> None:
    """The rows :func:`seed` makes for pipeline runs ``start..stop-1``, inserted into MLflow's SQLite tables."""
    import sqlite3
    import uuid

    db = sqlite3.connect(path)
    exp_ids = dict(db.execute("select name, experiment_id from experiments"))
    version_of = {name: int(v) for name, v in db.execute("select name, max(version) from model_versions group by name")}
    now = int(time.time() * 1000)
    runs, tags, metrics, mvs, mv_tags, aliases = [], [], [], [], [], {}
    for n in range(start, stop):
        p = n % PIPELINES
        base, steps = run_tags(n)
        pipeline, run_id = base["closedloop.pipeline"], base["airflow.run_id"]
        exp = exp_ids[f"closedloop/{pipeline}"]
        parent = uuid.uuid4().hex
        runs.append((parent, f"{pipeline} {run_id}", exp, now))
        tags.extend((k, v, parent) for k, v in {**base, "closedloop.step": "pipeline",
                                                 "mlflow.runName": f"{pipeline} {run_id}"}.items())
        ids = {}
        for step in STEPS:
            rid = ids[step] = uuid.uuid4().hex
            runs.append((rid, step, exp, now))
            tags.extend((k, v, rid) for k, v in {**steps[step], "mlflow.parentRunId": parent, "mlflow.runName": step,
                                                  "closedloop.bench": "1"}.items())
            metrics.append((f"{step}.m", float(n % 7), now, rid))
        if n % versions_every == 0:
            model = f"bench_model_{p}"
            version = version_of[model] = version_of.get(model, 0) + 1
            mvs.append((model, version, now, f"file:///models/{n}", ids["train"]))
            mv_tags.extend((model, version, k, v) for k, v in {
                **base, "closedloop.training_run_id": ids["train"]}.items())
            aliases[(model, "candidate")] = version
            if n % 20 == 0:
                aliases[(model, "production")] = version
    db.executemany("insert into runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, "
                   "start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id) "
                   "values (?, ?, 'LOCAL', '', '', 'bench', 'RUNNING', ?, null, '', 'active', 'file:///a', ?)",
                   [(r, name, now, exp) for r, name, exp, now in runs])
    db.executemany("insert into tags (key, value, run_uuid) values (?, ?, ?)", tags)
    db.executemany("insert into metrics (key, value, timestamp, run_uuid, step, is_nan) values (?, ?, ?, ?, 0, 0)",
                   metrics)
    db.executemany("insert into latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                   "values (?, ?, ?, 0, 0, ?)", [(k, v, ts, r) for k, v, ts, r in metrics])
    db.executemany("insert into model_versions (workspace, name, version, creation_time, last_updated_time, "
                   "description, user_id, current_stage, source, storage_location, run_id, run_link, status, "
                   "status_message) values ('default', ?, ?, ?, ?, '', 'bench', 'None', ?, ?, ?, '', 'READY', '')",
                   [(m, v, now, now, src, src, run) for m, v, now, src, run in mvs])
    db.executemany("insert into model_version_tags (workspace, name, version, key, value) values ('default', ?, ?, ?, ?)",
                   mv_tags)
    db.executemany("insert or replace into registered_model_aliases (workspace, name, alias, version) "
                   "values ('default', ?, ?, ?)", [(m, a, v) for (m, a), v in aliases.items()])
    db.commit()
    db.close()


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
        "impact --dataset DIGEST": median_time(lambda: impact(dataset=f"{last + 10**9:064x}", tracking_uri=uri)),
        "impact --label-policy NAME@V (1/3 of runs)": median_time(
            lambda: impact(label_policy="expert_idm@2", tracking_uri=uri)),
    }


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-runs", type=int, default=100_000, help="the largest store measured (1,000 × 10^k runs)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="closedloop-bench-lineage-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from mlflow import MlflowClient

    from closedloop.runtime.tracking import ensure_store

    ensure_store(uri)
    client = MlflowClient(uri)
    results = {}
    seeded = 0
    sizes = [n for n in (200, 2_000, 20_000) if n * (1 + len(STEPS)) <= args.max_runs]
    for pipeline_runs in sizes:
        t = time.perf_counter()
        if seeded == 0:
            seed(client, seeded, pipeline_runs)
        else:
            bulk_seed(tmp / "mlflow.db", seeded, pipeline_runs)
        seeded = pipeline_runs
        runs = pipeline_runs * (1 + len(STEPS))
        print(f"seeded {runs} runs, {pipeline_runs // 2} model versions in {time.perf_counter() - t:.0f} s", flush=True)
        results[runs] = measure(client, uri, pipeline_runs)
    sizes = sorted(results)
    print(f"\nlatency, median of 5, in-process (MLflow on SQLite, {tmp})")
    print(f"{'query':<44}" + "".join(f"{s:>11,} runs" for s in sizes) + "   growth per x10")
    for name in results[sizes[0]]:
        growth = [results[b][name] / results[a][name] for a, b in zip(sizes, sizes[1:], strict=False)]
        print(f"{name:<44}" + "".join(f"{results[s][name]:>14.3f} s" for s in sizes)
              + "   " + ", ".join(f"x{g:.1f}" for g in growth))
    return 0


if __name__ == "__main__":
    sys.exit(main())

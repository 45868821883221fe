"""``closedloop recall open`` on a large store: 100,000 runs and 10,000 model versions (MLflow on SQLite).

The store is seeded the way pipelines fill it — per pipeline run a parent run and four step runs with
the lineage tags, a model version (with its sealed release record) for every tenth pipeline run, ten
pipelines over ten sources — written straight into MLflow's tables (the client would take an hour), then
read only through MLflow's client. Measured in-process, median of 3: listing the affected set of a source
recall of one month of one source (two pipelines read it), of a label policy version (a third of the
versions), and holding them (a sealed tag and an audit entry per version); also at 10,000 runs / 1,000
versions for the growth. Goal: listing <= 1 s at 100k runs / 10k versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

PIPELINES = 10
SOURCES = [f"fleet-{r}" for r in ("eu", "us", "cn", "jp", "kr", "in", "br", "au", "ca", "mx")]
STEPS = ("train", "offline_eval", "simulate", "release_gate")
VERSION_EVERY = 10  # pipeline runs per model version: 100k runs (20k pipeline runs) → 2k … see SIZES
SIZES = ((2_000, 1_000), (20_000, 10_000))  # (pipeline runs, model versions): 10k and 100k MLflow runs


def seed(uri_path: Path, key, start: int, stop: int, versions: int, exp_ids: dict[str, str]) -> None:
    """Pipeline runs ``start..stop-1`` (5 MLflow runs each) and ``versions`` model versions spread over them."""
    from closedloop import vocab
    from closedloop.runtime.signing import Binding
    from closedloop.steps.recall import months_tag

    db = sqlite3.connect(uri_path)
    runs, tags, mvs, mv_tags = [], [], [], []
    every = max(1, (stop - start) // versions)
    assert every * versions == stop - start, "pipeline runs must be a multiple of the versions"
    next_version: dict[str, int] = {}
    for name, v in db.execute("select name, max(version) from model_versions group by name"):
        next_version[name] = int(v)
    now = int(time.time() * 1000)
    for n in range(start, stop):
        p = n % PIPELINES
        pipeline, run_id = f"bench_p{p}", f"scheduled__{n:07d}"
        day = date(2025, 1, 1) + timedelta(days=n // PIPELINES % 700)
        window = [day.isoformat(), (day + timedelta(days=14)).isoformat()]
        sources = [SOURCES[p], SOURCES[(p + 1) % len(SOURCES)]]
        policy = f"expert_idm@{1 + n % 3}"
        base = {vocab.PIPELINE: pipeline, vocab.LABEL_POLICY: policy, vocab.RUN_KEY: f"{pipeline}/{run_id}",
                vocab.AIRFLOW_DAG_ID: pipeline, vocab.AIRFLOW_RUN_ID: run_id,
                vocab.DATASET_VERSION: f"{n:064x}", vocab.RAW_DATASET_VERSION: f"{n + 10**9:064x}",
                vocab.DATASET_SOURCES: "," + ",".join(sources) + ",", vocab.DATASET_WINDOW: "..".join(window),
                vocab.DATASET_MONTHS: months_tag(*window),
                vocab.CODE_DIGEST: hashlib.sha256(str(n % 50).encode()).hexdigest()}
        train = None
        for step in ("pipeline", *STEPS):
            rid = uuid.uuid4().hex
            train = rid if step == "train" else train
            runs.append((rid, step, "LOCAL", "", "", "bench", "FINISHED", now, now, None, "", "active",
                         f"file:///a/{rid}", exp_ids[pipeline]))
            tags.extend((k, v, rid) for k, v in {**base, vocab.STEP: step}.items())
        if ((n - start) // PIPELINES) % every == 0 and len(mvs) < versions:  # every pipeline, every other block
            model = f"bench_model_{p}"
            version = next_version.get(model, 0) + 1
            next_version[model] = version
            record = {"kind": "release_record", "model": model, "version": str(version), "dag_id": pipeline,
                      "run_id": run_id, "sources": sources, "window": window, "excluded": [],
                      "label_policy": policy, "code_digest": base[vocab.CODE_DIGEST],
                      "dataset_digest": base[vocab.DATASET_VERSION],
                      "raw_dataset_digest": base[vocab.RAW_DATASET_VERSION], "gates_passed": True}
            sealed = key.seal(record, Binding(pipeline, run_id, "register_candidate"))
            mvs.append(("default", model, version, now, now, "", "bench", "None", f"file:///m/{n}", f"file:///m/{n}",
                        train, "", "READY", ""))
            mv_tags.extend(("default", model, version, k, v) for k, v in {
                **base, vocab.TRAINING_RUN_ID: train, vocab.RELEASE_RECORD: json.dumps(sealed, sort_keys=True)}.items())
    db.executemany("insert into runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, "
                   "start_time, end_time, deleted_time, source_version, lifecycle_stage, artifact_uri, experiment_id) "
                   "values (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", runs)
    db.executemany("insert into tags (key, value, run_uuid) values (?,?,?)", tags)
    db.executemany("insert into model_versions (workspace, name, version, creation_time, last_updated_time, "
                   "description, user_id, current_stage, source, storage_location, run_id, run_link, status, "
                   "status_message) values (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", mvs)
    db.executemany("insert into model_version_tags (workspace, name, version, key, value) values (?,?,?,?,?)", mv_tags)
    db.commit()
    db.close()


def median_time(fn, repeats: int = 3) -> tuple[float, object]:
    out = fn()  # warm (imports, connection)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="closedloop-bench-recall-"))
    path = tmp / "mlflow.db"
    uri = f"sqlite:///{path}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from closedloop.runtime.signing import Signer
    from closedloop.runtime.tracking import mlflow_client
    from closedloop.steps import recall

    c = mlflow_client(uri)
    key = Signer.generate()
    exp_ids = {f"bench_p{p}": c.create_experiment(f"closedloop/bench_p{p}") for p in range(PIPELINES)}
    for p in range(PIPELINES):
        c.create_registered_model(f"bench_model_{p}")
    results: dict[int, dict[str, float]] = {}
    seeded = 0
    for pipeline_runs, versions in SIZES:
        t = time.perf_counter()
        seed(path, key, seeded, pipeline_runs, versions - sum(v for (r, v) in SIZES if r <= seeded), exp_ids)
        seeded = pipeline_runs
        runs = pipeline_runs * (1 + len(STEPS))
        n_versions = sum(len(c.search_model_versions(f"name = 'bench_model_{p}'", max_results=100_000))
                         for p in range(PIPELINES))
        print(f"seeded {runs} runs, {n_versions} model versions in {time.perf_counter() - t:.0f} s", flush=True)
        month = recall.query_of(source="fleet-cn", window=f"2025-0{3 + len(results)}-01..2025-0{3 + len(results)}-28")
        policy = recall.query_of(label_policy="expert_idm@2")
        code = recall.query_of(code_digest=hashlib.sha256(b"7").hexdigest()[:16])
        res = {}
        for name, q in (("source, one month (2 of 10 pipelines)", month), ("label policy (1/3 of versions)", policy),
                        ("code digest (1/50 of versions)", code)):
            secs, rows = median_time(lambda q=q: recall.affected(c, q, key.verifier))
            res[f"list: {name}"] = secs
            res[f"  versions: {name}"] = len(rows)
        rows = recall.affected(c, month, key.verifier)
        t = time.perf_counter()
        recall.open_recall(c, month, reason="bench", by="bench", signer=key, verifier=key.verifier, rows=rows)
        res["open + hold: source, one month"] = time.perf_counter() - t
        t = time.perf_counter()
        recall.holds(c, rows[0]["model"], rows[0]["version"], key.verifier)
        res["holds() of one version (what promote checks)"] = time.perf_counter() - t
        results[runs] = res
        print(json.dumps(res, indent=1), flush=True)
    sizes = sorted(results)
    print(f"\nrecall on MLflow (SQLite, {tmp}), in-process, median of 3")
    print(f"{'':<48}" + "".join(f"{s:>12} runs" for s in sizes) + "    growth")
    for name in results[sizes[0]]:
        a, b = results[sizes[0]][name], results[sizes[-1]][name]
        if name.startswith("  versions"):
            print(f"{name:<48}" + "".join(f"{results[s][name]:>17}" for s in sizes))
        else:
            print(f"{name:<48}" + "".join(f"{results[s][name]:>15.3f} s" for s in sizes) + f"   x{b / a:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the step cache saves, and what our idempotency checks cost.

1. First run vs rerun with unchanged inputs, through Airflow (``dag.test``, tasks in-process) in a
   scratch home: three pairs, interleaved; each pair is a run on a new data window (every step
   misses the cache and does its work) and then a run on the same window (the cacheable steps
   hit). Wall time per run, medians, the ratio, and per-task durations of the last pair.
2. The same under a real scheduler (api-server, scheduler, dag-processor, triggerer, LocalExecutor
   on 127.0.0.1; each task in its own process, as in production): pairs of a run with the cache
   off (``closedloop_cache: false``: all the work) and a run of the same window (hits); run
   wall time from Airflow's records (queued → end).
3. The bookkeeping every step does so that a retry or a cleared task creates nothing twice —
   get-or-create of the pipeline and step runs in MLflow, the "finished already?" check on a
   retry, the cache lookup — timed in-process on the benchmark's store, median of 20 each,
   next to the fault-drill hook with drills off.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import full_run_project  # noqa: E402

TMP = Path(tempfile.mkdtemp(prefix="closedloop-bench-cache-"))
os.environ.update({
    "CLOSEDLOOP_HOME": str(TMP / "home"), "AIRFLOW_HOME": str(TMP / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(TMP / "project" / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "GX_ANALYTICS_ENABLED": "False", "MLFLOW_TRACKING_URI": f"sqlite:///{TMP / 'home' / 'mlflow.db'}",
})
os.environ.pop("CLOSEDLOOP_FAULTS", None)
(TMP / "home").mkdir(parents=True)
(TMP / "airflow").mkdir()
PAIRS = 3
CACHED = ("generate_dataset", "label", "validate_data", "train", "offline_eval", "simulate")


def scratch_project() -> Path:
    return full_run_project(TMP / "project")


def median_ms(fn, n: int = 20) -> float:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def bookkeeping(root: Path) -> None:
    from closedloop import settings
    from closedloop.runtime import cache, tracking
    from closedloop.runtime.context import RunContext
    from closedloop.runtime.faults import inject
    from closedloop.spec import load_spec

    loaded = load_spec(root / "include" / "pipelines" / "acc_longitudinal.yaml")
    base = RunContext(pipeline="acc_longitudinal", template_digest=loaded.digest, dag_id="acc_longitudinal",
                      run_id="bench", task_id="train", tracking_uri=settings.tracking_uri())
    c = tracking.client(base)
    exp = c.get_experiment_by_name("closedloop/acc_longitudinal")
    stored = len(c.search_runs([exp.experiment_id], max_results=5000))
    ctxs = [base.for_key(f"acc_longitudinal/bench__{i}") for i in range(20)]
    create = median_ms(lambda i: tracking.step_run(loaded, ctxs[i], "train", step_tags={cache.KEY_TAG: f"k{i}"}))
    for i in range(20):
        tracking.finish(ctxs[i], tracking.step_run(loaded, ctxs[i], "train", step_tags={cache.KEY_TAG: f"k{i}"})
                        .info.run_id, {"bench": i})
    retry = median_ms(lambda i: tracking.finished_result(
        tracking.step_run(loaded, ctxs[i], "train", step_tags={cache.KEY_TAG: f"k{i}"})))
    lookup_miss = median_ms(lambda i: cache.lookup(loaded, ctxs[i], "train", f"absent{i}"))
    lookup_hit = median_ms(lambda i: cache.lookup(loaded, ctxs[(i + 1) % 20], "train", f"k{i}"))
    drill = median_ms(lambda i: inject(dag_id="d", task_id="t", try_number=1, point="start"), n=1000)
    print(f"\nidempotency bookkeeping per step (MLflow on SQLite, {stored} runs in the experiment, median of 20):")
    print(f"  first try: get-or-create pipeline + step run       {create:7.1f} ms")
    print(f"  retry: find the step run, 'finished already?'       {retry:7.1f} ms")
    print(f"  cache lookup (miss / hit)                           {lookup_miss:7.1f} / {lookup_hit:.1f} ms")
    print(f"  fault-drill hook with drills off                    {drill * 1000:7.2f} µs")


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def scheduler_pairs(root: Path, pairs: int = 2) -> None:
    from urllib.parse import quote

    from closedloop.local.server import AirflowServer

    server = AirflowServer(TMP / "server", root / "dags", {"admin": ("admin", "admin-pw")},
                           env={"CLOSEDLOOP_HOME": str(TMP / "server-home"),
                                "MLFLOW_TRACKING_URI": f"sqlite:///{TMP / 'server-home' / 'mlflow.db'}"})
    server.start()
    try:
        server.wait_for(lambda: server.api("GET", "/api/v2/dags/acc_longitudinal")[0] == 200, 180, "DAG parsed")

        def run(conf: dict) -> tuple[float, dict]:
            _, r = server.api("POST", "/api/v2/dags/acc_longitudinal/dagRuns", {"logical_date": None, "conf": conf})
            rid = quote(r["dag_run_id"], safe="")
            done = server.wait_for(lambda: (lambda x: x if x["state"] in ("success", "failed") else None)(
                server.api("GET", f"/api/v2/dags/acc_longitudinal/dagRuns/{rid}")[1]), 900, "run", interval=0.5)
            assert done["state"] == "success", done
            tis = server.api("GET", f"/api/v2/dags/acc_longitudinal/dagRuns/{rid}/taskInstances")[1]
            return (ts(done["end_date"]) - ts(done["queued_at"])).total_seconds(), \
                {t["task_id"]: t["duration"] for t in tis["task_instances"]}

        full, cached, tasks = [], [], None
        for _ in range(pairs):
            a, ta = run({"closedloop_cache": False})
            b, tb = run({})
            full.append(a)
            cached.append(b)
            tasks = (ta, tb)
    finally:
        server.stop()
    mf, mc = statistics.median(full), statistics.median(cached)
    print(f"\nunder a real scheduler (LocalExecutor, a process per task), {pairs} pairs, interleaved:")
    print(f"  all work   {', '.join(f'{x:.1f}' for x in full)} s   median {mf:.1f} s")
    print(f"  cache hits {', '.join(f'{x:.1f}' for x in cached)} s   median {mc:.1f} s")
    print(f"  ratio: {mc / mf:.2f}  (medians; what is left is Airflow's per-task process start and scheduling)")
    ta, tb = tasks
    print(f"{'task':<20}{'all work':>10}{'hits':>9}  (task durations of the last pair, s)")
    for task in ta:
        print(f"{task:<20}{ta[task]:>10.2f}{tb[task]:>9.2f}")


def main() -> None:
    import sys

    from closedloop.local.run import ensure_db, load_dag, run_dag

    root = scratch_project()
    ensure_db()
    dag = load_dag("acc_longitudinal")
    first, again, pair = [], [], None
    day0 = datetime(2026, 11, 2, tzinfo=UTC)
    for i in range(PAIRS):
        day = day0 + timedelta(days=7 * i)  # a new window: every step misses
        a = run_dag(dag, day.replace(hour=3))
        b = run_dag(dag, day.replace(hour=4))  # the same window, template and code: the cacheable steps hit
        assert a["state"] == b["state"] == "success", (a["state"], b["state"])
        hits = [t for t in CACHED if (b["results"][t].get("cache") or {}).get("hit")]
        assert hits == list(CACHED), hits
        first.append(a["wall_seconds"])
        again.append(b["wall_seconds"])
        pair = (a, b)
    mf, ma = statistics.median(first), statistics.median(again)
    print(f"\nfirst run vs rerun with unchanged inputs (dag.test, {PAIRS} pairs, interleaved):")
    print(f"  first runs  {', '.join(f'{x:.1f}' for x in first)} s   median {mf:.1f} s")
    print(f"  reruns      {', '.join(f'{x:.1f}' for x in again)} s   median {ma:.1f} s")
    print(f"  ratio rerun / first: {ma / mf:.2f}  (medians)")
    a, b = pair
    da = {t["task_id"]: t["duration_s"] for t in a["tasks"]}
    db = {t["task_id"]: t["duration_s"] for t in b["tasks"]}
    print(f"\n{'task':<20}{'first':>9}{'rerun':>9}  (task durations of the last pair, s)")
    for task in da:
        print(f"{task:<20}{da[task]:>9.2f}{db[task]:>9.2f}{'  cache hit' if task in CACHED else ''}")
    print(f"{'sum':<20}{sum(da.values()):>9.2f}{sum(db.values()):>9.2f}")
    bookkeeping(root)
    if "--no-scheduler" not in sys.argv:
        scheduler_pairs(root)


if __name__ == "__main__":
    main()

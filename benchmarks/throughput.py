"""Pipeline runs per hour on the production shape (PostgreSQL, Redis, MLflow server, Airflow with the
CeleryExecutor) with 1 and with 2 Celery workers on this machine, and where the time goes.

For each worker count: start the shape (``closedloop.local.prodlike``), post RUNS periodic runs at once on
RUNS different data windows with the step cache off (every run does all its work), wait until all
have finished; throughput = RUNS / (first queued → last finished). Where the time goes, from
Airflow's task instance records: the summed task run time per step, the median queue wait (queued →
running), per run the time in its tasks vs between them (scheduling, queueing, starting each task's
process), and how busy the machine's CPUs were (psutil) while the runs were going.
Usage: ``python benchmarks/throughput.py [RUNS]`` (default 6).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import full_run_project  # noqa: E402

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
TMP = Path(tempfile.mkdtemp(prefix="closedloop-bench-throughput-"))
os.environ.pop("CLOSEDLOOP_FAULTS", None)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def measure(workers: int, project: Path) -> dict:
    from urllib.parse import quote

    from closedloop.local.prodlike import ProdLike

    shape = ProdLike(TMP / f"shape-{workers}", project / "dags", {"admin": ("admin", "admin-pw")}, workers=workers,
                     concurrency=4)
    shape.start()
    try:
        import psutil

        cpu_before = psutil.cpu_times()
        af = shape.airflow
        af.wait_for(lambda: af.api("GET", "/api/v2/dags/acc_longitudinal")[0] == 200, 180, "DAG parsed")
        for day in range(1, RUNS + 1):
            status, run = af.api("POST", "/api/v2/dags/acc_longitudinal/dagRuns", {
                "logical_date": f"2026-10-{day:02d}T03:00:00Z", "conf": {"closedloop_cache": False}})
            assert status == 200, run

        def done():
            runs = af.api("GET", "/api/v2/dags/acc_longitudinal/dagRuns?limit=100")[1]["dag_runs"]
            return runs if len(runs) >= RUNS and all(r["state"] in ("success", "failed") for r in runs) else None

        runs = af.wait_for(done, 3600, "all runs", interval=3)
        cpu_after = psutil.cpu_times()
        tis = []
        for r in runs:
            rid = quote(r["dag_run_id"], safe="")
            tis += af.api("GET", f"/api/v2/dags/acc_longitudinal/dagRuns/{rid}/taskInstances")[1]["task_instances"]
    finally:
        shape.stop()
    start = min(ts(r["queued_at"]) for r in runs)
    end = max(ts(r["end_date"]) for r in runs)
    wall = (end - start).total_seconds()
    per_step: dict[str, float] = {}
    in_tasks: dict[str, float] = {}
    waits = []
    for t in tis:
        per_step[t["task_id"]] = per_step.get(t["task_id"], 0.0) + (t["duration"] or 0.0)
        in_tasks[t["dag_run_id"]] = in_tasks.get(t["dag_run_id"], 0.0) + (t["duration"] or 0.0)
        if t.get("queued_when") and t.get("start_date"):
            waits.append((ts(t["start_date"]) - ts(t["queued_when"])).total_seconds())
    run_secs = {r["dag_run_id"]: (ts(r["end_date"]) - ts(r["start_date"])).total_seconds() for r in runs}
    busy = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("user", "system", "nice", "irq", "softirq"))
    total = busy + (cpu_after.idle - cpu_before.idle) + (cpu_after.iowait - cpu_before.iowait)
    return {"workers": workers, "wall": wall, "per_hour": RUNS / wall * 3600,
            "ok": sum(r["state"] == "success" for r in runs), "per_step": per_step,
            "queue_wait_median": statistics.median(waits) if waits else None,
            "task_seconds": sum(per_step.values()), "cpu_busy": busy / total,
            "run_median": statistics.median(run_secs.values()),
            "run_in_tasks_median": statistics.median(in_tasks[k] for k in run_secs)}


def main() -> None:
    project = full_run_project(TMP / "project")
    results = [measure(1, project), measure(2, project)]
    print(f"\n{RUNS} runs at once on the production shape (PostgreSQL, Redis, MLflow server, CeleryExecutor; "
          "concurrency 4 per worker; 2 cores):")
    for r in results:
        print(f"  {r['workers']} worker(s): {r['wall']:.0f} s for {r['ok']}/{RUNS} successful runs = "
              f"{r['per_hour']:.0f} runs/hour; median queue wait {r['queue_wait_median']:.1f} s; "
              f"{r['task_seconds']:.0f} task-seconds in {r['wall']:.0f} s wall; CPUs {r['cpu_busy']:.0%} busy")
        print(f"      a run takes {r['run_median']:.0f} s (median), {r['run_in_tasks_median']:.0f} s of it in its "
              f"tasks, {r['run_median'] - r['run_in_tasks_median']:.0f} s between them")
    print(f"  2 workers / 1 worker: {results[1]['per_hour'] / results[0]['per_hour']:.2f}x")
    print("\nwhere the time goes (summed task run time per step, s):")
    print(f"  {'step':<20}" + "".join(f"{r['workers']:>10} w" for r in results))
    for step in results[0]["per_step"]:
        print(f"  {step:<20}" + "".join(f"{r['per_step'].get(step, 0):>12.0f}" for r in results))


if __name__ == "__main__":
    main()

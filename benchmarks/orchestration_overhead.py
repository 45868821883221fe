"""What the scheduler costs on top of the work: the pipeline's steps in one process vs the same
pipeline under a real scheduler, cold tasks vs warm tasks, with a no-op DAG of the same shape beside.

In one invocation, on a scratch copy of the shipped template (full sampling, no review, step cache
off so every run does all its work):

1. the steps called directly in one fresh Python process (imports paid once), ``--repeats`` times;
2. local Airflow (LocalExecutor, SQLite) started twice — cold tasks (``CLOSEDLOOP_WARM_TASKS=0``:
   every task process imports what it needs) and warm tasks (the executor preloads the third-party
   libraries before it forks) — each running the pipeline and the no-op DAG interleaved,
   ``--repeats`` times each: wall from the first task's start to the last task's end.

Per task it prints the step's time in the single process beside its task's duration under the
scheduler, and the start latency: the task process handed over (Airflow's ``start_date``) → the
operator's first line (the line :data:`closedloop.operators.base.WORK_STARTS` logs) and → the step's
MLflow run opened (its first line of work, with its imports and client set-up behind it).

    .venv/bin/python benchmarks/orchestration_overhead.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import full_run_project  # noqa: E402

PIPELINE = "acc_longitudinal"
NOOP = "closedloop_noop"
STEPS = ("generate_dataset", "label", "validate_data", "train", "offline_eval", "simulate", "release_gate",
         "register_candidate")
NOOP_DAG = f'''"""Eight tasks that do nothing, chained like the pipeline: the scheduler's own floor."""
from airflow.sdk import DAG, task

with DAG("{NOOP}", schedule=None, catchup=False, tags=["benchmark"]):
    previous = None
    for name in {STEPS!r}:
        @task(task_id=name)
        def noop():
            return None

        current = noop()
        if previous is not None:
            previous >> current
        previous = current
'''


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def direct(tmp: Path) -> tuple[float, dict[str, float]]:
    """The steps in one fresh process (benchmarks/pipeline_run.py --direct): its wall and per-step times."""
    env = {**os.environ, "CLOSEDLOOP_BENCH_TMP": str(tmp)}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("pipeline_run.py")), "--direct"],
                         capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - started
    return wall, json.loads(out.stdout.strip().splitlines()[-1])


def run_once(server, dag_id: str, conf: dict) -> dict:
    status, run = server.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
    assert status == 200, run
    rid = quote(run["dag_run_id"], safe="")

    def finished():
        _, r = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{rid}")
        return r if r["state"] in ("success", "failed") else None

    r = server.wait_for(finished, 900, f"{dag_id} to finish", interval=0.5)
    _, tis = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{rid}/taskInstances")
    tis = {t["task_id"]: t for t in tis["task_instances"]}
    assert r["state"] == "success", {k: t["state"] for k, t in tis.items()}
    starts = [ts(t["start_date"]) for t in tis.values() if t["start_date"]]
    ends = [ts(t["end_date"]) for t in tis.values() if t["end_date"]]
    out = {"wall": max(ends) - min(starts), "tasks": {}, "execute": {}, "latency": {}}
    opened = step_runs_opened(server, f"{dag_id}/{run['dag_run_id']}") if dag_id == PIPELINE else {}
    for task_id, t in tis.items():
        out["tasks"][task_id] = ts(t["end_date"]) - ts(t["start_date"])
        if dag_id == PIPELINE:
            first = work_starts(server, dag_id, rid, task_id, t["try_number"])
            if first is not None:
                out["execute"][task_id] = first - ts(t["start_date"])
            if task_id in opened:
                out["latency"][task_id] = opened[task_id] - ts(t["start_date"])
    return out


def step_runs_opened(server, run_key: str) -> dict[str, float]:
    """When each step opened its MLflow run (the step's first line of work, its imports behind it)."""
    from mlflow import MlflowClient

    client = MlflowClient(server.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(f"closedloop/{PIPELINE}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`closedloop.run_key` = '{run_key}'",
                              max_results=100)
    return {r.data.tags["closedloop.step"]: r.info.start_time / 1000 for r in runs
            if r.data.tags.get("closedloop.step") in STEPS}


def work_starts(server, dag_id: str, rid: str, task_id: str, try_number: int) -> float | None:
    from closedloop.operators.base import WORK_STARTS

    marker = WORK_STARTS % task_id
    _, log = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{rid}/taskInstances/{task_id}/logs/{try_number}"
                               "?full_content=true")
    for event in log.get("content", []) if isinstance(log, dict) else []:
        if isinstance(event, dict) and marker in str(event.get("event")) and event.get("timestamp"):
            return ts(event["timestamp"])
    return None


def under_scheduler(tmp: Path, project: Path, warm: bool, repeats: int) -> dict:
    from closedloop.local.server import AirflowServer

    base = tmp / ("warm" if warm else "cold")
    server = AirflowServer(base, project / "dags", {"admin": ("admin", "admin-pw")},
                           env={"CLOSEDLOOP_WARM_TASKS": "1" if warm else "0"})
    started = time.perf_counter()
    server.start()
    up = time.perf_counter() - started
    try:
        for dag_id in (PIPELINE, NOOP):
            server.wait_for(lambda d=dag_id: server.api("GET", f"/api/v2/dags/{d}")[0] == 200, 180, f"{dag_id} parsed")
        time.sleep(10)  # settle: the first parse and the executor's preload are behind us
        runs = {PIPELINE: [], NOOP: []}
        for _ in range(repeats):  # interleaved
            runs[PIPELINE].append(run_once(server, PIPELINE, {"closedloop_cache": False}))
            runs[NOOP].append(run_once(server, NOOP, {}))
        return {"start": up, **runs}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="closedloop-bench-overhead-"))
    try:
        project = full_run_project(tmp / "project")
        (project / "dags" / "closedloop_noop.py").write_text(NOOP_DAG)
        os.environ.update({"GX_ANALYTICS_ENABLED": "False"})
        print(f"scratch folder {tmp}; {args.repeats} repeats of each", flush=True)
        directs = []
        for i in range(args.repeats):
            directs.append(direct(tmp / f"direct-{i}"))
            print(f"  steps in one process #{i + 1}: {directs[-1][0]:.1f} s", flush=True)
        shapes = {}
        for warm in (False, True):
            name = "warm" if warm else "cold"
            shapes[name] = under_scheduler(tmp, project, warm, args.repeats)
            print(f"  {name} tasks: server up in {shapes[name]['start']:.0f} s; pipeline "
                  + ", ".join(f"{r['wall']:.1f}" for r in shapes[name][PIPELINE]) + " s; no-op "
                  + ", ".join(f"{r['wall']:.1f}" for r in shapes[name][NOOP]) + " s", flush=True)

        one = statistics.median(w for w, _ in directs)
        step = {s: statistics.median(d[s] for _, d in directs) for s in STEPS}
        print(f"\nmedians of {args.repeats} ({os.cpu_count()} cores)")
        print(f"  steps in one fresh process (imports once):  {one:6.1f} s wall (sum of steps "
              f"{sum(step.values()):.1f} s)")
        for name, shape in shapes.items():
            wall = statistics.median(r["wall"] for r in shape[PIPELINE])
            noop = statistics.median(r["wall"] for r in shape[NOOP])
            lat = [v for r in shape[PIPELINE] for v in r["latency"].values()]
            execute = [v for r in shape[PIPELINE] for v in r["execute"].values()]
            print(f"  {name} tasks under the scheduler:            {wall:6.1f} s  ratio {wall / one:.2f}  "
                  f"(no-op DAG {noop:.1f} s; server start {shape['start']:.0f} s)")
            print(f"      task start → operator's first line median {statistics.median(execute):.2f} s; "
                  f"→ step's MLflow run opened median {statistics.median(lat):.2f} s, max {max(lat):.2f} s")
        print("\nper task (medians): the step in the single process; under the scheduler the task's duration and"
              "\nits start → the step's MLflow run opened (its first line of work: imports and set-up behind it)")
        print(f"{'task':<20}{'one process':>12}" + "".join(f"{n + ' task':>12}{n + ' start':>13}" for n in shapes))
        for s in STEPS:
            row = f"{s:<20}{step[s]:>10.2f} s"
            for shape in shapes.values():
                dur = statistics.median(r["tasks"][s] for r in shape[PIPELINE])
                lat = [r["latency"][s] for r in shape[PIPELINE] if s in r["latency"]]
                row += f"{dur:>10.2f} s" + (f"{statistics.median(lat):>11.2f} s" if lat else f"{'-':>13}")
            print(row)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Simulation wall time against shard count on the production shape (PostgreSQL, Redis, MLflow
server, Airflow with the CeleryExecutor) with 1 and with 2 Celery workers, and where the time goes.

The scenario set is the shipped one with every entry repeated EPISODE_FACTOR times (default 40:
1,040 episodes). For each worker count the shape starts once; one pipeline per shard count (1, 2,
4; the same data, so the same model) runs once, one after another. Simulation wall = first
``simulate`` task start → the simulation result (``simulate``'s end unsharded, ``merge_simulation``'s
end sharded). Where it goes, per shard: the job's own time (launch → result: its process start,
imports, model load and the episodes) and the task's (start → end: its start, the launch, the
deferral while the job runs, the collect); the merge. Episodes per second per core comes from the simulator in this process.
Each shard count runs twice: one round of the catalog, and with ``simulation.adaptive`` (rounds until the
confidence gates decide, fanned out over the shards; "episodes" counts what the jobs simulated).
Usage: ``python benchmarks/simulation_shards.py [EPISODE_FACTOR]``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import full_run_project  # noqa: E402

FACTOR = int(sys.argv[1]) if len(sys.argv) > 1 else 40
SHARDS = (1, 2, 4)
ADAPTIVE_MAX = 1000
"""With ``simulation.adaptive``: at most this many episodes per catalog repeat (x EPISODE_FACTOR)."""
TMP = Path(tempfile.mkdtemp(prefix="closedloop-bench-shards-"))
os.environ.pop("CLOSEDLOOP_FAULTS", None)


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def project() -> Path:
    import yaml

    root = full_run_project(TMP / "project")
    scenarios = root / "include" / "scenarios"
    cat = yaml.safe_load((scenarios / "standard.yaml").read_text())
    cat["scenarios"] = [{**e, "repeats": int(e["repeats"]) * FACTOR} for e in cat["scenarios"]]
    (scenarios / "bench.yaml").write_text(yaml.safe_dump(cat))
    base = (root / "include" / "pipelines" / "acc_longitudinal.yaml").read_text()
    (root / "include" / "pipelines" / "acc_longitudinal.yaml").unlink()
    import re

    base = re.sub(r"^  adaptive: .*\n", "", base, flags=re.M)  # full_run_project took the shards out
    for n in SHARDS:
        for adaptive in (False, True):
            name = f"acc_shards_{n}" + ("_adaptive" if adaptive else "")
            text = base.replace("name: acc_longitudinal\n", f"name: {name}\n").replace(
                "name: acc_longitudinal_policy", f"name: {name}_policy").replace(
                'schedule: "0 3 * * 1"', "schedule: null").replace(
                "scenario_set: standard", "scenario_set: bench" + (f"\n  shards: {{count: {n}}}" if n > 1 else "")
                + (f"\n  adaptive: {{max_episodes: {ADAPTIVE_MAX * FACTOR}}}" if adaptive else ""))
            if not adaptive:  # one round of the catalog: the point-estimate gates of a plain simulation
                text = re.sub(r"^    confidence: .*\n", "", text, flags=re.M)
            (root / "include" / "pipelines" / f"{name}.yaml").write_text(text)
    return root


def episodes_per_second() -> tuple[int, float]:
    """The simulator alone, in this process (one core): the whole catalog with the trained policy."""
    from datetime import date

    import yaml

    from closedloop.driving.labels import expert_acceleration
    from closedloop.driving.logs import synthesize_drive_logs
    from closedloop.driving.policy import train_policy
    from closedloop.driving.simulator import run_catalog

    raw = synthesize_drive_logs(sources=["fleet-eu", "fleet-us"], window_start=date(2026, 11, 9),
                                window_end=date(2026, 11, 23), scenarios=["cruise", "cut_in", "hard_braking",
                                                                          "stop_and_go"], episodes_per_day=1, seed=7)
    model = train_policy(expert_acceleration(raw, version="2", smoothing_window=5), max_iter=150)
    cat = yaml.safe_load((TMP / "project" / "include" / "scenarios" / "bench.yaml").read_text())
    times = []
    for _ in range(3):
        started = time.perf_counter()
        n = len(run_catalog(model, cat)["episodes"])
        times.append(time.perf_counter() - started)
    return n, n / statistics.median(times)


def measure(workers: int, root: Path) -> list[dict]:
    from urllib.parse import quote

    from closedloop.local.prodlike import ProdLike

    shape = ProdLike(TMP / f"shape-{workers}", root / "dags", {"admin": ("admin", "admin-pw")}, workers=workers,
                     concurrency=4)
    shape.start()
    out = []
    try:
        af = shape.airflow
        for n, adaptive in [(n, a) for a in (False, True) for n in SHARDS]:
            dag = f"acc_shards_{n}" + ("_adaptive" if adaptive else "")
            af.wait_for(lambda dag=dag: af.api("GET", f"/api/v2/dags/{dag}")[0] == 200, 180, "DAG parsed")
            af.api("PATCH", f"/api/v2/dags/{dag}", {"is_paused": False})
            status, run = af.api("POST", f"/api/v2/dags/{dag}/dagRuns", {"logical_date": None})
            assert status == 200, run
            rid = quote(run["dag_run_id"], safe="")

            def done(dag=dag, rid=rid):
                r = af.api("GET", f"/api/v2/dags/{dag}/dagRuns/{rid}")[1]
                return r if r["state"] in ("success", "failed") else None

            finished = af.wait_for(done, 1800, f"the run of {dag}", interval=2)
            tis = af.api("GET", f"/api/v2/dags/{dag}/dagRuns/{rid}/taskInstances")[1]["task_instances"]
            sims = [t for t in tis if t["task_id"] == "simulate"]
            merge = next((t for t in tis if t["task_id"] == "merge_simulation"), None)
            start = min(ts(t["start_date"]) for t in sims)
            end = ts((merge or max(sims, key=lambda t: t["end_date"]))["end_date"])
            jobs = []
            for t in sims:
                job = Path(str(TMP / f"shape-{workers}"))  # the shape's data root
                suffix = "" if n == 1 else f"-{max(t['map_index'], 0)}-of-{n}"
                found = list(job.rglob(f"{dag}/jobs/*/simulate{suffix}/job.json"))
                record = [json.loads(p.read_text()) for p in found]
                launched = max((r.get("launched_at") or 0) for r in record) if record else None
                result = [p.parent / "result.json" for p in found if (p.parent / "result.json").exists()]
                work = (max(p.stat().st_mtime for p in result) - launched) if result and launched else None
                episodes = len(json.loads(result[0].read_text())["episodes"]) if result else None
                jobs.append({"task": ts(t["end_date"]) - ts(t["start_date"]), "job": work, "episodes": episodes})
            out.append({"shards": n, "adaptive": adaptive, "workers": workers, "state": finished["state"],
                        "wall": end - start, "simulated": sum(j["episodes"] or 0 for j in jobs),
                        "merge": ts(merge["end_date"]) - ts(merge["start_date"]) if merge else 0.0, "jobs": jobs})
    finally:
        shape.stop()
    return out


def main() -> None:
    root = project()
    results = [r for w in (1, 2) for r in measure(w, root)]
    episodes, eps = episodes_per_second()
    print(f"\nsimulation of {episodes:,} episodes (the shipped scenario set x{FACTOR}) on the production shape, "
          "2 cores; one run per row:")
    print(f"  {'workers':>7} {'shards':>6} {'adaptive':>8} {'episodes':>8} {'wall s':>7} {'job s (max)':>11} "
          f"{'task s (max)':>12} {'merge s':>7}  run (its gates judge the bigger catalog)")
    for r in results:
        jobs = r["jobs"]
        print(f"  {r['workers']:>7} {r['shards']:>6} {'yes' if r['adaptive'] else 'no':>8} {r['simulated']:>8,} "
              f"{r['wall']:>7.1f} {max(j['job'] or 0 for j in jobs):>11.1f} {max(j['task'] for j in jobs):>12.1f} "
              f"{r['merge']:>7.1f}  {r['state']}")
    print(f"\nthe simulator alone: {eps:,.0f} episodes/s on one core ({episodes:,} episodes in "
          f"{episodes / eps:.2f} s, median of 3)")
    base = next(r for r in results if r["workers"] == 2 and r["shards"] == 1 and not r["adaptive"])
    overhead = base["wall"] - max(j["job"] or 0 for j in base["jobs"])
    print(f"projection: wall(N workers, N shards) ~= {overhead:.1f} s (scheduling, task start, launch, collect; "
          f"measured unsharded) + merge + work / N; work here {episodes / eps:.1f} s, so sharding pays once the "
          "work per run is well above the per-shard start (a real simulator's episode takes seconds, not "
          f"{1000 / eps:.2f} ms)")


if __name__ == "__main__":
    main()

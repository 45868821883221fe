"""Incident → run, under a real scheduler, triggerer, DAG processor and API server (LocalExecutor,
SQLite, 127.0.0.1) on the embedded default.

1. The demo incident (a hard-braking collision) posted through the REST API: time from the asset
   event to the incident run's creation, to its first task starting, and to the candidate
   (``register_candidate`` finished) — the incident-to-candidate lead time, with each task's
   duration.
2. Event-to-first-task latency, median of several: more incidents of the same scenario type,
   posted one at a time (each is debounced by the first, so only ``admit_incident`` runs and the
   machine is otherwise idle).

Prints figures; asserts nothing.
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
REPEATS = 7


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def main() -> int:
    from closedloop.local.server import AirflowServer
    from closedloop.records.runs import incident_asset_id, wait_for_run

    tmp = Path(tempfile.mkdtemp(prefix="closedloop-bench-incident-"))
    root = tmp / "project"
    shutil.copytree(PROJECT / "dags", root / "dags")
    shutil.copytree(PROJECT / "include", root / "include")
    path = root / "include" / "pipelines" / "acc_longitudinal.yaml"
    path.write_text(re.sub(r"\napproval:\n(  .*\n)+", "\n", path.read_text()))  # ends at the candidate
    server = AirflowServer(tmp, root / "dags", {"admin": ("admin", "admin-pw"), "fleet-monitor": ("op", "fm-pw")})
    print(f"starting Airflow in {tmp} ...", flush=True)
    server.start()
    try:
        dag_id, model = "acc_longitudinal_incident", "acc_longitudinal_policy"
        api = server.client("fleet-monitor")
        server.wait_for(lambda: server.api("GET", f"/api/v2/dags/{dag_id}")[0] == 200, 120, "incident DAG")
        asset_id = incident_asset_id(api, model)

        def post(n: int) -> tuple[dict, dict]:
            status, event = api.call("POST", "/assets/events", {"asset_id": asset_id, "extra": {
                "id": f"BENCH-{n}", "model": model, "scenario_type": "hard_braking", "severity": "high",
                "kind": "collision", "log_refs": [f"s3://fleet/bench/{n}.mcap"]}})
            assert status == 200, event
            run = wait_for_run(api, dag_id, event["id"], 120)
            assert run is not None, "no run took the event"
            return event, run

        def ti(run_id: str, task_id: str, states=("success", "failed", "skipped")) -> dict:
            def done():
                status, t = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
                return t if status == 200 and t.get("state") in states else None
            return server.wait_for(done, 900, f"{task_id} of {run_id}", interval=0.5)

        event, run = post(0)
        posted = ts(event["timestamp"])
        admit = ti(run["dag_run_id"], "admit_incident")
        register = ti(run["dag_run_id"], "register_candidate")
        _, tis = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run['dag_run_id']}/taskInstances")
        _, dr = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run['dag_run_id']}")
        print("\n1. the demo incident (hard-braking collision), no review step:")
        print(f"   event → run created        {(ts(dr['queued_at']) - posted).total_seconds():6.1f} s")
        print(f"   event → first task started {(ts(admit['start_date']) - posted).total_seconds():6.1f} s")
        print(f"   event → candidate          {(ts(register['end_date']) - posted).total_seconds():6.1f} s "
              f"(register_candidate {register['state']})")
        print("   task durations (queued → end, and running time):")
        for t in sorted(tis["task_instances"], key=lambda t: t["start_date"] or ""):
            if t["start_date"] and t["end_date"]:
                run_s = (ts(t["end_date"]) - ts(t["start_date"])).total_seconds()
                wait_s = (ts(t["start_date"]) - ts(t["queued_when"])).total_seconds() if t.get("queued_when") else 0
                queued = f"queued {wait_s:5.1f} s" if wait_s >= 0 else "(deferred)  "  # simulate: queued twice
                print(f"     {t['task_id']:<20} {queued}  start→end {run_s:6.1f} s")

        created, started = [], []
        for n in range(1, REPEATS + 1):
            time.sleep(3)
            event, run = post(n)
            admit = ti(run["dag_run_id"], "admit_incident")
            _, dr = server.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run['dag_run_id']}")
            created.append((ts(dr["queued_at"]) - ts(event["timestamp"])).total_seconds())
            started.append((ts(admit["start_date"]) - ts(event["timestamp"])).total_seconds())
        print(f"\n2. event → first task, {REPEATS} incidents posted one at a time (debounced after admission):")
        print(f"   event → run created         median {statistics.median(created):5.2f} s  "
              f"(min {min(created):.2f}, max {max(created):.2f})")
        print(f"   event → admit_incident runs median {statistics.median(started):5.2f} s  "
              f"(min {min(started):.2f}, max {max(started):.2f})")
        return 0
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: the whole governed path, non-interactively, through a real local Airflow.

request (as ``ml-engineer``, REST) → data, training, evaluation, simulation, gates →
candidate → review: ``safety-lead`` approves through the REST API → ``promote`` → production,
then the run summary and the version's audit trail.
"""

from __future__ import annotations

import sys
import time

from closedloop.localrun import collect_summary
from closedloop.report import format_summary

PIPELINE = "acc_longitudinal"
REQUESTER, REVIEWER = "ml-engineer", "safety-lead"
SETTLE_SECONDS = 5


def _task_states(server, run_id: str) -> dict[str, str]:
    tis = server.client("admin").get(f"/dags/{PIPELINE}/dagRuns/{run_id}/taskInstances")["task_instances"]
    return {t["task_id"]: t["state"] for t in tis}


def _progress(states: dict[str, str], shown: dict[str, str]) -> None:
    for task, state in states.items():
        if state and shown.get(task) != state:
            shown[task] = state
            print(f"  {time.strftime('%H:%M:%S')}  {task:<20} {state}", flush=True)


def run() -> int:
    from closedloop import settings
    from closedloop.governance_cli import format_audit
    from closedloop.localserver import local_server
    from closedloop.request import validate_request
    from closedloop.steps.context import RunContext
    from closedloop.steps.governance import audit_trail

    server = local_server()
    print(f"starting a local Airflow on {server.url} (scheduler, triggerer, API server; log {server.log}) ...",
          flush=True)
    server.start()
    try:
        admin, requester, reviewer = (server.client(u) for u in ("admin", REQUESTER, REVIEWER))
        server.wait_for(lambda: admin.get(f"/dags/{PIPELINE}", missing_ok=True), 120, "the DAG to be parsed")
        admin.call("PATCH", f"/dags/{PIPELINE}", {"is_paused": False})
        conf = validate_request({
            "purpose": "Keep the ACC policy current with two more weeks of fleet logs.",
            "change": ["data"], "expected_impact": "Equal or better imitation error; zero collisions in simulation.",
            "scope": "EU and US fleets, highway and urban car-following", "ticket": "DEMO-1"})
        status, run = requester.call("POST", f"/dags/{PIPELINE}/dagRuns", {"logical_date": None, "conf": conf})
        if status != 200:
            print(f"error: the request was refused (HTTP {status}): {run}", file=sys.stderr)
            return 1
        run_id = run["dag_run_id"]
        print(f"\n{REQUESTER} requested run {run_id} of {PIPELINE}: {conf['purpose']}", flush=True)
        shown: dict[str, str] = {}

        def at_review():
            states = _task_states(server, run_id)
            _progress(states, shown)
            if states.get("approval") == "awaiting_input":
                return True
            return "failed" if any(s in ("failed", "upstream_failed") for s in states.values()) else None

        if server.wait_for(at_review, 900, "the run to reach the review", interval=1.0) == "failed":
            print("the run failed before review", file=sys.stderr)
        else:
            # A person needs seconds to decide; answering within ~1 s of the task parking can race
            # the scheduler's processing of the parked workload's exit in Airflow 3.3 (the task is
            # then failed as "state changed externally"). Give the scheduler a few loops first.
            time.sleep(SETTLE_SECONDS)
            path = f"/dags/{PIPELINE}/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails"
            status, _ = requester.call("PATCH", path, {"chosen_options": ["Approve"], "params_input": {}})
            print(f"\n{REQUESTER} tries to approve their own request: HTTP {status} (refused by Airflow)")
            status, resp = reviewer.call("PATCH", path, {"chosen_options": ["Approve"], "params_input": {
                "comment": "Gates green, simulation clean; approved for production."}})
            print(f"{REVIEWER} approves through the REST API: HTTP {status}\n", flush=True)

            def finished():
                states = _task_states(server, run_id)
                _progress(states, shown)
                r = admin.get(f"/dags/{PIPELINE}/dagRuns/{run_id}")
                return r["state"] if r["state"] in ("success", "failed") else None

            server.wait_for(finished, 300, "the run to finish", interval=1.0)
        summary = collect_summary(PIPELINE, run_id)
        print(format_summary(summary))
        reg = (summary["results"] or {}).get("register_candidate")
        if reg:
            ctx = RunContext(pipeline=PIPELINE, template_digest="", dag_id=PIPELINE, run_id=run_id,
                             tracking_uri=settings.tracking_uri())
            print("\n" + format_audit(audit_trail(ctx, reg["model"], reg["version"])))
        promoted = (summary["results"] or {}).get("promote")
        ok = summary["state"] == "success" and bool(promoted)
        print(f"\n{'OK' if ok else 'FAILED'}: " + (f"{promoted['model']} version {promoted['version']} is in production."
                                                 if ok else "nothing was promoted."))
        print("Next: `make airflow` opens the Airflow UI (and MLflow) on these stores; logins are printed there.")
        return 0 if ok else 1
    finally:
        server.stop()

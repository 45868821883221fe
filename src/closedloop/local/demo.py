"""``make demo``: the closed loop, non-interactively, through a real local Airflow.

1. The weekly retrain of ``acc_longitudinal`` (the scheduler's run for the latest Monday slot)
   trains on fleet logs where emergency stops are rare: its model is stopped by the statistical
   hard-braking gate (the confidence bound and the counts behind it), and nothing is registered.
2. ``fleet-monitor`` reports a hard-braking collision as an incident (an Airflow asset event).
   The incident DAG admits it, mines 20x more hard-braking logs, simulates until every
   confidence gate is decided (rounds fanned out over the simulation shards) and registers a
   candidate. ``ml-engineer`` (not a reviewer) is refused by Airflow; ``safety-lead`` and
   ``safety-deputy`` approve (the two-person rule); ``promote`` moves ``production``.
3. A weekly run that ``ml-engineer`` requests through the REST API, on a fleet whose conditions
   shifted (last summer's holiday traffic: Airflow runs no logical date in the future), is compared with that production version: its distribution-shift report, its deltas against production,
   and the decision the gates reach. Then: lead times, outcomes, the version's audit trail.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime

from closedloop import pipeline, settings, vocab
from closedloop.local.run import collect_summary
from closedloop.records.render import format_summary

PIPELINE = "acc_longitudinal"
INCIDENT_DAG = f"{PIPELINE}_incident"
MODEL = "acc_longitudinal_policy"
REQUESTER, REVIEWER, REPORTER = "ml-engineer", "safety-lead", "fleet-monitor"
SECOND_REVIEWER = "safety-deputy"
SETTLE_SECONDS = 3
INCIDENT = {
    "model": MODEL, "scenario_type": "hard_braking", "severity": "high", "kind": "collision",
    "vehicle": "veh-0042", "occurred_at": "2026-11-25T17:42:10Z",
    "log_refs": ["s3://fleet-logs/eu/2026-11-25/veh-0042/clip-0193.mcap"],
    "description": "Rear-end collision: the lead vehicle braked at 8 m/s², ACC reacted too late.",
    # what the fleet's logs say happened: it becomes a regression scenario every later candidate must pass
    "scenario": {"params": {"decel": 8.0}, "seed": 500},
}


def _states(server, dag_id: str, run_id: str) -> dict[str, str]:
    tis = server.client("admin").get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
    return {t["task_id"]: t["state"] for t in tis}


def _follow(server, dag_id: str, run_id: str, until, timeout: float, what: str):
    shown: dict[str, str] = {}

    def check():
        states = _states(server, dag_id, run_id)
        for task, state in states.items():
            if state and shown.get(task) != state:
                shown[task] = state
                print(f"  {time.strftime('%H:%M:%S')}  {task:<20} {state}", flush=True)
        return until(states)

    return server.wait_for(check, timeout, what, interval=1.0)


def _run_done(server, dag_id, run_id):
    def done(states):
        r = server.client("admin").get(f"/dags/{dag_id}/dagRuns/{run_id}")
        return r["state"] if r["state"] in ("success", "failed") else None
    return done


def _released(server, admin) -> None:
    """The hand-off: the example release DAG ran on the production event and verified the dossier."""
    from closedloop.operators.release import RELEASE_DAG_ID

    def finished():
        runs = admin.get(f"/dags/{RELEASE_DAG_ID}/dagRuns?limit=5&order_by=-start_date", missing_ok=True) or {}
        return next((r for r in runs.get("dag_runs") or [] if r["state"] in ("success", "failed")), None)

    run = server.wait_for(finished, 120, f"the {RELEASE_DAG_ID} run on the production event")
    print(f"release hand-off: {RELEASE_DAG_ID} ran on the production event ({run['state']}): "
          + ("verified the version's release dossier with the pinned public key, then deployed it to "
             f"{settings.home() / 'deployed'}" if run["state"] == "success" else "the dossier did not verify; "
             "nothing deployed (see its task log)"), flush=True)


def _approve_second(server, client, dag_id: str, run_id: str) -> int:
    """The second approver answers the review that waits for a second approval (with
    ``approval.required: 2`` the first answer opens it)."""
    def waiting():
        return _states(server, dag_id, run_id).get("approval_2") == "awaiting_input"

    server.wait_for(waiting, 120, "the second review")
    time.sleep(SETTLE_SECONDS)
    path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approval_2/-1/hitlDetails"
    status, _ = client.call("PATCH", path, {"chosen_options": ["Approve"], "params_input": {
        "comment": "Second approval: evidence reviewed."}})
    return status


def _gates(summary: dict) -> list[dict]:
    """The release gate's report of a run (a stopped run's is in the task's error)."""
    gate = (summary["results"] or {}).get("release_gate")
    if gate:
        return gate["report"]
    for t in summary["tasks"]:
        if t["task_id"] == "release_gate" and (t.get("error") or {}).get("report"):
            return t["error"]["report"]
    return []


def _evidence(report: list[dict], failed_only: bool) -> list[str]:
    """The statistical gates' evidence, one line each: counts, bound, limit, verdict."""
    from closedloop.steps.gates import limit_of, verdict_of

    lines = []
    for r in report:
        if r.get("upper") is None or (failed_only and r.get("passed")):
            continue
        lower, upper = r["lower"] * 100, r["upper"] * 100
        if r.get("max") is not None and r["lower"] > r["max"]:
            bound = f"lower bound {lower:.3g} %: over the limit whatever more episodes show"
        elif r.get("max") is not None:
            bound = f"upper bound {upper:.3g} %" + ("" if r.get("passed") else ": more episodes could still pass it")
        else:
            bound = f"lower bound {lower:.3g} %"
        lines.append(f"  {verdict_of(r).upper():<4} {r['metric']}: {r['events']:,} collision(s) in {r['trials']:,} "
                     f"episodes; {bound}; limit {limit_of(r)}")
    return lines


def specs_schedule(pipeline: str) -> str:
    """The cron schedule the template of ``pipeline`` gives its DAG."""
    from closedloop.spec import load_all

    return next(s.spec.schedule for s in load_all(settings.pipelines_dir())[0] if s.spec.name == pipeline)


def _latest_slot(schedule: str) -> datetime:
    """The schedule's latest slot that is over (UTC)."""
    from datetime import UTC

    from croniter import croniter

    return croniter(schedule, datetime.now(UTC)).get_prev(datetime)


def _summer_monday() -> datetime:
    """03:00 UTC on the first Monday of the last July that is over (the schedule's slot in the summer
    holidays; Airflow runs no logical date in the future)."""
    from datetime import UTC, timedelta

    now = datetime.now(UTC)
    day = datetime(now.year if now.month > 8 else now.year - 1, 7, 1, 3, 0, tzinfo=UTC)
    return day + timedelta(days=(7 - day.weekday()) % 7)


def _shift_report(pipeline: str, run_id: str) -> str:
    """The run's distribution shift against production's training data (its release gate's MLflow run)."""
    from closedloop import settings
    from closedloop.runtime.tracking import literal, mlflow_client

    c = mlflow_client(settings.tracking_uri())
    exp = c.get_experiment_by_name(vocab.experiment_name(pipeline))
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{vocab.AIRFLOW_RUN_ID}` = {literal(run_id)} and "
                                                             f"tags.`{vocab.STEP}` = 'release_gate'")
    if not runs:
        return "shift against production: no release gate run"
    m = runs[0].data.metrics
    psi = sorted(((k.split(".")[1], v) for k, v in m.items() if k.startswith(vocab.SHIFT) and k.endswith(".psi")),
                 key=lambda kv: -kv[1])
    compared = runs[0].data.tags.get(vocab.COMPARED_TO_PRODUCTION, "?")
    return (f"distribution shift of the training data against production (version {compared}), PSI "
            "(< 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted):\n"
            + "\n".join(f"  {name:<14} {value:6.3f}  {'shifted' if value > 0.25 else 'moderate' if value > 0.1 else 'stable'}"
                         for name, value in psi))


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def run() -> int:
    from closedloop import settings
    from closedloop.local.server import local_server
    from closedloop.records.audit import audit_trail
    from closedloop.records.render import format_audit
    from closedloop.records.runs import post_incident, wait_for_run
    from closedloop.runtime.context import RunContext
    from closedloop.spec import load_all
    from closedloop.spec.incident import parse_incident, routes_of

    server = local_server()
    print(f"starting a local Airflow on {server.url} (scheduler, triggerer, DAG processor, API server; "
          f"log {server.log}) ...", flush=True)
    server.start()
    try:
        admin, requester, reviewer, reporter = (server.client(u) for u in ("admin", REQUESTER, REVIEWER, REPORTER))
        for dag_id in (PIPELINE, INCIDENT_DAG):
            server.wait_for(lambda d=dag_id: admin.get(f"/dags/{d}", missing_ok=True), 120, f"DAG {dag_id}")
            admin.call("PATCH", f"/dags/{dag_id}", {"is_paused": False})

        print(f"\n[1/3] the weekly retrain of {PIPELINE}: the scheduler starts it for the latest Monday slot "
              "(the template's standing request)", flush=True)

        def scheduled():
            runs = admin.get(f"/dags/{PIPELINE}/dagRuns?limit=10")["dag_runs"]
            return next((r for r in runs if r.get("run_type") in ("scheduled", "backfill")), None)

        try:
            run = server.wait_for(scheduled, 20, "the scheduler's run of the latest slot")
        except TimeoutError:
            run = None
        if run is None:
            # Airflow 3 runs a missed slot on unpause only within a tenth of the interval after it (catchup off):
            # on any other day the latest Monday slot is run as Airflow's one-slot backfill of it
            slot = _latest_slot(specs_schedule(PIPELINE))
            status, body = admin.call("POST", "/backfills", {"dag_id": PIPELINE, "from_date": slot.isoformat(),
                                                            "to_date": slot.isoformat(), "max_active_runs": 1})
            if status != 200:
                print(f"error: Airflow refused the backfill of the slot {slot.isoformat()}: {body}", file=sys.stderr)
                return 1
            print(f"  (the slot {slot:%Y-%m-%d %H:%M} UTC was missed while the DAG was paused: Airflow's one-slot "
                  "backfill runs it)", flush=True)
            run = server.wait_for(scheduled, 120, "the weekly run of the latest slot")
        periodic_id = run["dag_run_id"]
        _follow(server, PIPELINE, periodic_id, _run_done(server, PIPELINE, periodic_id), 900, "the weekly run")
        periodic = collect_summary(PIPELINE, periodic_id)
        print(format_summary(periodic))
        stopped_by = _evidence(_gates(periodic), failed_only=True)
        print("\nstopped by a statistical gate, on its evidence (a rate judged by its 95 % confidence bound, not by "
              "a few clean episodes):\n" + ("\n".join(stopped_by) or "  (none: the weekly model was not stopped)"))

        print(f"\n[2/3] {REPORTER} reports a hard-braking collision from the fleet (through the plugin: a viewer, no op)", flush=True)
        specs, _ = load_all(settings.pipelines_dir())
        incident = parse_incident({**INCIDENT, "id": f"INC-{time.strftime('%Y%m%d-%H%M%S')}",
                                   "reported_by": REPORTER}, routes_of(specs))
        event = post_incident(reporter, incident)
        print(f"  incident {incident['id']} → asset event {event['id']} at {event['timestamp']}", flush=True)
        incident_run = wait_for_run(admin, INCIDENT_DAG, event["id"], 120)
        if incident_run is None:
            print("error: no incident run started", file=sys.stderr)
            return 1
        incident_id = incident_run["dag_run_id"]
        print(f"  started {INCIDENT_DAG} run {incident_id}", flush=True)

        def at_review(states):
            if states.get("approval") == "awaiting_input":
                return "review"
            return "failed" if any(s in ("failed", "upstream_failed") for s in states.values()) else None

        reached = _follow(server, INCIDENT_DAG, incident_id, at_review, 900, "the incident run to reach review")
        if reached == "review":
            print("\n      review of the candidate (assigned: the template's approvers; two must approve)", flush=True)
            # A person needs seconds to decide; answering within ~1 s of the task parking can race
            # the scheduler's processing of the parked workload's exit in Airflow 3.3 (the task is
            # then failed as "state changed externally"). Give the scheduler a few loops first.
            time.sleep(SETTLE_SECONDS)
            path = f"/dags/{INCIDENT_DAG}/dagRuns/{incident_id}/taskInstances/approval/-1/hitlDetails"
            status, _ = requester.call("PATCH", path, {"chosen_options": ["Approve"], "params_input": {}})
            print(f"  {REQUESTER} tries to approve: HTTP {status} (refused by Airflow: not a reviewer)")
            status, _ = reviewer.call("PATCH", path, {"chosen_options": ["Approve"], "params_input": {
                "comment": "Hard-braking scenarios clean in simulation; approved for production."}})
            print(f"  {REVIEWER} approves through the REST API: HTTP {status}", flush=True)
            second = server.client(SECOND_REVIEWER)
            status = _approve_second(server, second, INCIDENT_DAG, incident_id)
            print(f"  {SECOND_REVIEWER} approves too (two distinct approvals needed): HTTP {status}\n", flush=True)
            _follow(server, INCIDENT_DAG, incident_id, _run_done(server, INCIDENT_DAG, incident_id), 300,
                    "the incident run to finish")
        summary = collect_summary(INCIDENT_DAG, incident_id)
        print(format_summary(summary))
        found = summary["results"] or {}
        sim = next((found[k] for k in pipeline.SIMULATION_RESULT if isinstance(found.get(k), dict)), None)
        rounds = (sim or {}).get("adaptive", {}).get("rounds") if isinstance(sim, dict) else None
        print(f"\nthe evidence behind each confidence gate (the adaptive budget simulated {rounds or '?'} round(s) of the "
              "catalog, until the last of them was decided):\n" + "\n".join(_evidence(_gates(summary), failed_only=False)))

        tis = {t["task_id"]: t for t in admin.get(
            f"/dags/{INCIDENT_DAG}/dagRuns/{incident_id}/taskInstances")["task_instances"]}
        posted = _ts(event["timestamp"])
        lead = {name: (_ts(tis[task]["end_date"]) - posted).total_seconds()
                for name, task in (("candidate", "register_candidate"), ("production", "promote"))
                if tis.get(task, {}).get("end_date") and tis[task]["state"] == "success"}
        first = (_ts(tis["admit_incident"]["start_date"]) - posted).total_seconds()
        print(f"\nlead times from the incident event: first task started after {first:.1f} s; "
              + ", ".join(f"{k} after {v:.0f} s" for k, v in lead.items())
              + (" (including the reviewer's decision)" if "production" in lead else ""))

        if (summary["results"] or {}).get("promote"):
            _released(server, admin)

        shifted_run = None
        if (summary["results"] or {}).get("promote"):
            summer = _summer_monday()
            print(f"\n[3/3] the weekly run over the fleet's summer logs (logical date {summer:%Y-%m-%d}: holiday "
                  "traffic, faster and denser than the logs production learnt from), compared with production",
                  flush=True)
            status, shifted_run = requester.call("POST", f"/dags/{PIPELINE}/dagRuns",
                                                 {"logical_date": summer.isoformat()})
            if status != 200:
                print(f"error: the run was refused (HTTP {status}): {shifted_run}", file=sys.stderr)
                return 1
            shifted_id = shifted_run["dag_run_id"]
            _follow(server, PIPELINE, shifted_id, _run_done(server, PIPELINE, shifted_id), 900, "the summer run")
            third = collect_summary(PIPELINE, shifted_id)
            print(format_summary(third))
            print("\n" + _shift_report(PIPELINE, shifted_id))

        from closedloop.records.health import outcome
        from closedloop.records.runs import origin

        weekly = admin.get(f"/dags/{PIPELINE}/dagRuns/{periodic_id}")
        said = outcome({"state": weekly["state"], "note": weekly.get("note")})
        print("\nwhat started each run, and how it ended (also: `closedloop runs acc_longitudinal`):")
        print(f"  {PIPELINE} {periodic_id}: {origin(admin, PIPELINE, run)} -> {said}"
              + (f" ({weekly['note']})" if said == "rejected" else ""))
        print(f"  {INCIDENT_DAG} {incident_id}: {origin(admin, INCIDENT_DAG, incident_run)} -> {summary['state']}")
        if shifted_run:
            later = admin.get(f"/dags/{PIPELINE}/dagRuns/{shifted_run['dag_run_id']}")
            said3 = outcome({"state": later["state"], "note": later.get("note")})
            print(f"  {PIPELINE} {later['dag_run_id']}: {origin(admin, PIPELINE, shifted_run)} -> {said3}"
                  + (f" ({later['note']})" if said3 == "rejected" else ""))

        reg = (summary["results"] or {}).get("register_candidate")
        if reg:
            ctx = RunContext(pipeline=PIPELINE, template_digest="", dag_id=INCIDENT_DAG, run_id=incident_id,
                             tracking_uri=settings.tracking_uri())
            print("\n" + format_audit(audit_trail(ctx, reg["model"], reg["version"])))
        promoted = (summary["results"] or {}).get("promote")
        card_ok = True
        if promoted:  # the model card in the registry, written from the records (data, metrics, incident, approver)
            from closedloop.runtime.tracking import mlflow_client

            mv = mlflow_client(settings.tracking_uri()).get_model_version(promoted["model"], promoted["version"])
            card = mv.description or ""
            wanted = [mv.tags.get(vocab.DATASET_VERSION, "?"), "## Metrics per scenario",
                      f"incident {incident['id']}", f"approved by {REVIEWER}"]
            card_ok = all(w in card for w in wanted)
            keep = [line for line in card.splitlines() if line.startswith(("# ", "- labelled", "| hard_braking",
                                                                           "- trained in answer", "- approved"))]
            print(f"\nmodel card of {promoted['model']} version {promoted['version']} (its MLflow registry "
                  "description):" + "".join(f"\n  {line}" for line in keep)
                  + ("" if card_ok else "\n  (INCOMPLETE: " + ", ".join(w for w in wanted if w not in card)
                     + " missing)"))
        gate_failed = periodic["state"] == "failed" and bool(stopped_by)
        compared = shifted_run is not None and any(r["metric"].startswith(vocab.SHIFT) and r.get("value") is not None
                                                   for r in _gates(collect_summary(PIPELINE, shifted_run["dag_run_id"])))
        ok = gate_failed and summary["state"] == "success" and bool(promoted) and card_ok and compared
        print(f"\n{'OK' if ok else 'FAILED'}: " + (
            f"the weekly model was stopped by a statistical gate; the incident retrain made {MODEL} "
            f"version {promoted['version']}, now in production; the summer run was compared with it (shift and "
            f"deltas) and the gates decided." if ok else "the loop did not close as expected."))
        print("Next: `make airflow` opens the Airflow UI (and MLflow) on these stores; logins are printed there.")
        return 0 if ok else 1
    finally:
        server.stop()

"""Pipeline health from Airflow's own records: runs, failure rate, queue wait, lead times,
retries, pending approvals — per pipeline (its periodic and incident DAGs) over a window.

:func:`figures` is pure: it takes run and task-instance records (dicts) and computes. Two
readers feed it: :func:`records_from_db` (the plugin, inside Airflow's API server) and
:func:`records_from_api` (``closedloop health``, through the REST API with your credentials).
"""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

from closedloop import vocab

RUN_FIELDS = ("dag_id", "run_id", "state", "run_type", "run_after", "queued_at", "start_date", "end_date", "note")
REJECTED = "rejected by gate"  # a run's note when a release gate stopped it (steps.gates.rejection_note)


def outcome(run: dict) -> str:
    """``success``, ``rejected`` (a release gate stopped the model: the pipeline did its job), ``failed``
    (an error) or ``other`` (still going)."""
    if run["state"] == "failed" and str(run.get("note") or "").startswith(REJECTED):
        return "rejected"
    return run["state"] if run["state"] in ("success", "failed") else "other"
TI_FIELDS = ("dag_id", "run_id", "task_id", "state", "try_number", "queued_dttm", "start_date", "end_date")


def _ts(value) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _seconds(a, b) -> float | None:
    a, b = _ts(a), _ts(b)
    return (b - a).total_seconds() if a and b and b >= a else None


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "median": None, "p95": None}
    ordered = sorted(values)
    return {"n": len(ordered), "median": round(statistics.median(ordered), 2),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2)}


def figures(pipelines: dict[str, list[str]], runs: list[dict], tis: list[dict], *, since: datetime,
            until: datetime) -> dict[str, Any]:
    """Health per pipeline.

    :param pipelines: pipeline name → its DAG ids (periodic first, then incident).
    :param runs: DAG run records (:data:`RUN_FIELDS`), :param tis: task instance records (:data:`TI_FIELDS`).
    """
    days = [(since + timedelta(days=i)).date().isoformat() for i in range((until.date() - since.date()).days + 1)]
    out: dict[str, Any] = {"since": since.isoformat(), "until": until.isoformat(), "days": days, "pipelines": {}}
    for name, dag_ids in pipelines.items():
        prs = [r for r in runs if r["dag_id"] in dag_ids]
        ptis = [t for t in tis if t["dag_id"] in dag_ids]
        by_run = {(r["dag_id"], r["run_id"]): r for r in prs}
        finished = [r for r in prs if r["state"] in ("success", "failed")]
        failed = [r for r in finished if outcome(r) == "failed"]
        rejected = [r for r in finished if outcome(r) == "rejected"]
        candidate = [_seconds(by_run[(t["dag_id"], t["run_id"])].get("queued_at") or by_run[(t["dag_id"], t["run_id"])]
                              ["run_after"], t["end_date"])
                     for t in ptis if t["task_id"] == "register_candidate" and t["state"] == "success"
                     and (t["dag_id"], t["run_id"]) in by_run]
        production = [_seconds(by_run[(t["dag_id"], t["run_id"])].get("queued_at"), t["end_date"])
                      for t in ptis if t["task_id"] == "promote" and t["state"] == "success"
                      and (t["dag_id"], t["run_id"]) in by_run and t["dag_id"] == dag_ids[-1] and len(dag_ids) > 1]
        per_day = {d: {"success": 0, "rejected": 0, "failed": 0, "other": 0} for d in days}
        for r in prs:
            day = (_ts(r["run_after"])).date().isoformat()
            if day in per_day:
                per_day[day][outcome(r)] += 1
        out["pipelines"][name] = {
            "dags": dag_ids,
            "runs": len(prs),
            "by_state": {s: sum(1 for r in prs if r["state"] == s) for s in sorted({r["state"] for r in prs})},
            "incident_runs": sum(1 for r in prs if len(dag_ids) > 1 and r["dag_id"] == dag_ids[-1]),
            "failure_rate": round(len(failed) / len(finished), 3) if finished else None,
            "gate_rejections": len(rejected),
            "gate_rejection_rate": round(len(rejected) / len(finished), 3) if finished else None,
            "rejected_by": _rejected_by(rejected),
            "queue_wait_s": _stats([s for t in ptis if (s := _seconds(t.get("queued_dttm"), t.get("start_date")))
                                    is not None]),
            "lead_time_to_candidate_s": _stats([s for s in candidate if s is not None]),
            "incident_to_production_s": _stats([s for s in production if s is not None]),
            "retries": sum(1 for t in ptis if (t.get("try_number") or 0) > 1),
            "pending_approvals": sum(1 for t in ptis if t["task_id"].startswith("approval")
                                     and t["state"] in ("awaiting_input", "deferred")),
            "per_day": per_day,
        }
    return out


def _rejected_by(rejected: list[dict]) -> dict[str, int]:
    """Gate metric → how many runs it stopped (from the runs' notes)."""
    out: dict[str, int] = {}
    for r in rejected:
        metrics = str(r.get("note"))[len(REJECTED):].split(":", 1)[0]
        for m in (x.strip() for x in metrics.split(",")):
            if m:
                out[m] = out.get(m, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def pipelines_of(specs) -> dict[str, list[str]]:
    return {s.spec.name: [s.spec.name] + ([s.spec.incident_dag_id] if s.spec.incidents else []) for s in specs}


def records_from_db(dag_ids: list[str], since: datetime) -> tuple[list[dict], list[dict]]:
    """Runs and task instances since ``since`` from Airflow's metadata database (API server side)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    def row(obj, fields) -> dict:
        return {f: getattr(getattr(obj, f), "value", getattr(obj, f)) for f in fields}  # enums → their values

    with create_session() as session:
        runs = [row(r, RUN_FIELDS)
                for r in session.scalars(select(DagRun).where(DagRun.dag_id.in_(dag_ids), DagRun.run_after >= since))]
        in_window = select(TaskInstance).join(
            DagRun, (DagRun.dag_id == TaskInstance.dag_id) & (DagRun.run_id == TaskInstance.run_id)
        ).where(TaskInstance.dag_id.in_(dag_ids), DagRun.run_after >= since)
        tis = [row(t, TI_FIELDS) for t in session.scalars(in_window)]
    return runs, tis


def records_from_api(api, dag_ids: list[str], since: datetime) -> tuple[list[dict], list[dict]]:
    """The same records through Airflow's REST API (``closedloop health``)."""
    runs, tis = [], []
    stamp = api.q(since.isoformat())
    for dag_id in dag_ids:
        found = api.get(f"/dags/{api.q(dag_id)}/dagRuns?run_after_gte={stamp}&limit=1000", missing_ok=True) or {}
        for r in found.get("dag_runs", []):
            runs.append({"dag_id": dag_id, "run_id": r["dag_run_id"], **{f: r.get(f) for f in RUN_FIELDS[2:]}})
        keys = {r["run_id"] for r in runs if r["dag_id"] == dag_id}
        listed = api.get(f"/dags/{api.q(dag_id)}/dagRuns/~/taskInstances?limit=1000", missing_ok=True) or {}
        for t in listed.get("task_instances", []):
            if t["dag_run_id"] in keys:
                tis.append({"dag_id": dag_id, "run_id": t["dag_run_id"], "task_id": t["task_id"], "state": t["state"],
                            "try_number": t.get("try_number"), "queued_dttm": t.get("queued_when"),
                            "start_date": t.get("start_date"), "end_date": t.get("end_date")})
    return runs, tis


def current_versions(specs, tracking_uri: str | None = None) -> dict[str, dict[str, str | None]]:
    """``production`` and ``candidate`` version of each pipeline's model (None where unset)."""
    from closedloop.runtime.tracking import mlflow_client

    c = mlflow_client(tracking_uri)
    out = {}
    for s in specs:
        try:
            aliases = c.get_registered_model(s.spec.model.name).aliases or {}
        except Exception:  # not registered yet
            aliases = {}
        out[s.spec.name] = {a: (str(aliases[a]) if a in aliases else None) for a in ("production", "candidate")}
        if s.spec.approval is not None and aliases:
            out[s.spec.name]["registry_problems"] = registry_problems(c, s.spec.model.name)
    return out


def registry_problems(client, model: str) -> list[str]:
    """Alias moves of ``model`` that no sealed record explains (:func:`~closedloop.steps.governance.check_aliases`)."""
    from closedloop.errors import EvidenceError
    from closedloop.runtime.signing import trusted_keys
    from closedloop.steps.governance import check_aliases

    try:
        verifier = trusted_keys()
    except EvidenceError as exc:
        return [f"cannot verify: {exc}"]
    return check_aliases(client, model, verifier)["problems"]


def recall_figures(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every recall: what it recalls, its state, how many versions it held when it opened, who opened and
    closed it and how long it was (or has been) open — newest first; [] when the keys cannot be read."""
    from closedloop.errors import EvidenceError
    from closedloop.runtime.signing import trusted_keys
    from closedloop.runtime.tracking import mlflow_client
    from closedloop.steps import recall

    try:
        ring = trusted_keys()
    except EvidenceError:
        return []
    c = mlflow_client(tracking_uri)
    out = []
    now = datetime.now(UTC)
    for r in recall.recalls(c, ring):
        closed = r.get("closed") or {}
        end = _ts(closed.get("closed_at")) or now
        held = c.get_run(r["mlflow_run_id"]).data.tags.get(vocab.RECALL_AFFECTED)
        out.append({"id": r["id"], "query": recall.Query.of(r["query"]).describe(), "state": r["state"],
                    "reason": r.get("reason"), "opened_by": r.get("opened_by"), "opened_at": r["opened_at"],
                    "closed_by": closed.get("closed_by"), "closed_at": closed.get("closed_at"),
                    "held_versions": int(held) if held and held.isdigit() else None,
                    "hours_open": round((end - _ts(r["opened_at"])).total_seconds() / 3600, 2)})
    return sorted(out, key=lambda r: r["opened_at"], reverse=True)


def cache_figures(specs, since: datetime, tracking_uri: str | None = None) -> dict[str, dict[str, Any]]:
    """Step-cache use per pipeline since ``since``, from the step runs' ``closedloop.cache`` tags in MLflow:
    hits, misses, runs with the cache off, the hit rate and the hits per step."""
    from closedloop.runtime.tracking import mlflow_client, pages

    c = mlflow_client(tracking_uri)
    ms = int(since.timestamp() * 1000)
    out: dict[str, dict[str, Any]] = {}
    for s in specs:
        exp = c.get_experiment_by_name(vocab.experiment_name(s.spec.name))
        counts = {"hit": 0, "miss": 0, "off": 0}
        by_step: dict[str, int] = {}
        if exp is not None:
            for state in counts:
                found = pages(lambda token, state=state, exp=exp: c.search_runs(
                    [exp.experiment_id], filter_string=f"tags.`closedloop.cache` = '{state}' and "
                    f"attributes.start_time >= {ms}", max_results=5000, page_token=token))
                counts[state] = len(found)
                if state == "hit":
                    for r in found:
                        step = r.data.tags.get(vocab.STEP, "?")
                        by_step[step] = by_step.get(step, 0) + 1
        looked = counts["hit"] + counts["miss"]
        out[s.spec.name] = {"hits": counts["hit"], "misses": counts["miss"], "off": counts["off"],
                            "hit_rate": round(counts["hit"] / looked, 3) if looked else None,
                            "hits_by_step": dict(sorted(by_step.items()))}
    return out



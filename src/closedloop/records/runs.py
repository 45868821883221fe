"""What Airflow's REST API says about runs, in words: what started a run, why it ended as it did,
the run an incident's asset event started; and posting an incident through the plugin."""

from __future__ import annotations

import time

from closedloop.records.airflow_api import AirflowAPI, AirflowAPIError, xcom_value
from closedloop.records.health import REJECTED


def incident_asset_id(api: AirflowAPI, model: str) -> int:
    from closedloop.spec.incident import asset_uri

    uri = asset_uri(model)
    data = api.get(f"/assets?uri_pattern={api.q(uri)}&limit=100")
    for asset in data.get("assets", []):
        if asset["uri"] == uri:
            return int(asset["id"])
    raise AirflowAPIError(f"Airflow does not know the incident asset {uri} yet: has the DAG processor parsed "
                          "the template's incident DAG? (`airflow dags list-import-errors` shows problems)")


def post_incident(api: AirflowAPI, incident: dict) -> dict:
    """Report a validated incident through the plugin (``POST /closedloop/api/incidents``: the caller must
    be one of the template's ``incidents.reporters``; no ``op`` role needed); return the event record."""
    status, data = api.call("POST", "/closedloop/api/incidents", incident, root=True)
    if status != 200:
        detail = data.get("detail") if isinstance(data, dict) else data
        raise AirflowAPIError(f"Airflow refused the incident (HTTP {status}): {detail}", status)
    return data


def wait_for_run(api: AirflowAPI, dag_id: str, event_id: int, timeout: float) -> dict | None:
    """The run that consumed asset event ``event_id`` (None if none within ``timeout``)."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        runs = api.get(f"/dags/{api.q(dag_id)}/dagRuns?order_by=-run_after&limit=20").get("dag_runs", [])
        for run in runs:
            if run["dag_run_id"] in seen:
                continue
            status, data = api.call("GET", f"{api.run_path(dag_id, run['dag_run_id'])}/upstreamAssetEvents")
            if status >= 500:  # a run being created this instant can answer 500 once: look again
                continue
            events = (data or {}).get("asset_events", []) if status == 200 else []
            if any(int(e["id"]) == int(event_id) for e in events):
                return run
            if run["state"] not in ("queued",):
                seen.add(run["dag_run_id"])
        time.sleep(0.5)
    return None


def origin(api: AirflowAPI, dag_id: str, run: dict) -> str:
    """What started one run, in words."""
    from closedloop.spec.incident import payload_of

    kind = run.get("run_type")
    if kind == "scheduled":
        return "schedule"
    if kind == "backfill":
        return "backfill"
    if kind == "manual":
        conf = run.get("conf") or {}
        who = run.get("triggering_user_name") or "?"
        if "incident" in conf:
            return f"manual incident by {who}"
        purpose = conf.get("purpose")
        return f"request by {who}: {str(purpose)[:60]}" if purpose else f"request by {who} (the standing request)"
    if kind == "asset_triggered":
        events = api.get(f"{api.run_path(dag_id, run['dag_run_id'])}/upstreamAssetEvents").get("asset_events", [])
        parts = []
        for e in events:
            p = payload_of(e.get("extra") or {})
            if isinstance(p, dict) and "scenario_type" in p:
                parts.append(f"incident {p.get('id') or '?'} ({p.get('kind', 'other')}, {p['scenario_type']}, "
                             f"{p.get('severity')}, by {p.get('reported_by') or '?'}; event {e['id']})")
            else:
                parts.append(f"asset event {e['id']}")
        return "; ".join(parts) or "asset event"
    return str(kind)


def admission_note(api: AirflowAPI, dag_id: str, run: dict) -> str:
    status, entry = api.call("GET", f"{api.run_path(dag_id, run['dag_run_id'])}/taskInstances/admit_incident/"
                                    "xcomEntries/return_value")
    value = xcom_value(entry) if status == 200 and isinstance(entry, dict) else None
    if not isinstance(value, dict):
        return "rejected (see admit_incident log)" if run.get("state") == "failed" else ""
    if value.get("admitted"):
        return "admitted, mining " + ", ".join(value.get("focus_types") or [])
    return "debounced → " + ", ".join(sorted(set((value.get("merged_into") or {}).values())))


def reason_of(api: AirflowAPI, dag_id: str, run: dict) -> str:
    """Why a run ended as it did: a gate's rejection (the run's note), or the tasks that failed with
    their error; empty for a run that succeeded or still goes."""
    if run.get("state") != "failed":
        return ""
    note = str(run.get("note") or "")
    if note.startswith(REJECTED):
        return note
    status, data = api.call("GET", f"{api.run_path(dag_id, run['dag_run_id'])}/taskInstances?state=failed")
    failed = [t["task_id"] for t in (data or {}).get("task_instances", [])] if status == 200 else []
    parts = []
    for task in failed[:3]:
        st, entry = api.call("GET", f"{api.run_path(dag_id, run['dag_run_id'])}/taskInstances/{task}/xcomEntries/error")
        err = xcom_value(entry) if st == 200 and isinstance(entry, dict) else None
        first = str((err or {}).get("message") or "").splitlines()[:1]
        parts.append(f"{task} failed" + (f" ({err.get('error_class')}: {first[0][:160]})" if err and first else ""))
    return "; ".join(parts) or (note or "failed (see the task logs)")

"""Incidents under a real scheduler, triggerer, DAG processor and API server on 127.0.0.1:
events posted through the REST API, files dropped in the inbox and a degraded production KPI
each start the incident DAG; repeats are debounced; malformed incidents start no retrain and
the watchers keep running; incident runs keep going while a periodic run holds the default pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from closedloop.local.server import AirflowServer
from tests.browser import Browser, chromium_path
from tests.conftest import NO_REVIEW, scratch_project, template_text

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PIPELINE, DAG, MODEL = "acc_evt", "acc_evt_incident", "acc_evt_model"
OTHER = "acc_other"  # a second pipeline (no runs): the one user "scoped" may read
# fleet-monitor keeps op here (events posted straight to Airflow's REST API are tested); "reporter" is what
# the deployment hands an incident reporter: a viewer named in the template's incidents.reporters
USERS = {"admin": "admin", "fleet-monitor": "op", "viewer1": "viewer", "scoped": "viewer", "reporter": "viewer"}
INCIDENT = {"model": MODEL, "scenario_type": "hard_braking", "severity": "high", "kind": "collision",
            "log_refs": ["s3://fleet/eu/veh-7/clip-1.mcap"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory, project):
    root = scratch_project(tmp_path_factory.mktemp("events-project"))
    (root / "include" / "pipelines" / f"{PIPELINE}.yaml").write_text(template_text(project, gates="point", **NO_REVIEW, **{
        'schedule: "0 3 * * 1"': "schedule: null", "name: acc_longitudinal": f"name: {PIPELINE}",
        "name: acc_longitudinal_policy": f"name: {MODEL}", "window_days: 14": "window_days: 3",
        "kpi_poll_seconds: 60": "kpi_poll_seconds: 2", "debounce_minutes: 30": "debounce_minutes: 1",
        "reporters: [fleet-monitor]": "reporters: [fleet-monitor, reporter]"}))
    (root / "include" / "pipelines" / f"{OTHER}.yaml").write_text(template_text(project, gates="point", incidents=False, **NO_REVIEW, **{
        'schedule: "0 3 * * 1"': "schedule: null", "name: acc_longitudinal": f"name: {OTHER}",
        "name: acc_longitudinal_policy": "name: acc_other_model"}))
    work = tmp_path_factory.mktemp("events-airflow")
    inbox = work / "inbox"
    # per-DAG rights as a deployment's auth manager gives them (tests/fixtures/auth.py: Airflow's
    # SimpleAuthManager plus a DAG list for "scoped"); fault drills the test may write (none at start)
    server = AirflowServer(work, root / "dags", {u: (r, f"{u}-pw") for u, r in USERS.items()},
                           env={"CLOSEDLOOP_INCIDENT_INBOX": str(inbox),
                                "AIRFLOW__CORE__AUTH_MANAGER": "tests.fixtures.auth.DagScopedAuthManager",
                                "PYTHONPATH": os.pathsep.join(filter(None, [str(project),
                                                                            os.environ.get("PYTHONPATH")])),
                                "CLOSEDLOOP_TEST_DAG_SCOPE": json.dumps({"scoped": [OTHER]}),
                                "CLOSEDLOOP_FAULTS": str(work / "faults.json")})
    server.start()
    try:
        server.wait_for(lambda: server.api("GET", f"/api/v2/dags/{DAG}")[0] == 200, 120, "incident DAG parsed")
        yield server, root, inbox
    finally:
        server.stop()


def runs(server) -> list[dict]:
    return server.api("GET", f"/api/v2/dags/{DAG}/dagRuns?order_by=run_after&limit=100")[1]["dag_runs"]


def admission(server, run_id: str) -> dict | None:
    from closedloop.records.airflow_api import xcom_value

    status, entry = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/admit_incident/"
                                      "xcomEntries/return_value")
    return xcom_value(entry) if status == 200 else None


def admit_state(server, run_id: str) -> str | None:
    status, ti = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/admit_incident")
    return ti.get("state") if status == 200 else None


def wait_runs(server, count: int, timeout: float = 120) -> list[dict]:
    """Wait until ``count`` incident runs exist and each one's admission has finished."""
    def ready():
        found = runs(server)
        done = [r for r in found if admit_state(server, r["dag_run_id"]) in ("success", "skipped", "failed")]
        return found if len(found) >= count and len(done) == len(found) else None

    return server.wait_for(ready, timeout, f"{count} admitted incident runs", interval=1.0)


def cli(server, *args: str, user: str = "fleet-monitor") -> subprocess.CompletedProcess:
    env = {**server.env, "AIRFLOW_API_URL": server.url, "AIRFLOW_USERNAME": user, "AIRFLOW_PASSWORD": f"{user}-pw"}
    return subprocess.run([sys.executable, "-m", "closedloop.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def asset_events(server) -> list[dict]:
    from closedloop.spec.incident import asset_uri

    _, assets = server.api("GET", f"/api/v2/assets?uri_pattern={asset_uri(MODEL)}")
    asset_id = assets["assets"][0]["id"]
    return server.api("GET", f"/api/v2/assets/events?asset_id={asset_id}&limit=100")[1]["asset_events"]


@pytest.fixture(scope="module")
def first_incidents(env) -> dict:
    """INC-1 posted through REST, then INC-2 (the same scenario type) a second later: the runs they
    started and each one's admission. Posted once per module, by whichever test asks first, before
    any other test posts a hard-braking incident: so each test of this module runs alone too."""
    server = env[0]
    from closedloop.records.runs import incident_asset_id

    before = {r["dag_run_id"] for r in runs(server)}
    asset_id = incident_asset_id(server.client("fleet-monitor"), MODEL)
    status, first = server.api("POST", "/api/v2/assets/events", {"asset_id": asset_id, "extra": {**INCIDENT, "id": "INC-1"}},
                               user="fleet-monitor")
    assert status == 200, first
    wait_runs(server, len(before) + 1)
    time.sleep(1)
    status, _ = server.api("POST", "/api/v2/assets/events", {"asset_id": asset_id, "extra": {**INCIDENT, "id": "INC-2"}},
                           user="fleet-monitor")
    assert status == 200
    found = wait_runs(server, len(before) + 2)
    return {r["dag_run_id"]: admission(server, r["dag_run_id"]) for r in found if r["dag_run_id"] not in before}


def inc1_run(decisions: dict) -> str:
    return next(r for r, d in decisions.items() if d and d.get("admitted") and d["incidents"][0]["id"] == "INC-1")


@pytest.fixture(scope="module")
def inc1_trained(env, first_incidents) -> str:
    """The run INC-1 started, once it has trained (its lineage exists either way its gates go)."""
    server = env[0]
    first = inc1_run(first_incidents)
    server.wait_for(lambda: server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{first}/taskInstances/train")
                    [1].get("state") in ("success", "failed"), 600, "INC-1's run to train")
    return first


def test_rest_incident_starts_one_run_and_a_repeat_is_debounced(env, first_incidents):
    server, root, _ = env
    from closedloop.records.runs import incident_asset_id

    asset_id = incident_asset_id(server.client("fleet-monitor"), MODEL)
    status, _ = server.api("POST", "/api/v2/assets/events", {"asset_id": asset_id, "extra": INCIDENT}, user="viewer1")
    assert status == 403  # posting incidents is an Airflow permission
    decisions = first_incidents
    assert len(decisions) == 2, decisions
    admitted = [r for r, d in decisions.items() if d and d["admitted"]]
    assert len(admitted) == 1, decisions
    first_run = admitted[0]
    assert [i["id"] for i in decisions[first_run]["incidents"]] == ["INC-1"]
    # who posted it comes from Airflow's audit log, whatever the payload claims (reported_by)
    assert decisions[first_run]["incidents"][0]["posted_by"] == "fleet-monitor"
    assert decisions[first_run]["focus_types"] == ["hard_braking"]
    debounced = [d for r, d in decisions.items() if r != first_run]
    assert debounced[0]["admitted"] is False and debounced[0]["merged_into"] == {"INC-2": first_run}
    # the incident run's tasks run in the incident pool, at high priority
    _, tis = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{first_run}/taskInstances")
    assert {(t["pool"], t["priority_weight"]) for t in tis["task_instances"]} == {("closedloop_incident", 100)}

    # `closedloop runs` says what started each run
    out = cli(server, "runs", PIPELINE, "--dir", str(root / "include" / "pipelines"))
    assert out.returncode == 0, out.stderr
    assert "incident INC-1 (collision, hard_braking, high" in out.stdout
    assert "[admitted, mining hard_braking]" in out.stdout and f"[debounced → {first_run}]" in out.stdout


def test_malformed_incidents_are_refused_and_start_no_retrain(env):
    server, root, _ = env
    before = len(asset_events(server))
    out = cli(server, "incident", "report", "--model", MODEL, "--severity", "urgent", "--kind", "collision",
              "--dir", str(root / "include" / "pipelines"))
    assert out.returncode == 2
    assert "scenario_type: required" in out.stderr and "severity: expected one of" in out.stderr
    assert len(asset_events(server)) == before  # the CLI posted nothing

    # posted straight to the REST API, a malformed incident reaches the DAG: admission refuses it
    n = len(runs(server))
    from closedloop.records.runs import incident_asset_id

    asset_id = incident_asset_id(server.client("fleet-monitor"), MODEL)
    server.api("POST", "/api/v2/assets/events", {"asset_id": asset_id, "extra": {
        "model": MODEL, "scenario_type": "drifting", "severity": "high"}}, user="fleet-monitor")
    found = wait_runs(server, n + 1)
    bad = found[-1]["dag_run_id"]
    assert admit_state(server, bad) == "failed"
    _, tis = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{bad}/taskInstances")
    assert {t["task_id"]: t["state"] for t in tis["task_instances"]}["generate_dataset"] in ("upstream_failed", None)
    _, err = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{bad}/taskInstances/admit_incident/xcomEntries/error")
    assert "scenario_type: 'drifting' is not a scenario type" in str(err["value"])


def test_inbox_file_starts_a_run_and_bad_files_are_set_aside(env):
    server, _, inbox = env
    n = len(runs(server))
    inbox.mkdir(exist_ok=True)
    (inbox / "garbage.json").write_text("{not json")
    (inbox / "unknown.json").write_text(json.dumps({**INCIDENT, "model": "no_such_model"}))
    from tests.fixtures.hostile import SECRET, plant

    hostile = plant(inbox, inbox.parent / "outside")  # a FIFO, links to /dev/zero and out, deep JSON...
    server.wait_for(lambda: all((inbox / "rejected" / f"{n}.error.txt").exists() for n in hostile), 60,
                    "the watcher to set every hostile file aside")
    good = {**INCIDENT, "id": "INC-INBOX-1", "scenario_type": "stop_and_go", "kind": "disengagement"}
    (inbox / ".good.json.tmp").write_text(json.dumps(good))
    os.replace(inbox / ".good.json.tmp", inbox / "good.json")
    found = wait_runs(server, n + 1)
    d = admission(server, found[-1]["dag_run_id"])
    assert d["admitted"] and d["incidents"][0]["id"] == "INC-INBOX-1"
    assert d["incidents"][0]["reported_by"] == "inbox:good.json"
    server.wait_for(lambda: (inbox / "accepted" / "good.json").exists(), 30, "good.json accepted")
    assert "not JSON" in (inbox / "rejected" / "garbage.json.error.txt").read_text()
    for name, words in hostile.items():
        reason = (inbox / "rejected" / f"{name}.error.txt").read_text()
        assert words in reason and SECRET not in reason, (name, reason)
    assert "unknown model 'no_such_model'" in (inbox / "rejected" / "unknown.json.error.txt").read_text()
    assert not list(inbox.glob("*.json"))
    assert len(runs(server)) == n + 1  # the bad files started nothing


def test_degraded_kpi_raises_one_incident_per_degradation(env):
    server, _, _ = env
    from closedloop.steps.monitoring import report_kpis

    uri = server.env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    # a production version that online monitoring observes (registered directly: this test is about the watcher)
    mv = client.create_model_version(MODEL, source="file:///models/acc_evt/7")
    client.set_registered_model_alias(MODEL, "production", mv.version)
    n = len(runs(server))
    report_kpis(MODEL, {"online.cut_in.min_ttc_s": 2.4}, tracking_uri=uri)  # healthy
    time.sleep(6)
    assert len(runs(server)) == n
    report_kpis(MODEL, {"online.cut_in.min_ttc_s": 0.9}, tracking_uri=uri)  # below the bound of 1.5
    found = wait_runs(server, n + 1, timeout=90)
    d = admission(server, found[-1]["dag_run_id"])
    assert d["admitted"] and d["focus_types"] == ["cut_in"]
    incident = d["incidents"][0]
    assert incident["kind"] == "kpi_degradation" and incident["severity"] == "medium"
    assert incident["reported_by"] == "kpi-watcher" and f"production version {mv.version}" in incident["description"]
    report_kpis(MODEL, {"online.cut_in.min_ttc_s": 0.8}, tracking_uri=uri)  # still degraded: no new incident
    time.sleep(8)
    assert len(runs(server)) == n + 1



def test_periodic_run_holding_the_default_pool_does_not_block_an_incident_run(env, first_incidents):
    server, _, _ = env
    for pool, slots in (("default_pool", 1), ("closedloop_incident", 8)):
        status, body = server.api("PATCH", f"/api/v2/pools/{pool}?update_mask=slots",
                                  {"name": pool, "slots": slots, "include_deferred": False})
        assert status == 200, body
    # the periodic run's first task holds the default pool's only slot until this test lets it go (a
    # fault drill pausing it): however fast its steps are, it is still running when the incident comes
    faults, release = Path(server.env["CLOSEDLOOP_FAULTS"]), Path(server.root) / "release-periodic"
    faults.write_text(json.dumps([{"task": "generate_dataset", "dag": PIPELINE, "point": "start", "fault": "pause",
                                   "seconds": 600, "until": str(release)}]))
    status, periodic = server.api("POST", f"/api/v2/dags/{PIPELINE}/dagRuns", {"logical_date": None})
    assert status == 200, periodic
    base = f"/api/v2/dags/{PIPELINE}/dagRuns/{periodic['dag_run_id']}"
    try:
        server.wait_for(lambda: any(t["state"] == "running" for t in server.api("GET", f"{base}/taskInstances")[1]
                                    ["task_instances"]), 120, "the periodic run to take the default pool's slot")
        incident_goes_on_beside(server, base)
    finally:
        release.write_text("go")
        faults.unlink()
        server.api("PATCH", "/api/v2/pools/default_pool?update_mask=slots", {"name": "default_pool", "slots": 128,
                                                                              "include_deferred": False})


def incident_goes_on_beside(server, base: str) -> None:
    from datetime import UTC, datetime

    admitted_at = max(datetime.fromisoformat(i["received_at"]) for r in runs(server)
                      if (d := admission(server, r["dag_run_id"])) and d.get("admitted")
                      for i in d["incidents"] if i["scenario_type"] == "hard_braking")
    time.sleep(max(0.0, 62 - (datetime.now(UTC) - admitted_at).total_seconds()))  # past the 1-minute debounce
    n = len(runs(server))
    from closedloop.records.runs import incident_asset_id

    asset_id = incident_asset_id(server.client("fleet-monitor"), MODEL)
    server.api("POST", "/api/v2/assets/events", {"asset_id": asset_id, "extra": {**INCIDENT, "id": "INC-URGENT"}},
               user="fleet-monitor")
    found = wait_runs(server, n + 1)
    urgent = found[-1]["dag_run_id"]
    assert admission(server, urgent)["admitted"]

    def generated():
        _, ti = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{urgent}/taskInstances/generate_dataset")
        return ti if ti.get("state") == "success" else None

    ti = server.wait_for(generated, 180, "the incident run's generate_dataset")
    _, run = server.api("GET", base)
    assert run["state"] == "running"  # the periodic run still holds the only default slot...
    assert ti["pool"] == "closedloop_incident"  # ...and the incident run went on in its own pool


def test_lineage_endpoints_and_page_answer_behind_airflow_login(env, inc1_trained):
    """The plugin's web app in Airflow's API server: trace and impact as JSON, the lineage page in
    Airflow's navigation; nothing without an Airflow login."""
    import urllib.error
    import urllib.request

    server, _, _ = env
    first = inc1_trained  # trained on 3 days of data: it may or may not pass its gates, lineage exists either way

    def get(path: str, token: str | None):
        req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), e.headers.get("content-type", "")

    token = server.client("viewer1").token()
    from urllib.parse import quote

    status, body, _ = get(f"/closedloop/api/trace?ref={quote(first)}", None)
    assert status == 401
    status, body, _ = get(f"/closedloop/api/trace?ref={quote(first)}", token)
    assert status == 200, body
    t = json.loads(body)
    assert t["airflow_run"]["dag_id"] == DAG and t["airflow_run"]["started_by"]["incident"]["id"] == "INC-1"
    assert t["training_run"]["run_id"] and {d["kind"] for d in t["datasets"]} == {"raw", "labelled"}
    assert t["template"]["pipeline"] == PIPELINE and t["label_policy"] == "expert_idm_smoothed@2"
    status, body, _ = get("/closedloop/api/trace?ref=no_such_model/1", token)
    assert status == 404 and "unknown model 'no_such_model'" in body
    status, body, _ = get("/closedloop/api/impact?source=fleet-eu", token)
    assert status == 200 and first in {e["airflow_run_id"] for e in json.loads(body)["training_runs"]}
    status, body, kind = get("/closedloop/lineage", token)
    assert status == 200 and kind.startswith("text/html") and 'id="trace-form"' in body
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    with pytest.raises(urllib.error.HTTPError) as info:  # no login: sent to Airflow's login page
        urllib.request.build_opener(NoRedirect).open(server.url + "/closedloop/lineage", timeout=60)
    assert info.value.code == 303 and "login" in info.value.headers["Location"]
    _, plugins = server.api("GET", "/api/v2/plugins")
    ours = next(p for p in plugins["plugins"] if p["name"] == "closedloop")
    assert ours["fastapi_apps"][0]["url_prefix"] == "/closedloop"
    assert ours["external_views"][0]["href"] == "/closedloop/lineage"


def http_get(server, path: str, user: str | None, timeout: float = 60) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    token = server.client(user).token() if user else None
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_viewer_limited_to_another_pipeline_reads_nothing_of_this_one(env, inc1_trained):
    """Per-DAG rights hold on every plugin endpoint, whatever the query says: "scoped" may read only
    the other pipeline's DAG, so this pipeline's trace is not found, its impact rows and health
    section are left out — also with ?dag_id= naming a DAG they may read, or this one."""
    from urllib.parse import quote

    server, _, _ = env
    first = inc1_trained
    assert server.api("GET", f"/api/v2/dags/{DAG}", user="scoped")[0] == 403  # Airflow agrees
    assert server.api("GET", f"/api/v2/dags/{OTHER}", user="scoped")[0] == 200
    status, body = http_get(server, "/closedloop/api/impact?source=fleet-eu", "viewer1")
    everyone = json.loads(body)
    assert status == 200 and everyone["totals"]["training_runs"] >= 1 and everyone["model_versions"] is not None
    for steer in ("", f"&dag_id={OTHER}", f"&dag_id={DAG}", "&dag_id=~", f"&dag_id={OTHER}&dag_id={DAG}"):
        status, body = http_get(server, f"/closedloop/api/trace?ref={quote(first)}{steer}", "scoped")
        assert status == 404 and first not in body.replace(f"{first!r}", ""), (steer, body)
        status, body = http_get(server, f"/closedloop/api/trace?ref={quote(f'models:/{MODEL}/1')}{steer}", "scoped")
        assert status == 404, (steer, body)
        status, body = http_get(server, f"/closedloop/api/impact?source=fleet-eu{steer}", "scoped")
        seen = json.loads(body)
        assert status == 200 and seen["training_runs"] == [] and seen["model_versions"] == [] and \
            seen["snapshots"] == [] and seen["live"] == [], (steer, body)
        assert seen["totals"] == {"snapshots": 0, "training_runs": 0, "model_versions": 0}
        status, body = http_get(server, f"/closedloop/api/health?days=7{steer}", "scoped")
        h = json.loads(body)
        assert status == 200 and set(h["pipelines"]) == {OTHER} and set(h["versions"]) == {OTHER}, (steer, body)
        assert set(h["cache"]) <= {OTHER} and h["total_pipelines"] == 1
        status, body = http_get(server, f"/closedloop/health?days=7{steer}", "scoped")
        assert status == 200 and OTHER in body and PIPELINE not in body.replace(OTHER, "")
    status, body = http_get(server, "/closedloop/api/impact?source=fleet-eu&limit=100000", "viewer1")
    assert status == 422  # the page size has a maximum
    status, body = http_get(server, "/closedloop/api/impact?source=%25", "viewer1")
    assert status == 400 and "wildcards" in body  # '%' is refused, not "everything"


def test_a_slow_health_request_does_not_hold_other_requests(env):
    """The health page's work runs in a worker thread: while a fault drill holds one health request
    inside its work, other requests to the API server (ours and Airflow's) are answered."""
    import threading

    server, _, _ = env
    drills, release, mark = server.root / "faults.json", server.root / "health.release", server.root / "health.mark"
    drills.write_text(json.dumps([{"task": "health", "dag": "closedloop_web", "point": "start", "fault": "pause",
                                   "seconds": 300, "until": str(release), "mark": str(mark)}]))
    held: dict = {}
    slow = threading.Thread(target=lambda: held.update(answer=http_get(server, "/closedloop/health?days=7",
                                                                       "viewer1", timeout=400)))
    try:
        slow.start()
        server.wait_for(mark.exists, 60, "the health request to be held in its work")
        drills.unlink()  # the requests below are not held
        assert http_get(server, "/closedloop/api/impact?source=fleet-eu", "viewer1")[0] == 200
        assert http_get(server, f"/api/v2/dags/{DAG}", "viewer1")[0] == 200
        assert http_get(server, "/closedloop/lineage", "viewer1")[0] == 200
        assert slow.is_alive() and "answer" not in held  # all of that while the health request was held
    finally:
        drills.unlink(missing_ok=True)
        release.touch()
        slow.join(120)
    assert held["answer"][0] == 200 and PIPELINE in held["answer"][1]


def test_rerun_of_an_incident_run_through_the_cli(env, inc1_trained):
    """`closedloop rerun` posts a run with the pinned snapshot; an incident rerun is never debounced."""
    server, root, _ = env
    first = inc1_trained
    out = cli(server, "rerun", first, "--dir", str(root / "include" / "pipelines"), user="admin")
    assert out.returncode == 0, out.stderr
    new = out.stdout.split(f"{DAG} run ", 1)[1].split(" ", 1)[0]
    _, run = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{new}")
    assert run["conf"]["closedloop_rerun"]["of"] == f"{DAG}/{first}" and run["note"].startswith("rerun of")
    server.wait_for(lambda: admit_state(server, new) in ("success", "skipped", "failed"), 120, "the rerun's admission")
    decision = admission(server, new)
    assert decision["admitted"] and decision["incidents"][0]["id"] == "INC-1"  # not debounced

    def generated():
        status, ti = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{new}/taskInstances/generate_dataset")
        return ti if ti.get("state") in ("success", "failed") else None

    assert server.wait_for(generated, 180, "the rerun's generate_dataset")["state"] == "success"
    from closedloop.records.airflow_api import xcom_value

    _, mine = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{new}/taskInstances/generate_dataset/xcomEntries/return_value")
    _, theirs = server.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{first}/taskInstances/generate_dataset/"
                                  "xcomEntries/return_value")
    assert xcom_value(mine)["digest"] == xcom_value(theirs)["digest"] and xcom_value(mine)["pinned"] is True


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_lineage_page_in_a_real_browser(env, inc1_trained):
    """Headless Chromium: without a login the page goes to Airflow's login; logged in (Airflow's session
    cookie) it traces a run and shows an impact, rendered by the page's own JavaScript."""
    server, _, _ = env
    first = inc1_trained
    with Browser() as b:
        b.goto(f"{server.url}/closedloop/lineage")
        assert "/auth/login" in b.eval("location.href")
        b.set_cookie(server.url, "_token", server.client("viewer1").token())
        b.goto(f"{server.url}/closedloop/lineage")
        assert b.eval("document.querySelector('h1').textContent") == "Model lineage"
        b.eval(f"document.getElementById('ref').value = {json.dumps(first)}; "
               "document.getElementById('trace-form').requestSubmit(); true")
        b.wait_for("document.getElementById('trigger') !== null")
        assert b.eval("document.getElementById('trigger').textContent") == "incident"
        assert b.eval("document.getElementById('policy').textContent") == "expert_idm_smoothed@2"
        assert b.eval("document.querySelectorAll('.digest').length") == 2
        assert "INC-1" in b.eval("document.getElementById('out').textContent")
        # the same chain as a graph, every node from the trace MLflow and Airflow hold; its nodes click
        from closedloop.records.lineage import trace

        t = trace(first, server.env["MLFLOW_TRACKING_URI"])
        shown = b.eval("[...document.querySelectorAll('#graph g[data-kind=snapshot] a')].map(a => a.dataset.impact)")
        assert sorted(shown) == sorted(d["digest"] for d in t["datasets"])
        assert b.eval("document.querySelector('#graph g[data-node=origin] text').textContent") == "incident INC-1"
        assert b.eval("document.querySelectorAll('#graph line').length") >= 8
        assert b.eval("document.querySelector('#graph').getBoundingClientRect().width") > 600
        labelled = next(d["digest"] for d in t["datasets"] if d["kind"] == "labelled")
        b.eval(f"document.querySelector('#graph a[data-impact=\"{labelled}\"]').dispatchEvent("
               "new MouseEvent('click', {bubbles: true})); true")
        b.wait_for("document.getElementById('counts') !== null")
        assert b.eval("document.getElementById('what').value") == labelled
        assert int(b.eval("document.getElementById('counts').textContent").split()[0]) >= 1
        b.eval(f"document.getElementById('ref').value = {json.dumps(first)}; "
               "document.getElementById('trace-form').requestSubmit(); true")
        b.wait_for("document.getElementById('graph') !== null")
        b.eval("document.getElementById('kind').value = 'source'; document.getElementById('what').value = 'fleet-eu';"
               "document.getElementById('impact-form').requestSubmit(); true")
        b.wait_for("document.getElementById('counts') !== null")
        assert b.eval("document.getElementById('counts').textContent").split()[0] != "0"
        b.eval("document.getElementById('ref').value = 'no_such_model/1'; "
               "document.getElementById('trace-form').requestSubmit(); true")
        b.wait_for("document.getElementById('error') !== null")
        assert "unknown model 'no_such_model'" in b.eval("document.getElementById('error').textContent")


def test_health_figures_from_airflows_records_as_json_cli_and_page(env, inc1_trained):
    """The health view counts what Airflow recorded: the API, `closedloop health` and the page agree,
    and the page renders with its charts in a real browser, behind Airflow's login."""
    import urllib.error
    import urllib.request

    server, root, _ = env

    def all_runs():
        return runs(server) + server.api("GET", f"/api/v2/dags/{PIPELINE}/dagRuns?limit=100")[1]["dag_runs"]

    for r in all_runs():  # stop what still runs, so the figures hold still while we compare them
        if r["state"] not in ("success", "failed"):
            server.api("PATCH", f"/api/v2/dags/{r['dag_id']}/dagRuns/{r['dag_run_id']}", {"state": "failed"})

    def still():  # a task of a run stopped by hand may still end (and write the run's note) a moment later
        before = all_runs()
        time.sleep(5)
        return before if before == all_runs() else None

    settled = server.wait_for(still, 120, "the runs' states and notes to hold still", interval=0.5)
    finished = [r for r in settled if r["state"] in ("success", "failed")]
    assert len(finished) == len(settled)
    req = urllib.request.Request(server.url + "/closedloop/api/health?days=7")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 401
    req.add_header("Authorization", f"Bearer {server.client('viewer1').token()}")
    with urllib.request.urlopen(req, timeout=120) as r:
        whole = json.load(r)
    h, cache = whole["pipelines"][PIPELINE], whole["cache"][PIPELINE]
    # every incident run that trained looked its steps up in the step cache (MLflow's records)
    assert cache["hits"] + cache["misses"] > 0 and sum(cache["hits_by_step"].values()) == cache["hits"]
    assert h["dags"] == [PIPELINE, DAG]
    assert h["runs"] == len(settled) and h["incident_runs"] == len(runs(server))
    # a run a release gate stopped says so in its note: an outcome with its own figure, not an error
    rejected = [r for r in finished if r["state"] == "failed" and (r.get("note") or "").startswith("rejected by gate")]
    assert h["failure_rate"] == round((sum(r["state"] == "failed" for r in finished) - len(rejected)) / len(finished), 3)
    assert h["gate_rejections"] == len(rejected)
    from closedloop.records.airflow_api import xcom_value

    for r in finished:  # every run a gate stopped carries the note, written by the deployment's account
        status, entry = server.api("GET", f"/api/v2/dags/{r['dag_id']}/dagRuns/{r['dag_run_id']}/taskInstances/"
                                          "release_gate/xcomEntries/error")
        if status == 200 and (xcom_value(entry) or {}).get("error_class") == "GateFailed":
            assert r in rejected, (r["dag_run_id"], r.get("note"))
    if rejected:  # `closedloop runs` gives the reason beside the outcome
        out = cli(server, "runs", PIPELINE, "--limit", "100", "--dir", str(root / "include" / "pipelines"),
                  user="viewer1")
        assert out.returncode == 0 and "rejected" in out.stdout and f"reason: {rejected[0]['note']}" in out.stdout
    assert h["queue_wait_s"]["n"] > 0 and h["queue_wait_s"]["median"] >= 0

    out = cli(server, "health", "--json", "--dir", str(root / "include" / "pipelines"), user="viewer1")
    assert out.returncode == 0, out.stderr
    cli_view = json.loads(out.stdout)["pipelines"][PIPELINE]
    assert (cli_view["runs"], cli_view["incident_runs"]) == (h["runs"], h["incident_runs"])

    if chromium_path() is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    with Browser() as b:
        b.goto(f"{server.url}/closedloop/health")
        assert "/auth/login" in b.eval("location.href")
        b.set_cookie(server.url, "_token", server.client("viewer1").token())
        b.goto(f"{server.url}/closedloop/health?days=7")
        section = f"section[data-pipeline='{PIPELINE}']"
        assert b.eval(f"document.querySelector(\"{section} [data-figure=runs] b\").textContent") == str(h["runs"])
        bars = b.eval(f"[...document.querySelectorAll(\"{section} svg.runs-chart rect\")]"
                      ".reduce((n, r) => n + Number(r.dataset.count), 0)")
        assert bars == h["runs"]  # every run is a bar segment of its day
        shown = b.eval(f"document.querySelector(\"{section} [data-figure=cache_hits] b\").textContent")
        # a task still finishing may add a step run between the JSON and the page: the page shows the
        # figures of a moment between the two readings
        with urllib.request.urlopen(req, timeout=120) as r:
            later = json.load(r)["cache"][PIPELINE]
        hits, looked = (int(x) for x in shown.split(" of "))
        assert cache["hits"] <= hits <= later["hits"], (shown, cache, later)
        assert cache["hits"] + cache["misses"] <= looked <= later["hits"] + later["misses"], (shown, cache, later)
        assert b.eval("document.querySelector('svg.runs-chart').getBoundingClientRect().width") > 100
        # two bars (queue wait, lead time) per pipeline the viewer may read: this one and the other
        assert b.eval("document.querySelectorAll('svg.wait-chart rect').length") == 2 * len(whole["pipelines"]) == 4


def test_a_reporter_needs_no_op_role_the_plugin_posts_for_them(env):
    """An incident reporter with role viewer: Airflow refuses them the asset-event API, connections and
    pools; the plugin checks the template's incidents.reporters, posts the event with the deployment's
    identity and records the login as the poster (in the event and in Airflow's audit log)."""
    server, root, _ = env
    from closedloop.records.runs import incident_asset_id

    asset_id = incident_asset_id(server.client("reporter"), MODEL)
    extra = {**INCIDENT, "scenario_type": "stop_and_go", "id": "INC-R"}
    assert server.api("POST", "/api/v2/assets/events", {"asset_id": asset_id, "extra": extra}, user="reporter")[0] == 403
    assert server.api("POST", "/api/v2/connections", {"connection_id": "closedloop_signing", "conn_type": "generic"},
                      user="reporter")[0] == 403
    assert server.api("PATCH", "/api/v2/pools/closedloop_incident?update_mask=slots",
                      {"name": "closedloop_incident", "slots": 0}, user="reporter")[0] == 403
    # not named in incidents.reporters: refused with the reason; a malformed incident: 400, nothing posted
    before = len(asset_events(server))
    out = cli(server, "incident", "report", "--model", MODEL, "--scenario-type", "stop_and_go", "--severity", "high",
              "--dir", str(root / "include" / "pipelines"), user="viewer1")
    assert out.returncode == 1 and "'viewer1' may not report incidents of acc_evt_model" in out.stderr, out.stderr
    status, body = server.client("reporter").call("POST", "/closedloop/api/incidents", {"model": MODEL}, root=True)
    assert status == 400 and "scenario_type" in json.dumps(body)
    assert len(asset_events(server)) == before
    n = len(runs(server))
    out = cli(server, "incident", "report", "--model", MODEL, "--scenario-type", "stop_and_go", "--severity", "high",
              "--id", "INC-R", "--wait", "120", "--dir", str(root / "include" / "pipelines"), user="reporter")
    assert out.returncode == 0, out.stderr
    found = wait_runs(server, n + 1)
    decision = admission(server, found[-1]["dag_run_id"])
    assert decision["admitted"] and decision["incidents"][0]["id"] == "INC-R"
    assert decision["incidents"][0]["posted_by"] == "reporter"
    _, logs = server.api("GET", "/api/v2/eventLogs?event=closedloop.incident.report&limit=10")
    assert any(e["owner"] == "reporter" and "INC-R" in (e.get("extra") or "") for e in logs["event_logs"]), logs

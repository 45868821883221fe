"""``make demo`` on a fresh checkout tells the closed loop's story, end to end: real Airflow (scheduler,
DAG processor, triggerer, API server), real MLflow, real simulation jobs, the shipped template as it is.

The story it must tell: the weekly run is stopped by a statistical gate (its bound and the counts behind
it); the incident retrain reaches production through two approvers, its confidence gates decided by the
adaptive budget; a weekly run on a shifted fleet is compared with that production version (``shift.*``
metrics, deltas) and the gates decide. Afterwards, as a user would (``make airflow``, then the CLI), the
stopped runs are reported as gate rejections — in ``closedloop health --json`` and ``closedloop runs`` —
and never counted as failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PROJECT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PIPELINE, MODEL = "acc_longitudinal", "acc_longitudinal_policy"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkout")
    # a fresh checkout: the project's tracked dags/ and include/, no .closedloop from an earlier run
    tracked = subprocess.run(["git", "ls-files", "dags", "include"], cwd=PROJECT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, root / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_TRACKING", "CLOSEDLOOP"))}
    env.update({"CLOSEDLOOP_PROJECT_DIR": str(root), "CLOSEDLOOP_HOME": str(root / ".closedloop")})
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "closedloop.cli", "demo"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=1200)
    return {"root": root, "env": env, "out": out, "seconds": time.monotonic() - started}


@pytest.fixture(scope="module")
def ui(demo):
    """``make airflow`` on the demo's stores, for the CLI's read commands."""
    port = _port()
    home = demo["root"] / ".closedloop"
    proc = subprocess.Popen([sys.executable, "-m", "closedloop.cli", "serve", "--port", str(port), "--mlflow-port",
                             str(_port())], cwd=demo["root"], env=demo["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "closedloop serve did not come up"
                time.sleep(1)
        users = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
        yield {**demo["env"], "AIRFLOW_API_URL": f"http://127.0.0.1:{port}", "AIRFLOW_USERNAME": "admin",
               "AIRFLOW_PASSWORD": users["admin"]}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "closedloop.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def section(text: str, start: str, end: str | None) -> str:
    return text[text.index(start):text.index(end) if end else None]


def client(demo):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{demo['root'] / '.closedloop' / 'mlflow' / 'mlflow.db'}")


def test_the_demo_closes_the_loop_on_a_fresh_checkout(demo):
    out = demo["out"]
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "\nOK: " in out.stdout
    print(f"make demo's main job on a fresh home: {demo['seconds']:.0f} s")


def test_the_weekly_run_is_stopped_by_a_statistical_gate_with_its_evidence(demo):
    first = section(demo["out"].stdout, "[1/3]", "[2/3]")
    # 8 emergency stops, 8 collisions: the lower bound of the rate is far above the 5 % limit
    found = re.search(r"FAIL sim\.hard_braking\.collision_rate: (\d+) collision\(s\) in (\d+) episodes; "
                      r"lower bound ([\d.]+) %: over the limit whatever more episodes show; "
                      r"limit <= 0\.05 \(95 % upper bound\)", first)
    assert found, first[-3000:]
    events, trials, lower = int(found[1]), int(found[2]), float(found[3])
    assert 0 < events <= trials and lower > 5
    assert "-> FAILED" in first and "register_candidate" in first


def test_the_incident_retrain_reaches_production_with_two_approvals_and_decided_bounds(demo):
    second = section(demo["out"].stdout, "[2/3]", "[3/3]")
    assert "review: Approve by safety-lead" in second and "review: Approve by safety-deputy" in second
    assert f"promotion: {MODEL} version 1 -> @production" in second
    needed = dict(re.findall(r"PASS (sim\.[a-z_.]+): 0 collision\(s\) in ([\d,]+) episodes; upper bound", second))
    assert needed, second[-3000:]
    assert set(needed) == {"sim.collision_rate", "sim.hard_braking.collision_rate", "sim.cut_in.collision_rate"}
    # 0 in n stays above 1 % until n >= 299: the adaptive budget simulated that far, not the catalog's 26 once
    assert int(needed["sim.collision_rate"].replace(",", "")) >= 299
    mv = client(demo).get_model_version_by_alias(MODEL, "production")
    assert str(mv.version) == "1"


def test_the_shifted_fleets_run_is_compared_with_production(demo):
    from closedloop import vocab

    c = client(demo)
    exp = c.get_experiment_by_name(vocab.experiment_name(PIPELINE))
    gates = c.search_runs([exp.experiment_id], filter_string=f"tags.`{vocab.STEP}` = 'release_gate'",
                          order_by=["attributes.start_time DESC"])
    compared = [r for r in gates if r.data.tags.get(vocab.COMPARED_TO_PRODUCTION) == "1"]
    assert compared, "no weekly run was compared with production version 1"
    run = compared[0]
    shift = {k: v for k, v in run.data.metrics.items() if k.startswith("shift.")}
    assert {"shift.scenario_mix.psi", "shift.ego_speed.psi", "shift.ego_speed.ks"} <= set(shift)
    assert shift["shift.ego_speed.psi"] > 0.1  # summer traffic is not the logs production learnt from
    path = c.download_artifacts(run.info.run_id, "gates/report.json", str(demo["root"]))
    rows = {r["metric"]: r for r in json.loads(Path(path).read_text())}
    deltas = {m: r for m, r in rows.items() if r.get("production") is not None and r.get("delta") is not None}
    assert {"offline.rmse", "sim.safety_critical.min_ttc_s"} <= set(deltas), rows
    for r in deltas.values():
        assert r["delta"] == pytest.approx(r["value"] - r["production"])
    third = section(demo["out"].stdout, "[3/3]", "what started each run")
    assert "distribution shift of the training data against production (version 1)" in third
    assert re.search(r"shift\.scenario_mix\.psi\s+<= 0\.25\s+value [\d.]+", third)


def test_a_gate_doing_its_job_is_a_rejection_in_health_and_runs_not_a_failure(ui):
    health = cli(ui, "health", "--json")
    assert health.returncode == 0, health.stderr
    h = json.loads(health.stdout)["pipelines"][PIPELINE]
    assert h["gate_rejections"] >= 1 and h["failure_rate"] == 0, h
    assert "sim.hard_braking.collision_rate" in h["rejected_by"]
    runs = cli(ui, "runs", PIPELINE, "--json")
    assert runs.returncode == 0, runs.stderr
    rows = json.loads(runs.stdout)
    rejected = [r for r in rows if r["dag_id"] == PIPELINE and r["outcome"] == "rejected"]
    assert rejected and all(r["reason"].startswith("rejected by gate ") for r in rejected), rows
    assert not [r for r in rows if r["outcome"] == "failed"], rows
    assert any(r["dag_id"] == f"{PIPELINE}_incident" and r["outcome"] == "success" for r in rows)
    text = cli(ui, "runs", PIPELINE)
    reasons = [line.strip() for line in text.stdout.splitlines() if line.strip().startswith("reason: ")]
    assert reasons and all(r.startswith("reason: rejected by gate ") for r in reasons), text.stdout
    assert any("sim.hard_braking.collision_rate" in r.split(":")[1] for r in reasons), text.stdout


def test_the_production_version_has_a_dossier_that_verifies_offline_and_names_a_changed_byte(demo, tmp_path):
    mv = client(demo).get_model_version_by_alias(MODEL, "production")
    where = json.loads(mv.tags["closedloop.dossier"])
    folder = Path(where["uri"].removeprefix("file://")).parent
    shown = cli(demo["env"], "dossier", "show", f"{MODEL}@production")
    assert shown.returncode == 0 and where["uri"] in shown.stdout and where["digest"] in shown.stdout, shown
    taken = tmp_path / "taken-away"  # what a release engineer takes away: the folder, and the published key
    shutil.copytree(folder, taken)
    pins = json.loads((demo["root"] / ".closedloop" / "keys" / "trusted_keys.json").read_text())
    public = pins["keys"][-1]["public_key"]
    # a process with no server and none of the deployment's settings: the bundle and the key, nothing else
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLOSEDLOOP_HOME": str(tmp_path / "nothing")}
    ok = subprocess.run([sys.executable, "-m", "closedloop.cli", "dossier", "verify", str(taken), "--key", public],
                        env=bare, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"release dossier of {MODEL} v{mv.version}" in ok.stdout and "3 sealed record(s)" in ok.stdout
    body = json.loads((taken / "dossier.json").read_text())["body"]
    assert body["verdict"]["verdict"] in ("accepted", "conditionally accepted")
    assert [s["responder"] for s in body["approvals"]["statements"]] == ["safety-lead", "safety-deputy"]
    assert body["approvals"]["independent_of_requester"] and body["data"]["independence"]["independent"]
    assert "cut_out" in body["coverage"]["not_covered"]  # in the ODD, not in the catalog: said, not hidden
    gates = {g["metric"]: g for g in body["acceptance"]["gates"]}
    assert gates["sim.collision_rate"]["trials"] >= 299 and gates["sim.collision_rate"]["upper"] <= 0.01
    assert "sha256:" + __import__("hashlib").sha256((taken / "dossier.json").read_bytes()).hexdigest() == where["digest"]
    evidence = taken / "evidence" / "gate_report.json"
    data = bytearray(evidence.read_bytes())
    data[len(data) // 2] ^= 1
    evidence.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "closedloop.cli", "dossier", "verify", str(taken), "--key", public],
                         env=bare, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "evidence/gate_report.json: its sha256" in bad.stderr, bad.stdout + bad.stderr


def test_the_release_dag_deployed_the_verified_version_and_refuses_a_tampered_dossier(demo, ui, tmp_path):
    """The hand-off under the real scheduler: the production event of the demo started ``closedloop_release``,
    which verified the dossier and deployed it; an event an ``op`` could post, naming a tampered copy, deploys
    nothing and fails with the reason."""
    assert "release hand-off: closedloop_release ran on the production event (success)" in demo["out"].stdout
    deployed = json.loads((demo["root"] / ".closedloop" / "deployed" / MODEL / "v1" / "DEPLOYED.json").read_text())
    mv = client(demo).get_model_version_by_alias(MODEL, "production")
    assert {k: deployed["dossier"][k] for k in ("uri", "digest")} == json.loads(mv.tags["closedloop.dossier"])
    assert deployed["verdict"] in ("accepted", "conditionally accepted")
    base = ui["AIRFLOW_API_URL"]

    def call(method, path, body=None):
        token = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{base}/auth/token", data=json.dumps({"username": ui["AIRFLOW_USERNAME"],
                                                   "password": ui["AIRFLOW_PASSWORD"]}).encode(),
            headers={"Content-Type": "application/json"}, method="POST"), timeout=30).read())["access_token"]
        req = urllib.request.Request(f"{base}/api/v2{path}", data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                                     method=method)
        return json.loads(urllib.request.urlopen(req, timeout=30).read() or b"null")

    folder = Path(json.loads(mv.tags["closedloop.dossier"])["uri"]).parent
    forged = tmp_path / "forged"
    shutil.copytree(folder, forged)
    (forged / "evidence" / "gate_report.json").write_text("[]\n")  # every gate gone: nothing to show
    digest = "sha256:" + __import__("hashlib").sha256((forged / "dossier.json").read_bytes()).hexdigest()
    asset = next(a for a in call("GET", "/assets?limit=100")["assets"]
                 if a["uri"] == f"closedloop://models/{MODEL}/production")
    before = {r["dag_run_id"] for r in call("GET", "/dags/closedloop_release/dagRuns?limit=50")["dag_runs"]}
    call("POST", "/assets/events", {"asset_id": asset["id"], "extra": {
        "model": MODEL, "version": str(mv.version), "dossier": {"uri": str(forged / "dossier.json"), "digest": digest}}})
    deadline = time.monotonic() + 180
    while True:
        runs = [r for r in call("GET", "/dags/closedloop_release/dagRuns?limit=50")["dag_runs"]
                if r["dag_run_id"] not in before]
        if runs and runs[0]["state"] in ("success", "failed"):
            break
        assert time.monotonic() < deadline, "no closedloop_release run on the posted event"
        time.sleep(2)
    assert runs[0]["state"] == "failed"
    assert json.loads((demo["root"] / ".closedloop" / "deployed" / MODEL / "v1" / "DEPLOYED.json").read_text()) \
        == deployed  # nothing deployed over the verified version


def test_the_dossier_renders_in_a_real_browser_with_every_section(demo):
    from tests.browser import Browser, chromium_path

    if chromium_path() is None:
        pytest.skip("needs Debian's chromium (installed by .ci/run)")
    mv = client(demo).get_model_version_by_alias(MODEL, "production")
    html = Path(json.loads(mv.tags["closedloop.dossier"])["uri"]).parent / "dossier.html"
    with Browser() as b:
        b.goto(f"file://{html}")
        sections = b.eval("Array.from(document.querySelectorAll('section')).map(s => s.id + '|' + "
                          "s.querySelector('h2').textContent + '|' + (s.querySelector('.clause') || {}).textContent)")
        ids = [s.split("|")[0] for s in sections]
        assert ids == ["verdict", "identity", "odd", "data", "coverage", "acceptance", "monitoring", "approvals",
                       "change"], sections
        assert all(s.split("|")[2] for s in sections)  # each names its clause family
        assert b.eval("document.querySelector('.verdict').dataset.verdict") in ("accepted", "conditionally accepted")
        assert b.eval("document.querySelector('#version').textContent") == str(mv.version)
        assert "cut_out" in b.eval("document.querySelector('#not-covered').textContent")
        assert b.eval("document.querySelectorAll('#acceptance tr').length") >= 9  # header + every gate
        assert b.eval("document.querySelectorAll('script').length") == 0


def test_the_review_card_links_the_validations_data_docs_and_chromium_opens_them(demo, ui):
    """Great Expectations' own Data Docs of the incident run's data validation: on its MLflow run, linked from
    the review card the plugin serves, opened in Chromium behind Airflow's login; a stranger's path is 404."""
    from closedloop.records.airflow_api import AirflowAPI
    from tests.browser import Browser, chromium_path

    if chromium_path() is None:
        pytest.skip("needs Debian's chromium (installed by .ci/run)")
    mv = client(demo).get_model_version_by_alias(MODEL, "production")
    dag_id, run_id = mv.tags["airflow.dag_id"], mv.tags["airflow.run_id"]
    api = AirflowAPI(url=ui["AIRFLOW_API_URL"], user="admin", password=ui["AIRFLOW_PASSWORD"])
    with Browser() as b:
        b.set_cookie(api.url, "_token", api.token())
        b.goto(f"{api.url}/closedloop/review?dag_id={urllib.parse.quote(dag_id)}&run_id={urllib.parse.quote(run_id)}")
        line = b.wait_for("(document.querySelector('#validation') || {}).textContent")
        assert "suite drive_log_labels passed" in line, line
        href = b.eval("document.querySelector('#data-docs').href")
        assert "/closedloop/data-docs/" in href and href.endswith(".html"), href
        b.goto(href)
        assert b.wait_for("document.title")
        text = b.eval("document.body.innerText")
        assert "Expectation Suite: drive_log_labels" in text and "values must never be null" in text, text[:2000]
        assert "Status: Succeeded" in text and run_id.split("T")[0] in text, text[:2000]
        assert b.eval("document.querySelectorAll('table').length") >= 1
    docs_run = href.split("/data-docs/", 1)[1].split("/")[0]
    train_run = mv.run_id
    for path in (f"{docs_run}/..%2F..%2Fgates%2Freport.json", f"{train_run}/index.html", f"{docs_run}/result.py"):
        request = urllib.request.Request(f"{api.url}/closedloop/data-docs/{path}",
                                         headers={"Authorization": f"Bearer {api.token()}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 404, path
    trace = cli(ui, "trace", f"models:/{MODEL}@production")
    assert "data docs" in trace.stdout and "validation/data_docs/validations/" in trace.stdout, trace.stdout


def test_the_cli_finds_the_running_make_airflow_on_its_port_with_its_logins(demo, ui):
    """No URL, no password given: the CLI finds the running `make airflow` (on a free port, not 8080) and the
    login's generated password; a wrong --api-url says where it looked."""
    env = {k: v for k, v in ui.items() if k not in ("AIRFLOW_API_URL", "AIRFLOW_PASSWORD")}
    found = cli({**env, "AIRFLOW_USERNAME": "safety-lead"}, "runs", PIPELINE, "--json")
    assert found.returncode == 0, found.stderr
    assert any(r["dag_id"] == PIPELINE for r in json.loads(found.stdout))
    assert not ui["AIRFLOW_API_URL"].endswith(":8080")
    other = f"http://127.0.0.1:{_port()}"  # another Airflow never gets the local deployment's passwords
    elsewhere = cli(env, "runs", PIPELINE, "--api-url", other)
    assert elsewhere.returncode == 1 and f"Airflow credentials needed for {other}" in elsewhere.stderr
    elsewhere = cli({**env, "AIRFLOW_PASSWORD": "x"}, "runs", PIPELINE, "--api-url", other)
    assert elsewhere.returncode == 1 and f"cannot reach Airflow at {other}" in elsewhere.stderr

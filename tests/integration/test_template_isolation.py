"""One broken template never takes the fleet down — under Airflow's real DAG processor, scheduler and
API server (an in-process DagBag keeps a file's other DAGs; the real processor drops every DAG of a
file with an import error, which is why the errors live in a DAG file of their own)."""

from __future__ import annotations

import pytest

from closedloop.local.server import AirflowServer
from tests.conftest import NO_REVIEW, SAFE_DATA, scratch_project, template_text

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GOOD = ("iso_a", "iso_b")  # iso_a is governed (it keeps the registry DAGs), iso_b is not
BROKEN = "iso_c"
BREAKS = {  # what a person's edit can do to a template (old → new in its text), and what the error must name
    "schema": (("window_days: 3", "window_dayz: 3"), "dataset.window_dayz: unknown field; did you mean 'window_days'?"),
    "yaml": (("window_days: 3", "window_days: [3"), "not valid YAML"),
    "entry point": (("closedloop.driving.logs:synthesize_drive_logs", "closedloop.driving.nope:make_logs"),
                    "dataset.generator"),
}


def text(project, name: str) -> str:
    base = {'schedule: "0 3 * * 1"': "schedule: null", "window_days: 14": "window_days: 3", **SAFE_DATA,
            "name: acc_longitudinal": f"name: {name}", "name: acc_longitudinal_policy": f"name: {name}_model",
            # three days of logs make a policy the safety gates (rightly) refuse; this test is about which DAGs
            # Airflow keeps, so the gates only bound what any trained policy meets (lax_gates)
            }
    if name != "iso_a":
        base.update(NO_REVIEW)
    return template_text(project, incidents=False, gates="lax", **base)


@pytest.fixture(scope="module")
def env(tmp_path_factory, project):
    root = scratch_project(tmp_path_factory.mktemp("iso-project"))
    for name in (*GOOD, BROKEN):
        (root / "include" / "pipelines" / f"{name}.yaml").write_text(text(project, name))
    work = tmp_path_factory.mktemp("iso-airflow")
    server = AirflowServer(work, root / "dags", {"admin": ("admin", "admin-pw")})
    server.start()
    try:
        yield server, root, project
    finally:
        server.stop()


def dags(server) -> dict[str, dict]:
    _, data = server.api("GET", "/api/v2/dags?limit=100")
    return {d["dag_id"]: d for d in data["dags"]}


def import_errors(server) -> list[dict]:
    return server.api("GET", "/api/v2/importErrors?limit=100")[1]["import_errors"]


def test_a_broken_template_holds_back_only_its_own_dags_under_the_real_dag_processor(env):
    server, root, project = env
    every = {*GOOD, BROKEN, "closedloop_registry", "closedloop_registry_watch", "closedloop_release", "closedloop_recall"}
    server.wait_for(lambda: every <= set(dags(server)), 180, "the three pipelines and the registry parsed")
    path = root / "include" / "pipelines" / f"{BROKEN}.yaml"
    for kind, ((old, new), named) in BREAKS.items():
        broken = text(project, BROKEN).replace(old, new)
        assert broken != text(project, BROKEN), kind
        path.write_text(broken)

        def reported(named=named):
            errs = [e for e in import_errors(server) if e["filename"].endswith("closedloop_template_errors.py")]
            held = dags(server).get(BROKEN)
            return errs if errs and named in errs[0]["stack_trace"] and held and not held["is_stale"] and \
                "template-error" in {t["name"] for t in held["tags"]} else None

        (err,) = server.wait_for(reported, 120, f"the {kind} break to be reported and its DAG held back")
        assert str(path) in err["stack_trace"], err["stack_trace"]
        now = dags(server)
        for dag_id in (*GOOD, "closedloop_registry", "closedloop_registry_watch", "closedloop_release"):
            assert dag_id in now and not now[dag_id]["is_stale"], (kind, dag_id, now.get(dag_id))
            assert "template-error" not in {t["name"] for t in now[dag_id]["tags"]}
        assert now[BROKEN]["description"].startswith("HELD BACK by a template error")
        assert not any(e["filename"].endswith("closedloop_pipelines.py") for e in import_errors(server))
        # the health page and its JSON say which pipeline is held back, and why
        status, health = server.client("admin").call("GET", "/closedloop/api/health", root=True)
        assert status == 200 and [t["pipeline"] for t in health["template_errors"]] == [BROKEN], health
        assert named in health["template_errors"][0]["error"]
        import urllib.request

        req = urllib.request.Request(f"{server.url}/closedloop/health",
                                     headers={"Authorization": f"Bearer {server.client('admin').token()}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            page = r.read().decode()
        assert 'data-figure="template-error"' in page and f"Held back by a template error: {BROKEN}" in page
        if kind == "schema":  # while one template is broken, the others run to the end
            request = {"purpose": "Isolation test: a good pipeline runs on.", "change": ["data"],
                       "expected_impact": "No change in any gate."}
            runs = {}
            for name in GOOD:
                status, body = server.api("POST", f"/api/v2/dags/{name}/dagRuns", {"logical_date": None,
                                                                                   "conf": request})
                assert status == 200, (name, status, body)
                runs[name] = body["dag_run_id"]

            def tasks(name, run_id):
                _, tis = server.api("GET", f"/api/v2/dags/{name}/dagRuns/{run_id}/taskInstances")
                return {t["task_id"]: t["state"] for t in tis["task_instances"]}

            # iso_b runs to the end; iso_a (governed) computes everything and waits for its review
            server.wait_for(lambda r=runs: server.api("GET", f"/api/v2/dags/iso_b/dagRuns/{r['iso_b']}")[1]["state"]
                            in ("success", "failed"), 900, "iso_b's run")
            assert server.api("GET", f"/api/v2/dags/iso_b/dagRuns/{runs['iso_b']}")[1]["state"] == "success", \
                tasks("iso_b", runs["iso_b"])
            server.wait_for(lambda r=runs: tasks("iso_a", r["iso_a"]).get("approval") == "awaiting_input", 900,
                            "iso_a's run to reach its review")
            # the held-back DAG runs nothing but says why
            held_run = server.api("POST", f"/api/v2/dags/{BROKEN}/dagRuns", {"logical_date": None})[1]["dag_run_id"]
            server.wait_for(lambda r=held_run: server.api("GET", f"/api/v2/dags/{BROKEN}/dagRuns/{r}")[1]["state"]
                            == "failed", 300, "the held-back DAG's run to fail")
    # fixed: its DAG comes back whole, the import error goes
    path.write_text(text(project, BROKEN))
    server.wait_for(lambda: not import_errors(server) and "template-error" not in
                    {t["name"] for t in dags(server).get(BROKEN, {}).get("tags", [{"name": "template-error"}])},
                    120, "the fixed template's DAG to return")
    _, tasks = server.api("GET", f"/api/v2/dags/{BROKEN}/tasks")
    assert "train" in {t["task_id"] for t in tasks["tasks"]}

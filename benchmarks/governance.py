"""What governance costs: sealing and checking evidence, and approval → production.

1. In-process, median of many: sealing a release record, checking its seal, the artifact digest
   of a registered model (what registration and promotion each compute once), and the whole
   ``verify_release`` decision.
2. Under a real scheduler, triggerer and API server (LocalExecutor, SQLite, 127.0.0.1): one
   request is run to its review, approved through the REST API, and the time from the approval
   to ``production`` moving is measured (and the ``promote`` task's own duration), with
   ``register_candidate`` (which seals the release record) timed in that run and, side by side, in
   a run of the same template without review.

Prints figures; asserts nothing. ``--quick`` runs part 1 only.
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
N = 200


def median_ms(fn, n: int = N) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def in_process() -> None:
    from mlflow import MlflowClient

    from closedloop.runtime.signing import Binding, Signer, digest
    from closedloop.steps import governance as gov
    from closedloop.steps.registry import artifact_digest

    key = Signer.generate()
    record = {"kind": "release_record", "model": "m", "version": "7", "gates_passed": True, "dag_id": "p",
              "run_id": "manual__2026", "requester_user": "alice", "source": "models:/m-abc", "model_uri": "models:/m/7",
              "artifact_digest": "sha256:" + "0" * 64, "gate_report_digest": "sha256:" + "1" * 64,
              "gate_summary": [{"metric": f"sim.s{i}.collision_rate", "value": 0.0, "passed": True} for i in range(12)],
              "template_hash": "abc", "dataset_digest": "def", "label_policy": "ttc@3"}
    where = Binding("p", "manual__2026", "register_candidate")
    sealed = key.seal(record, where)
    statement = {"kind": "approval", "model": "m", "version": "7", "record_digest": digest(record),
                 "decision": "approved", "responder": "bob", "production_at_review": "6",
                 "responded_at": datetime.now(UTC).isoformat()}
    policy = gov.ApprovalPolicy(approvers=["bob", "carol"], valid_hours=72)
    print(f"== in-process (median of {N})")
    print(f"  seal a release record          {median_ms(lambda: key.seal(record, where)):.3f} ms")
    print(f"  check its seal                 {median_ms(lambda: key.verifier.unseal(sealed, where, what='r')):.3f} ms")
    print(f"  verify_release (1 approval)    "
          f"{median_ms(lambda: gov.verify_release(record, [statement], model='m', policy=policy, production_now='6')):.3f} ms")
    tmp = Path(tempfile.mkdtemp(prefix="closedloop-bench-gov-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = MlflowClient(uri)
    c.create_registered_model("m")
    run = c.create_run(c.create_experiment("e", artifact_location=(tmp / "a").as_uri()))
    model = tmp / "model"
    model.mkdir()
    (model / "model.skops").write_bytes(b"\0" * 200_000)  # the size of the example policy's model
    (model / "MLmodel").write_text("flavors: {}\n")
    c.log_artifacts(run.info.run_id, str(model), "model")
    c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    print(f"  artifact digest of a version   {median_ms(lambda: artifact_digest('models:/m/1', uri), 30):.1f} ms "
          "(median of 30)")
    shutil.rmtree(tmp, ignore_errors=True)


def end_to_end() -> None:
    from closedloop.local.server import AirflowServer
    from tests.fixtures.runs import task_instances, wait_to_end

    tmp = Path(tempfile.mkdtemp(prefix="closedloop-bench-gov-"))
    root = tmp / "project"
    shutil.copytree(PROJECT / "dags", root / "dags")
    shutil.copytree(PROJECT / "include", root / "include")
    path = root / "include" / "pipelines" / "acc_longitudinal.yaml"
    text = path.read_text().replace("sampling: {hard_braking: 0.1}", "sampling: {}").replace(
        'schedule: "0 3 * * 1"', "schedule: null")
    path.write_text(text.split("\nincidents:")[0] + "\n")
    (root / "include" / "pipelines" / "acc_noreview.yaml").write_text(re.sub(
        r"\napproval:\n(  .*\n)+", "\n", path.read_text()).replace("name: acc_longitudinal\n", "name: acc_noreview\n")
        .replace("name: acc_longitudinal_policy", "name: acc_noreview_policy"))
    users = {"admin": ("admin", "admin-pw"), "ml-engineer": ("user", "me-pw"), "safety-lead": ("user", "sl-pw"),
             "safety-deputy": ("user", "sd-pw")}
    server = AirflowServer(tmp, root / "dags", users)
    print(f"== under the scheduler (Airflow in {tmp})", flush=True)
    server.start()
    try:
        for d in ("acc_longitudinal", "acc_noreview"):
            server.wait_for(lambda d=d: server.api("GET", f"/api/v2/dags/{d}")[0] == 200, 120, d)
        conf = {"purpose": "Benchmark the approval to production time.", "change": ["data"],
                "expected_impact": "none expected", "scope": "", "ticket": ""}
        _, floor_run = server.api("POST", "/api/v2/dags/acc_noreview/dagRuns", {"logical_date": None, "conf": conf})
        _, run = server.api("POST", "/api/v2/dags/acc_longitudinal/dagRuns", {"logical_date": None, "conf": conf},
                            user="ml-engineer")
        assert "dag_run_id" in run and "dag_run_id" in floor_run, (run, floor_run)
        rid = run["dag_run_id"]
        server.wait_for(lambda: task_instances(server, "acc_longitudinal", rid)["approval"]["state"] == "awaiting_input",
                        1200, "the review")
        time.sleep(3)
        approved = datetime.now(UTC)
        status, _ = server.api("PATCH", f"/api/v2/dags/acc_longitudinal/dagRuns/{rid}/taskInstances/approval/-1/"
                               "hitlDetails", {"chosen_options": ["Approve"], "params_input": {}}, user="safety-lead")
        assert status == 200, status
        _, tis = wait_to_end(server, "acc_longitudinal", rid, timeout=600)
        _, floor = wait_to_end(server, "acc_noreview", floor_run["dag_run_id"], timeout=600)

        def at(v: str) -> datetime:
            return datetime.fromisoformat(v.replace("Z", "+00:00"))

        promote = tis["promote"]
        print(f"  approval → production (promote ended)   {(at(promote['end_date']) - approved).total_seconds():.1f} s")
        print(f"  promote task duration                   {promote['duration']:.1f} s")
        print(f"  approval task resumed → ended           "
              f"{(at(tis['approval']['end_date']) - approved).total_seconds():.1f} s")
        print(f"  register_candidate (seals its record)   {tis['register_candidate']['duration']:.1f} s governed run, "
              f"{floor['register_candidate']['duration']:.1f} s the same template without review, side by side")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    in_process()
    if "--quick" not in sys.argv:
        end_to_end()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT))
    raise SystemExit(main())

"""Wall time of one pipeline run (the demo's), split into our steps' cost and Airflow's per-task cost,
plus what explicit pip requirements save on ``log_model``.

1. The demo pipeline through Airflow (``dag.test``) in a scratch home: per-task durations from
   Airflow's records and the run's wall time.
2. The same steps called directly (no Airflow) in a fresh interpreter (imports cold, as in the
   Airflow run) under another run key: the cost of our code alone, imports included.
   Airflow's share of a task = its duration - the step's time.
3. ``mlflow.sklearn.log_model`` with pip-requirement inference vs explicit requirements,
   interleaved, median of 3.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import full_run_project  # noqa: E402

TMP = Path(os.environ.get("CLOSEDLOOP_BENCH_TMP") or tempfile.mkdtemp(prefix="closedloop-bench-"))
os.environ["CLOSEDLOOP_BENCH_TMP"] = str(TMP)  # the --direct child shares the scratch store
os.environ.update({
    "CLOSEDLOOP_HOME": str(TMP / "home"), "AIRFLOW_HOME": str(TMP / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(TMP / "project" / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "GX_ANALYTICS_ENABLED": "False", "MLFLOW_TRACKING_URI": f"sqlite:///{TMP / 'home' / 'mlflow.db'}",
})
(TMP / "home").mkdir(parents=True, exist_ok=True)
(TMP / "airflow").mkdir(exist_ok=True)


def scratch_project() -> Path:
    return full_run_project(TMP / "project")


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def direct_steps(when: date) -> dict[str, float]:
    from closedloop.runtime.context import RunContext
    from closedloop.spec import load_spec
    from closedloop.steps import dataset, evaluation, gates, labeling, registry, simulation, training, validation

    loaded = load_spec(scratch_project() / "include" / "pipelines" / "acc_longitudinal.yaml")
    ctx = RunContext(pipeline="acc_longitudinal", template_digest=loaded.digest, dag_id="acc_longitudinal",
                     run_id="bench__direct", use_cache=False)  # measure the work, not the step cache
    t: dict[str, float] = {}
    raw, t["generate_dataset"] = timed(dataset.generate_dataset, loaded, ctx, interval_end=when)
    lab, t["label"] = timed(labeling.label, loaded, ctx, raw=raw)
    val, t["validate_data"] = timed(validation.validate_data, loaded, ctx, labelled=lab)
    tr, t["train"] = timed(training.train, loaded, ctx, labelled=lab, validation=val, raw=raw)
    ev, t["offline_eval"] = timed(evaluation.offline_eval, loaded, ctx, labelled=lab, trained=tr)
    start = time.perf_counter()
    job = simulation.launch(loaded, ctx, trained=tr)
    while simulation.poll(job["job_dir"], job["pid"], job["host"])[0] == "running":
        time.sleep(0.2)
    sim = simulation.collect(loaded, ctx, job=job["job_dir"], trained=tr)
    t["simulate"] = time.perf_counter() - start
    g, t["release_gate"] = timed(gates.release_gate, loaded, ctx, offline=ev, simulation=sim)
    _, t["register_candidate"] = timed(registry.register_candidate, loaded, ctx, trained=tr, labelled=lab, gate=g)
    return t


def log_model_costs() -> tuple[float, float]:
    import mlflow

    from closedloop.driving.policy import train_policy
    from closedloop.runtime.storage import read_snapshot
    from closedloop.steps.models import log_model
    from closedloop.steps.training import pip_requirements

    labelled = next((TMP / "home" / "data" / "acc_longitudinal" / "labelled").glob("*.parquet"))
    model = train_policy(read_snapshot(str(labelled), labelled.stem).head(3000), max_iter=20)
    mlflow.set_experiment("bench-log-model")
    inferred, explicit = [], []
    for _ in range(3):
        with mlflow.start_run():
            _, s = timed(mlflow.sklearn.log_model, model, name="model",
                         skops_trusted_types=train_policy.skops_trusted_types)
            inferred.append(s)
        with mlflow.start_run():
            _, s = timed(log_model, model, trainer=train_policy, pip_requirements=pip_requirements())
            explicit.append(s)
    return statistics.median(inferred), statistics.median(explicit)


def main() -> None:
    import json
    import subprocess

    from closedloop.local.run import ensure_db, load_dag, run_dag

    when = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
    scratch_project()
    out = subprocess.run([sys.executable, __file__, "--direct"], capture_output=True, text=True, check=True,
                         env=os.environ)
    ours = json.loads(out.stdout.strip().splitlines()[-1])
    ensure_db()
    summary, wall = timed(run_dag, load_dag("acc_longitudinal"), when, conf={"closedloop_cache": False})
    assert summary["state"] == "success", summary
    print(f"\none run of acc_longitudinal through Airflow (dag.test): {wall:.1f} s wall, state {summary['state']}")
    print(f"{'task':<20}{'Airflow task':>14}{'our step':>11}{'Airflow share':>15}")
    tot_task = tot_step = 0.0
    for t in summary["tasks"]:
        step = ours[t["task_id"]]
        tot_task += t["duration_s"]
        tot_step += step
        print(f"{t['task_id']:<20}{t['duration_s']:>12.2f} s{step:>9.2f} s{t['duration_s'] - step:>13.2f} s")
    print(f"{'sum':<20}{tot_task:>12.2f} s{tot_step:>9.2f} s{tot_task - tot_step:>13.2f} s")
    print(f"between tasks (scheduling inside dag.test, DB, XCom): {wall - tot_task:.1f} s")
    inferred, explicit = log_model_costs()
    print(f"\nlog_model: inferred pip requirements {inferred:.2f} s vs explicit {explicit:.2f} s "
          f"(median of 3 each, interleaved): {inferred / explicit:.1f}x")


if __name__ == "__main__":
    if sys.argv[1:] == ["--direct"]:
        import json

        print(json.dumps(direct_steps(date(2026, 11, 23))))
    else:
        main()

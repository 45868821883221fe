"""Step ``simulate``: a closed-loop simulation as a separate job, awaited without a worker slot.

``launch`` starts the job (a detached local process by default) and returns at once;
the Airflow layer then defers to a trigger that calls ``poll`` until the job is done;
``collect`` logs the results into the pipeline run's MLflow run tree. The job itself is
``python -m closedloop.steps.simulation JOB_DIR``: it needs only the job folder.
Everything is keyed by the pipeline run, so a retry re-attaches to a running or finished job
instead of starting a second one.

Liveness works across hosts: the job writes ``heartbeat.json`` into its job folder (where every
host can read it: the data root) every :data:`HEARTBEAT_SECONDS`; a job with no result whose
heartbeat is older than ``simulation.dead_after_seconds`` (or that never beat within that time of
its launch) is declared dead — an ``error.json`` says so, so a retry launches it again — whether
the poller runs on the job's host or not. On the job's own host a vanished process is noticed at
once (pid check).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from closedloop import settings
from closedloop.spec import LoadedSpec
from closedloop.steps import tracking
from closedloop.steps.context import RunContext

log = logging.getLogger(__name__)


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def job_dir(ctx: RunContext) -> str:
    key = hashlib.sha256(ctx.run_key.encode()).hexdigest()[:16]
    return f"{ctx.data_root}/{ctx.pipeline}/jobs/{key}/simulate"


def local_log_path(job: str) -> Path:
    return settings.home() / "jobs" / hashlib.sha256(job.encode()).hexdigest()[:16] / "simulate.log"


def _read_json(fs, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def _write_json(fs, path: str, data: dict) -> None:
    import uuid

    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "w") as fh:
        json.dump(data, fh, sort_keys=True)
    fs.mv(tmp, path)


HEARTBEAT_SECONDS = float(os.environ.get("CLOSEDLOOP_JOB_HEARTBEAT_SECONDS", "5"))
DEAD_AFTER_SECONDS = 60.0


def _beat(job: str, stop) -> None:
    """The job's heartbeat (a thread of the job process): its host, pid and the time, every few seconds."""
    import time

    fs, path = _fs(job)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            _write_json(fs, f"{path}/heartbeat.json", {"at": time.time(), "n": n, "pid": os.getpid(),
                                                       "host": socket.gethostname()})
        except OSError as exc:  # a missed beat is not fatal; a long silence is
            log.warning("heartbeat not written: %s", exc)
        stop.wait(HEARTBEAT_SECONDS)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a finished child of a still-running parent is a zombie: dead for us
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def launch(loaded: LoadedSpec, ctx: RunContext, *, trained: dict) -> dict:
    """Start the simulation job for this pipeline run unless it is already running or done."""
    job = job_dir(ctx)
    fs, path = _fs(job)
    spec = {"model_uri": trained["model_uri"], "entry_point": loaded.spec.simulation.entry_point,
            "catalog": yaml.safe_load(loaded.scenario_path.read_text()), "tracking_uri": ctx.tracking_uri,
            "scenario_set": loaded.spec.simulation.scenario_set}
    existing = _read_json(fs, f"{path}/job.json")
    if existing and existing.get("spec") == spec:
        state, _ = poll(job, existing.get("pid"), existing.get("host"), loaded.spec.simulation.dead_after_seconds)
        if state in ("running", "success"):
            log.info("simulation job %s is already %s: attaching to it", job, state)
            return {"job_dir": job, "pid": existing["pid"], "host": existing["host"], "attached": True}
    fs.makedirs(path, exist_ok=True)
    for stale in ("result.json", "error.json"):
        if fs.exists(f"{path}/{stale}"):
            fs.rm(f"{path}/{stale}")
    logfile = local_log_path(job)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    for old in ("heartbeat.json",):
        if fs.exists(f"{path}/{old}"):
            fs.rm(f"{path}/{old}")
    _write_json(fs, f"{path}/job.json", {"spec": spec})
    import time

    launched_at = time.time()
    with open(logfile, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "closedloop.steps.simulation", job],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "MLFLOW_TRACKING_URI": ctx.tracking_uri})
    record = {"spec": spec, "pid": proc.pid, "host": socket.gethostname(), "log": str(logfile),
              "launched_at": launched_at}
    _write_json(fs, f"{path}/job.json", record)
    log.info("started simulation job pid %s in %s (log: %s)", proc.pid, job, logfile)
    return {"job_dir": job, "pid": proc.pid, "host": record["host"], "attached": False}


def poll(job: str, pid: int | None, host: str | None, dead_after: float = DEAD_AFTER_SECONDS) -> tuple[str, dict]:
    """One look at a job: ``("running"|"success"|"failed", details)``. Cheap; safe to call often.

    A job with neither result nor error is dead when its process is gone (on its own host), or when
    its heartbeat is older than ``dead_after`` seconds (from anywhere); then ``error.json`` records
    why, so every later look — and a retry's launch — agrees."""
    import time

    fs, path = _fs(job)
    result = _read_json(fs, f"{path}/result.json")
    if result is not None:
        return "success", {"result_path": f"{job}/result.json"}
    error = _read_json(fs, f"{path}/error.json")
    if error is not None:
        return "failed", error
    dead = None
    if pid and host == socket.gethostname() and not _pid_alive(int(pid)):
        dead = f"simulation process {pid} exited without a result"
    else:
        beat = _read_json(fs, f"{path}/heartbeat.json")
        record = _read_json(fs, f"{path}/job.json") or {}
        since = beat["at"] if beat else record.get("launched_at")
        if since is not None and time.time() - float(since) > dead_after:
            who = f"host {beat['host']} pid {beat['pid']}" if beat else f"host {host} pid {pid}"
            dead = (f"simulation job ({who}) silent for {time.time() - float(since):.0f} s: no heartbeat "
                    f"{'since its last one' if beat else 'since its launch'} (dead after {dead_after:g} s)")
    if dead is None:
        return "running", {}
    tail = ""
    logfile = local_log_path(job)
    if logfile.exists():
        tail = logfile.read_text(errors="replace")[-2000:]
    error = {"error": dead, "log_tail": tail, "declared_dead": True}
    _write_json(fs, f"{path}/error.json", error)
    return "failed", error


def plan(loaded: LoadedSpec, ctx, results: dict):
    """The step table's cache-plan entry of ``simulate``."""
    return simulation_key(loaded, results["train"]), None, None


def simulation_key(loaded: LoadedSpec, trained: dict) -> str:
    """Cache key of ``simulate``: the model (through the training's key), the simulator and the
    scenario catalog's content."""
    from closedloop.steps.cache import key_of

    catalog = hashlib.sha256(loaded.scenario_path.read_bytes()).hexdigest()[:16]
    sim = loaded.spec.simulation
    return key_of(loaded, "simulate", entry_point=sim.entry_point, scenario_set=sim.scenario_set, catalog=catalog,
                  upstream=trained.get("cache_key") or trained["model_uri"])


def reuse(loaded: LoadedSpec, ctx: RunContext, *, trained: dict) -> dict | None:
    """The simulation result this run already has (a retry) or the step cache holds; None: launch."""
    from closedloop.steps import cache

    _, result = cache.reuse(loaded, ctx, "simulate", simulation_key(loaded, trained))
    return result


def collect(loaded: LoadedSpec, ctx: RunContext, *, job: str, trained: dict) -> dict:
    """Log the finished job's metrics and per-episode results into the ``simulate`` MLflow run."""
    from closedloop.steps.cache import KEY_TAG

    key = simulation_key(loaded, trained)
    run = tracking.step_run(loaded, ctx, "simulate", step_tags={KEY_TAG: key})
    done = tracking.finished_result(run)
    if done:
        return done
    fs, path = _fs(job)
    result = _read_json(fs, f"{path}/result.json")
    if result is None:
        from closedloop.errors import TransientError

        raise TransientError(f"simulation job {job} reported success but has no result.json yet")
    metrics = {f"sim.{k}": v for k, v in result["metrics"].items()}
    c = tracking.client(ctx)
    c.log_batch(run.info.run_id, metrics=tracking.metric_entities(metrics),
                params=[_param("scenario_set", loaded.spec.simulation.scenario_set),
                        _param("model_uri", trained["model_uri"])])
    c.log_dict(run.info.run_id, result["episodes"], "simulation/episodes.json")
    return tracking.finish(ctx, run.info.run_id, {"run_id": run.info.run_id, "metrics": metrics,
                                                   "episodes": len(result["episodes"]), "cache_key": key,
                                                   "cache": {"hit": False, "key": key}})


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, str(value))


def main(job: str) -> int:
    """Entry point of the job process."""
    import traceback

    from closedloop.steps.context import resolve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import threading

    stop = threading.Event()
    threading.Thread(target=_beat, args=(job, stop), daemon=True, name="heartbeat").start()  # before any import
    fs, path = _fs(job)
    spec = _read_json(fs, f"{path}/job.json")["spec"]
    try:
        import mlflow

        mlflow.set_tracking_uri(spec["tracking_uri"])
        from closedloop.steps.models import load_model

        model = load_model(spec["model_uri"])
        log.info("simulating %s on scenario set %s", spec["model_uri"], spec["scenario_set"])
        result = resolve(spec["entry_point"])(model, spec["catalog"])
        _write_json(fs, f"{path}/result.json", result)
        log.info("done: %s", json.dumps(result["metrics"], sort_keys=True))
        return 0
    except Exception as exc:
        _write_json(fs, f"{path}/error.json", {"error": f"{type(exc).__name__}: {exc}",
                                               "log_tail": traceback.format_exc()[-2000:]})
        raise
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))


def simulate_inline(loaded: LoadedSpec, ctx: RunContext, *, trained: dict) -> dict:
    """The whole step in this process (a Kubernetes pod): the cache or this run's earlier result,
    else the same job code as a local job (:func:`main`) and :func:`collect`."""
    done = reuse(loaded, ctx, trained=trained)
    if done is not None:
        return done
    job = job_dir(ctx)
    fs, path = _fs(job)
    spec = {"model_uri": trained["model_uri"], "entry_point": loaded.spec.simulation.entry_point,
            "catalog": yaml.safe_load(loaded.scenario_path.read_text()), "tracking_uri": ctx.tracking_uri,
            "scenario_set": loaded.spec.simulation.scenario_set}
    if poll(job, None, None)[0] != "success":
        fs.makedirs(path, exist_ok=True)
        _write_json(fs, f"{path}/job.json", {"spec": spec, "pid": os.getpid(), "host": socket.gethostname()})
        main(job)
    return collect(loaded, ctx, job=job, trained=trained)

"""The simulation trigger: exact serialization, and real polling of real job folders."""

from __future__ import annotations

import asyncio
import importlib
import json
import socket
import subprocess
import sys

from closedloop.triggers.simulation import SimulationJobTrigger


def test_serialize_round_trips_exactly():
    trigger = SimulationJobTrigger(job_dir="s3://bucket/p/jobs/abc/simulate", pid=42, host="worker-1", poll_interval=0.5)
    classpath, kwargs = trigger.serialize()
    assert classpath == "closedloop.triggers.simulation.SimulationJobTrigger"
    assert kwargs == {"job_dir": "s3://bucket/p/jobs/abc/simulate", "pid": 42, "host": "worker-1", "poll_interval": 0.5}
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)  # what the triggerer does
    assert rebuilt.serialize() == (classpath, kwargs)


def first_event(trigger: SimulationJobTrigger, timeout: float = 30.0) -> dict:
    async def go():
        agen = trigger.run()
        return await asyncio.wait_for(agen.__anext__(), timeout)

    return asyncio.run(go()).payload


def test_reports_success_once_the_result_appears(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    # a real child process that writes the result after a moment, like the simulation job does
    proc = subprocess.Popen([sys.executable, "-c",
                             f"import time, json; time.sleep(0.6); open({str(job / 'result.json')!r}, 'w').write(json.dumps({{'metrics': {{}}}}))"])
    event = first_event(SimulationJobTrigger(job_dir=str(job), pid=proc.pid, host=socket.gethostname(), poll_interval=0.1))
    proc.wait()
    assert event == {"status": "success", "job_dir": str(job), "result_path": f"{job}/result.json"}


def test_reports_failure_when_the_process_dies_without_result(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait()
    event = first_event(SimulationJobTrigger(job_dir=str(job), pid=proc.pid, host=socket.gethostname(), poll_interval=0.1))
    assert event["status"] == "failed"
    assert f"simulation process {proc.pid} exited without a result" in event["error"]


def test_reports_the_job_error_file(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "error.json").write_text(json.dumps({"error": "ValueError: bad catalog", "log_tail": "..."}))
    event = first_event(SimulationJobTrigger(job_dir=str(job), pid=None, host=None, poll_interval=0.1))
    assert event["status"] == "failed" and event["error"] == "ValueError: bad catalog"

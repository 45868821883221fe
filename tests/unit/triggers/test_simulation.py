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
    trigger = SimulationJobTrigger(job_dir="s3://bucket/p/jobs/abc/simulate", pid=42, host="worker-1", poll_interval=0.5,
                                   dead_after=30.0)
    classpath, kwargs = trigger.serialize()
    assert classpath == "closedloop.triggers.simulation.SimulationJobTrigger"
    assert kwargs == {"job_dir": "s3://bucket/p/jobs/abc/simulate", "pid": 42, "host": "worker-1", "poll_interval": 0.5,
                      "dead_after": 30.0}
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


BEATING = "import sys, threading; from closedloop.steps.simulation import _beat; _beat(sys.argv[1], threading.Event())"


def test_a_silent_job_is_declared_dead_from_another_host(tmp_path):
    """The triggerer on another host (a host name other than the job's: the pid means nothing there)
    sees a job alive while its real process writes heartbeats, and dead a bounded time after a
    SIGKILL silences it — not after the whole simulation timeout."""
    import os
    import time

    from closedloop.steps.simulation import poll

    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text(json.dumps({"spec": {}, "launched_at": time.time()}))
    proc = subprocess.Popen([sys.executable, "-c", BEATING, str(job)],
                            env={**os.environ, "CLOSEDLOOP_JOB_HEARTBEAT_SECONDS": "0.3"})
    try:
        deadline = time.monotonic() + 60
        while not (job / "heartbeat.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        beat = json.loads((job / "heartbeat.json").read_text())
        assert beat["pid"] == proc.pid
        time.sleep(2.5)  # alive for longer than dead_after: the beats keep it so
        assert poll(str(job), proc.pid, "another-host", dead_after=2.0) == ("running", {})
    finally:
        proc.kill()
        proc.wait()
    killed = time.monotonic()
    event = first_event(SimulationJobTrigger(job_dir=str(job), pid=proc.pid, host="another-host", poll_interval=0.2,
                                             dead_after=2.0))
    assert time.monotonic() - killed < 30  # bounded by the silence, not by a timeout
    assert event["status"] == "failed" and "silent for" in event["error"] and f"pid {proc.pid}" in event["error"]
    assert json.loads((job / "error.json").read_text())["declared_dead"] is True  # a retry relaunches it


def test_a_job_that_never_beats_is_dead_after_the_same_time(tmp_path):
    import time

    from closedloop.steps.simulation import poll

    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text(json.dumps({"spec": {}, "launched_at": time.time() - 10}))
    state, details = poll(str(job), 999999, "another-host", dead_after=5.0)
    assert state == "failed" and "since its launch" in details["error"]

"""The simulate operator's wait in the task (``simulation.defer_after_seconds``): real job folders,
real child processes standing in for the simulation job, the real ``poll``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from closedloop.operators.simulation import SimulateOperator
from closedloop.spec import load_spec
from tests.conftest import template_text


def operator(make_project, project, defer_after: float) -> SimulateOperator:
    path = make_project("acc.yaml", template_text(project, **{
        "scenario_set: standard": f"scenario_set: standard\n  defer_after_seconds: {defer_after}"}))
    loaded = load_spec(path)
    assert loaded.spec.simulation.defer_after_seconds == defer_after
    return SimulateOperator(task_id="simulate", loaded=loaded, poll_interval=0.5)


def job(tmp_path, seconds: float, *, write_result: bool = True) -> dict:
    folder = tmp_path / "job"
    folder.mkdir()
    body = f"open({str(folder / 'result.json')!r}, 'w').write({json.dumps(json.dumps({'metrics': {}}))})" \
        if write_result else "pass"
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds}); {body}"])
    return {"job_dir": str(folder), "pid": proc.pid, "host": socket.gethostname(), "proc": proc}


def test_a_short_job_is_waited_for_in_the_task(make_project, project, tmp_path):
    op = operator(make_project, project, 20)
    j = job(tmp_path, 0.5)
    started = time.monotonic()
    event = op.wait_inline(j)
    assert event == {"status": "success", "job_dir": j["job_dir"], "result_path": f"{j['job_dir']}/result.json"}
    assert time.monotonic() - started < 10  # it returned when the job ended, not at the deadline
    j["proc"].wait()


def test_a_job_that_dies_while_waited_for_fails_like_the_trigger_says(make_project, project, tmp_path):
    op = operator(make_project, project, 20)
    j = job(tmp_path, 0.3, write_result=False)
    event = op.wait_inline(j)
    assert event["status"] == "failed" and "exited without a result" in event["error"], event


def test_a_longer_job_defers_after_the_threshold_and_zero_always_defers(make_project, project, tmp_path):
    op = operator(make_project, project, 1)
    j = job(tmp_path, 30)
    try:
        started = time.monotonic()
        assert op.wait_inline(j) is None  # still running: the caller defers to the triggerer
        assert 1 <= time.monotonic() - started < 5
        started = time.monotonic()
        assert operator(make_project, project, 0).wait_inline(j) is None
        assert time.monotonic() - started < 0.5
    finally:
        j["proc"].kill()
        j["proc"].wait()

"""Warm tasks (closedloop.executors): what the parent preloads is third-party only, starts no thread and opens
no handle, and the hooks are what Airflow loads from its configuration. The leak test (two pipelines
with different MLflow connections, a crashing task between them) runs under the real scheduler in
tests/integration/test_scheduler_run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, os, sys, threading
def fds():
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{f}"))
        except FileNotFoundError:  # the listing's own handle, closed by now
            pass
    return sorted(out)
before, threads = fds(), threading.active_count()
from closedloop import executors
ours_before = sorted(m for m in sys.modules if m.startswith("closedloop"))
took = executors.preload()
print(json.dumps({"took": took, "threads": [threading.active_count(), threads],
                  "fds": [fds(), before], "ours": [sorted(m for m in sys.modules if m.startswith("closedloop")), ours_before],
                  "loaded": [m for m in executors.PRELOAD if m in sys.modules]}))
"""


def probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GX_ANALYTICS_ENABLED": "False", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_preload_imports_the_libraries_and_nothing_of_ours_starting_no_thread_and_no_handle():
    seen = probe()
    from closedloop.executors import PRELOAD

    assert seen["loaded"] == list(PRELOAD) and set(seen["took"]) == set(PRELOAD)
    assert seen["took"]["mlflow"] > 0 and seen["took"]["great_expectations"] > 0
    now, before = seen["threads"]
    assert now == before == 1, seen["threads"]  # forking a process with threads would copy their locks
    now, before = seen["fds"]
    assert now == before, set(now) ^ set(before)  # no file, socket or database handle inherited by tasks
    now, before = seen["ours"]
    assert now == before, set(now) - set(before)  # closedloop and entry-point code is read by each task


def test_a_library_that_fails_to_import_is_skipped_and_a_library_that_imports_our_code_is_refused(tmp_path):
    from closedloop import executors

    took = executors.preload(("json", "closedloop_no_such_library"))
    assert list(took) == ["json"]
    (tmp_path / "sneaky_lib.py").write_text("import closedloop.steps.gates\n")
    sys.path.insert(0, str(tmp_path))
    try:
        before = {m for m in sys.modules if m.startswith("closedloop.")}
        if "closedloop.steps.gates" in before:  # another test imported it: measure in a fresh process instead
            out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                  "from closedloop import executors; executors.preload(('sneaky_lib',))", str(tmp_path)],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode != 0 and "imported closedloop modules" in out.stderr, out.stderr[-2000:]
        else:
            import pytest

            with pytest.raises(RuntimeError, match="imported closedloop modules"):
                executors.preload(("sneaky_lib",))
    finally:
        sys.path.remove(str(tmp_path))


def test_airflow_loads_the_warm_executor_and_the_celery_hook_from_its_configuration(tmp_path):
    code = r"""
import json
from airflow.executors.executor_loader import ExecutorLoader
executor = ExecutorLoader.get_default_executor()
from airflow.providers.celery.executors.celery_executor_utils import get_celery_configuration
from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import worker_init
config = get_celery_configuration()
print(json.dumps({"executor": type(executor).__module__ + "." + type(executor).__name__,
                  "celery_same": config == DEFAULT_CELERY_CONFIG,
                  "hooked": [str(r[1]) for r in worker_init.receivers]}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={
        **os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__EXECUTOR": "closedloop.executors.WarmLocalExecutor",
        "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "closedloop.executors.CELERY_CONFIG"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["executor"] == "closedloop.executors.WarmLocalExecutor"
    assert seen["celery_same"]  # Airflow's Celery configuration, unchanged
    assert "_on_celery_worker_init" in " ".join(seen["hooked"]), seen


def test_the_switch_turns_it_off():
    from closedloop import executors

    for value, on in (("0", False), ("false", False), ("off", False), ("1", True), ("", True)):
        os.environ["CLOSEDLOOP_WARM_TASKS"] = value
        try:
            assert executors.enabled() is on, value
        finally:
            del os.environ["CLOSEDLOOP_WARM_TASKS"]
    assert executors.enabled()

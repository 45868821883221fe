"""Under CI (``CLOSEDLOOP_CI=1``, set by ``.ci/run``) a test that would skip for a missing component
fails, and the summary always says how many were skipped (a real pytest run in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import PROJECT

SAMPLE = '''
import pytest

def test_runs():
    assert True

def test_needs_a_browser():
    pytest.skip("needs Debian's chromium")
'''

CONFTEST = "from tests.conftest import pytest_runtest_makereport, pytest_terminal_summary  # noqa: F401\n"


def run(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "CLOSEDLOOP_CI": "1" if ci else "0", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_a_skip_is_a_failure_under_ci_and_counted_elsewhere(tmp_path):
    local = run(tmp_path, ci=False)
    assert local.returncode == 0 and "1 passed, 1 skipped" in local.stdout
    assert "closedloop: 1 test(s) skipped" in local.stdout
    ci = run(tmp_path, ci=True)
    assert ci.returncode == 1 and "1 failed, 1 passed" in ci.stdout
    assert "would skip" in ci.stdout and "needs Debian's chromium" in ci.stdout and "a skip is a failure" in ci.stdout

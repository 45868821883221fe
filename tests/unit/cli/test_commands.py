"""The closedloop command on templates: exit codes and what a person reads."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import template_text


def closedloop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "closedloop.cli", *args], capture_output=True, text=True, timeout=120)


def test_validate_ok_and_invalid(make_project, project):
    out = closedloop("pipelines", "validate")
    assert out.returncode == 0, out.stderr
    assert "ok       " in out.stdout and "acc_longitudinal.yaml" in out.stdout
    bad = make_project("bad.yaml", template_text(project, **{"sources: [fleet-eu, fleet-us]": "sources: fleet-eu"}))
    out = closedloop("pipelines", "validate", str(bad))
    assert out.returncode == 2
    assert f"INVALID  {bad}: invalid pipeline template" in out.stderr
    assert "dataset.sources: input should be a valid list" in out.stderr


def test_describe_gives_purpose_inputs_outputs_dependencies_schedule():
    out = closedloop("pipelines", "describe", "acc_longitudinal")
    assert out.returncode == 0, out.stderr
    for heading in ("# Pipeline `acc_longitudinal`", "## Inputs", "## Outputs", "## Dependencies", "## Release gates"):
        assert heading in out.stdout
    assert "`0 3 * * 1` (At 03:00 AM, only on Monday, UTC)" in out.stdout
    assert "Registered model **`acc_longitudinal_policy`**" in out.stdout
    assert "expert_idm_smoothed@2" in out.stdout


def test_unknown_pipeline_is_exit_code_2_without_traceback():
    out = closedloop("pipelines", "describe", "nope")
    assert out.returncode == 2
    assert "no valid pipeline named 'nope'" in out.stderr and "known: acc_longitudinal" in out.stderr
    assert "Traceback" not in out.stderr
    out = closedloop("run", "nope")
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_mlflow_telemetry_is_off_unless_asked_for(tmp_path):
    """Importing closedloop turns MLflow's usage telemetry off (our steps run next to driving data);
    MLFLOW_DISABLE_TELEMETRY=false turns it back on. A clean environment: MLflow also stays quiet
    under pytest or CI, which would hide the difference."""
    import subprocess
    import sys

    code = "import closedloop; from mlflow.telemetry.utils import is_telemetry_disabled as off; print(off())"
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    answers = [subprocess.run([sys.executable, "-c", code], env={**clean, **extra}, capture_output=True, text=True,
                              timeout=120).stdout.strip() for extra in ({}, {"MLFLOW_DISABLE_TELEMETRY": "false"})]
    assert answers == ["True", "False"]

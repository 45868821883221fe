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


def test_validate_catches_from_the_template_alone_what_would_fail_later(make_project, project, tmp_path):
    """What used to pass `validate` and fail after compute: a model another template of the folder
    produces (validating one file), a gate on a scenario type the set does not have, a person the
    deployment does not know, an entry point whose module exists but does not import."""
    import os

    make_project("acc_longitudinal.yaml", template_text(project))
    twin = make_project("twin.yaml", template_text(project, **{"name: acc_longitudinal": "name: acc_twin"}))
    out = closedloop("pipelines", "validate", str(twin))
    assert out.returncode == 2 and "0 valid, 1 invalid" in out.stdout
    assert f"INVALID  {twin}: model.name: registered model 'acc_longitudinal_policy' is already produced by" in out.stderr
    twin.unlink()
    typo = make_project("typo.yaml", template_text(project, **{
        "name: acc_longitudinal": "name: acc_typo", "name: acc_longitudinal_policy": "name: acc_typo_model",
        "metric: sim.hard_braking.collision_rate": "metric: sim.hard_brakng.collision_rate"}))
    out = closedloop("pipelines", "validate", str(typo))
    assert out.returncode == 2
    assert ("gates[2].metric: 'sim.hard_brakng.collision_rate': scenario set 'standard' has no scenario type "
            "'hard_brakng'; did you mean 'sim.hard_braking.collision_rate'?") in out.stderr, out.stderr
    typo.unlink()
    # a company's entry point that exists but raises on import; an approver nobody created
    pkg = tmp_path / "acme_sim"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("raise RuntimeError('needs the vendor SDK')\ndef run(): pass\n")
    text = template_text(project, **{
        "name: acc_longitudinal": "name: acc_odd", "name: acc_longitudinal_policy": "name: acc_odd_model",
        "approvers: [safety-lead, safety-deputy]": "approvers: [safety-lead, nobody]"})
    text = text.replace("  scenario_set: standard", "  scenario_set: standard\n  summarize: acme_sim.broken:run", 1)
    odd = make_project("odd.yaml", text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "safety-lead:user,safety-deputy:user,fleet-monitor:viewer"}
    out = subprocess.run([sys.executable, "-m", "closedloop.cli", "pipelines", "validate", str(odd)],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert (f"{odd}: simulation.summarize: entry point 'acme_sim.broken:run': importing acme_sim.broken failed: "
            "RuntimeError: needs the vendor SDK") in out.stderr, out.stderr
    assert f"{odd}: approval.approvers: 'nobody' is not a user of this deployment" in out.stderr
    # without a readable user list: a warning, not an error
    env.pop("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS")
    odd.write_text(text.replace("  summarize: acme_sim.broken:run\n", ""))
    out = subprocess.run([sys.executable, "-m", "closedloop.cli", "pipelines", "validate", str(odd)],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0 and "warning: cannot check the people the templates name" in out.stderr, out.stderr


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


def test_version_and_help_speak_plainly():
    from closedloop import __version__

    out = closedloop("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"closedloop {__version__}"
    out = closedloop("--help")
    assert out.returncode == 0 and "``" not in out.stdout and "Exit codes: 0 done" in out.stdout

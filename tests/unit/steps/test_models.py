"""Logging a model (closedloop.steps.models) as a task process does: real scikit-learn, skops and
MLflow (SQLite in a temp dir), in a fresh interpreter that loaded Airflow first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import importlib, json, sys, warnings
from pathlib import Path
importlib.import_module("airflow.sdk")  # what a task process holds first: Airflow, with its deprecated
importlib.import_module("airflow.utils.timezone")  # import shims (each warns when an attribute is looked up)
import mlflow
import pandas as pd
from closedloop.driving.dynamics import FEATURES
from closedloop.driving.policy import train_policy
from closedloop.steps.models import log_model

rows = pd.DataFrame({f: [float((i * (k + 3)) % 29) for i in range(200)] for k, f in enumerate(FEATURES)})
rows["target_accel"] = rows["gap"] * 0.1 - rows["ego_speed"] * 0.05
model = train_policy(rows, max_iter=5)
mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
mlflow.set_experiment("models")
with warnings.catch_warnings(record=True) as caught, mlflow.start_run():
    warnings.simplefilter("always")
    info = log_model(model, trainer=train_policy, pip_requirements=["scikit-learn==1.0"])
shims = [str(w.message) for w in caught if str(w.message).startswith("The `airflow.")]
folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path="m"))
print(json.dumps({"shims": shims[:3], "n": len(shims), "files": sorted(p.name for p in folder.rglob("*")),
                  "requirements": (folder / "requirements.txt").read_text()}))
"""


def test_a_model_logged_beside_airflow_and_a_uv_project_is_quiet_and_carries_only_its_requirements(tmp_path):
    # a worker started in someone's checkout: a uv project in the working directory
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "someones-checkout"\nversion = "0"\n')
    (tmp_path / "uv.lock").write_text("version = 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**env, "PYTHONPATH": str(Path(__file__).parents[3])})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # skops looks up objects without a module in every loaded module: not one warning through the task log
    assert seen["n"] == 0, seen["shims"]
    assert {"MLmodel", "requirements.txt", "model.skops"} <= set(seen["files"]), seen["files"]
    assert not {"uv.lock", "pyproject.toml", ".python-version"} & set(seen["files"]), seen["files"]  # not the checkout's
    assert "scikit-learn==1.0" in seen["requirements"]

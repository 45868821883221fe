"""Shared by the benchmarks: the project copy they run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def full_run_project(root: Path) -> Path:
    """dags/ + include/ under ``root`` with the shipped template minus its review step (dag.test
    would wait for a reviewer; the review's cost is a person's, not the machine's), with hard-braking
    logs mined as an incident retrain mines them (the shipped sample's model is stopped by the
    hard-braking gate: a full run, through registration, is measured) and simulation unsharded (the
    shards' cost is measured on its own by ``simulation_shards.py``)."""
    if not root.exists():
        shutil.copytree(PROJECT / "dags", root / "dags")
        shutil.copytree(PROJECT / "include", root / "include")
        path = root / "include" / "pipelines" / "acc_longitudinal.yaml"
        text = re.sub(r"\napproval:\n(  .*\n)+", "\n", path.read_text())
        text = re.sub(r"^  shards: .*\n", "", text, flags=re.M)
        path.write_text(text.replace("sampling: {hard_braking: 0.1}", "sampling: {hard_braking: 2.0}"))
    return root

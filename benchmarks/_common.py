"""Shared by the benchmarks: the project copy they run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def full_run_project(root: Path) -> Path:
    """dags/ + include/ under ``root`` with the shipped template minus its review step (dag.test
    would wait for a reviewer; the review's cost is a person's, not the machine's) and with every
    scenario type fully sampled (the shipped sample fails the hard-braking gate: a full run, through
    registration, is measured)."""
    if not root.exists():
        shutil.copytree(PROJECT / "dags", root / "dags")
        shutil.copytree(PROJECT / "include", root / "include")
        path = root / "include" / "pipelines" / "acc_longitudinal.yaml"
        text = re.sub(r"\napproval:\n(  .*\n)+", "\n", path.read_text())
        path.write_text(text.replace("sampling: {hard_braking: 0.1}", "sampling: {}"))
    return root

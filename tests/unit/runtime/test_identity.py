"""Code identity in the step cache: content of the code a step runs, with or without ``.git``
(real files, real MLflow store, a company entry point on disk)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

import closedloop
from closedloop.runtime import identity
from closedloop.runtime.context import RunContext
from closedloop.spec import load_spec

SRC = Path(closedloop.__file__).resolve().parent

PROBE = """
import json
from closedloop.runtime import identity
from closedloop.runtime.context import code_version
print(json.dumps({"train": identity.identity("closedloop.steps.training")["digest"],
                  "file": identity.__file__, "commit": identity.git_commit(), "version": code_version()}))
"""


def probe(site: Path) -> dict:
    """The identity as a fresh process with the package copied to ``site`` sees it (no ``.git`` there)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                         cwd=site, check=True)
    return json.loads(out.stdout)


def test_an_edit_changes_the_identity_with_or_without_git(tmp_path):
    site = tmp_path / "image"  # like an image built without .git: the package files only
    shutil.copytree(SRC, site / "closedloop", ignore=shutil.ignore_patterns("__pycache__"))
    here = identity.identity("closedloop.steps.training")["digest"]
    same = probe(site)
    assert same["file"].startswith(str(site)) and same["commit"] is None
    assert same["train"] == here  # the same files: the same identity, .git or not
    training = site / "closedloop" / "steps" / "training.py"
    original = training.read_text()
    training.write_text(original + "\n# edit one\n")
    one = probe(site)
    training.write_text(original + "\n# edit two\n")
    two = probe(site)
    assert len({here, one["train"], two["train"]}) == 3  # two uncommitted edits never share a key
    assert len({same["version"], one["version"], two["version"]}) == 3  # and the recorded version says so
    training.write_text(original)
    (site / "closedloop" / "web" / "app.py").write_text("# not executed by train\n")
    assert probe(site)["train"] == here  # a module train never imports is not in its identity


def test_libraries_and_a_pods_image_are_part_of_the_identity(project):
    loaded = load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml")
    base = identity.identity("closedloop.steps.training", ("closedloop.driving.policy:train_policy",))
    assert base == identity.of_step(loaded, "train")
    assert set(base["libraries"]) == {"python", *identity.LIBRARIES}
    assert all(v != "absent" for v in base["libraries"].values())
    pinned = identity.identity("closedloop.steps.training", ("closedloop.driving.policy:train_policy",),
                               "registry.example.com/acme/closedloop@sha256:" + "a" * 64)
    assert pinned["code"] == base["code"] and pinned["digest"] != base["digest"]
    # the entry point's module is in; the simulator (not run by train) is not
    files = {p.name for p in identity.entry_point_files("closedloop.driving.policy:train_policy")}
    assert "policy.py" in files and "simulator.py" not in files


ACME = '''
from closedloop.driving.labels import expert_acceleration


def label(frame, *, version, **params):
    return expert_acceleration(frame, version=version, **params)
'''


@pytest.fixture
def company(tmp_path, monkeypatch):
    """A company's own label policy package on the path (as `pip install acme-labels` would put it)."""
    pkg = tmp_path / "site" / "acme_labels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "policy.py").write_text(ACME)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("acme_labels")]:
        del sys.modules[name]


def test_a_company_entry_point_edited_between_two_runs_misses_and_unchanged_hits(company, make_project, project,
                                                                                tmp_path):
    from mlflow import MlflowClient

    from closedloop.steps.dataset import generate_dataset
    from closedloop.steps.labeling import label
    from tests.conftest import template_text

    path = make_project("acme.yaml", template_text(project, **{"name: acc_longitudinal": "name: acme_labels_pipeline",
           "entry_point: closedloop.driving.labels:expert_acceleration": "entry_point: acme_labels.policy:label"}))
    loaded = load_spec(path)
    data = str(tmp_path / "data")

    def run(n: int) -> dict:
        ctx = RunContext(pipeline=loaded.spec.name, template_digest=loaded.digest, dag_id=loaded.spec.name,
                         run_id=f"manual__{n}", data_root=data, task_id="generate_dataset")
        raw = generate_dataset(loaded, ctx, interval_end=date(2026, 11, 23))
        return label(loaded, ctx.for_task("label"), raw=raw)

    first, unchanged = run(1), run(2)
    source = MlflowClient().get_run(unchanged["cache"]["source_run_id"]).data.tags
    assert source["closedloop.run_key"] == f"{loaded.spec.name}/manual__1"
    assert source["closedloop.code_digest"] == identity.of_step(loaded, "label")["digest"]  # recorded on the run
    assert not first["cache"]["hit"] and unchanged["cache"]["hit"]
    policy = company / "policy.py"
    policy.write_text(ACME + "\n# a fix that changes nothing visible\n")
    edited = run(3)
    assert not edited["cache"]["hit"] and edited["cache_key"] != first["cache_key"]
    (company / "helpers.py").write_text("SCALE = 1.0\n")  # a new file in the package counts too
    added = run(4)
    assert not added["cache"]["hit"] and added["cache_key"] not in (first["cache_key"], edited["cache_key"])
    assert run(5)["cache"]["hit"]  # and unchanged since: a hit again

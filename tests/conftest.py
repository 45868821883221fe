"""Test session set-up: a private Airflow home, MLflow store and data root in a temp folder.

Airflow reads its configuration when first imported, so the environment is set here, at
conftest import, before any test module imports Airflow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="closedloop-tests-"))
os.environ.update({
    "CLOSEDLOOP_HOME": str(_TMP / "home"),
    "AIRFLOW_HOME": str(_TMP / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "GX_ANALYTICS_ENABLED": "False",
    "MLFLOW_TRACKING_URI": f"sqlite:///{_TMP / 'home' / 'mlflow' / 'mlflow.db'}",
    # as the embedded default runs (closedloop.settings.thread_env): one numeric thread per process
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1"),
})
os.environ.pop("CLOSEDLOOP_DATA_ROOT", None)
(_TMP / "home" / "mlflow").mkdir(parents=True)
(_TMP / "airflow").mkdir()


REQUIRE_ALL = os.environ.get("CLOSEDLOOP_CI") == "1"
"""Set by ``.ci/run``: every component (Chromium, docker-compose, PostgreSQL, Redis, optional
providers) must be there, so a test that would skip for a missing one fails instead."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} would skip ({reason}); under CI (CLOSEDLOOP_CI=1) every component "
                           "must be installed, so a skip is a failure")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = len(terminalreporter.stats.get("skipped", []))
    terminalreporter.write_line(f"closedloop: {skipped} test(s) skipped"
                                + (" (under CI a skip counts as a failure)" if REQUIRE_ALL else ""))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def project() -> Path:
    return PROJECT


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata database, migrated once per session (real SQLite, real migrations)."""
    from closedloop.local.run import ensure_db

    ensure_db()
    return os.environ["AIRFLOW_HOME"]


def scratch_project(root: Path) -> Path:
    """A copy of the project's dags/ and include/ (without templates) under ``root``."""
    shutil.copytree(PROJECT / "dags", root / "dags")
    for sub in ("expectations", "scenarios"):
        shutil.copytree(PROJECT / "include" / sub, root / "include" / sub)
    (root / "include" / "pipelines").mkdir()
    return root


@pytest.fixture
def make_project(tmp_path, project):
    """A scratch project (dags/ + include/) whose templates a test writes; returns a helper."""
    scratch_project(tmp_path)

    def write(name: str, text: str) -> Path:
        path = tmp_path / "include" / "pipelines" / name
        path.write_text(text)
        return path

    write.root = tmp_path
    return write


NO_REVIEW = {"approval:\n  approvers: [safety-lead, safety-deputy]\n  timeout_hours: 72\n"
             "  required: 2                  # the two-person rule: both approve before production moves\n": ""}
ONE_APPROVAL = {"  required: 2                  # the two-person rule: both approve before production moves\n": ""}
"""The shipped template's review with one approval (tests of a single reviewer's path)."""
# the shipped template samples few hard-braking logs, so its weekly model fails the hard-braking
# gate (the demo's story); tests of the passing path sample every scenario type fully
SAFE_DATA = {"sampling: {hard_braking: 0.1}": "sampling: {}"}


SHIPPED_SHARDS = "  shards: {count: 2}              # each round fans out over 2 jobs (Airflow task mapping); merged by merge_simulation\n"
SHIPPED_ADAPTIVE = "  adaptive: {max_episodes: 1000}  # more rounds of the catalog (fresh seeds) until every confidence gate decides\n"
GATES = {
    # bounds any trained policy meets (a 1.0 bound on a rate decides at once): tests about which DAGs or
    # services run, not about the safety of a policy trained on a few days of logs
    "lax": "gates:\n  - metric: offline.rmse\n    max: 100\n  - metric: sim.collision_rate\n    max: 1.0\n"
           "    confidence: 0.95\n\n",
    # point estimates on one round of the catalog: the machinery's tests (caching, retries, lineage,
    # reviews), whose few days of logs make policies the shipped statistical gates rightly refuse
    "point": "gates:\n  - metric: offline.rmse\n    max: 0.35\n  - metric: sim.collision_rate\n    max: 0.0\n"
             "  - metric: sim.safety_critical.min_ttc_s\n    min: 1.0\n  - metric: sim.hard_braking.collision_rate\n"
             "    max: 0.0\n  - metric: sim.regression.collision_rate\n    max: 0.0\n\n",
}


def template_text(project: Path, *, incidents: bool = True, sharded: bool = False, gates: str = "shipped",
                  **replacements: str) -> str:
    """The shipped template with some lines replaced (old → new); ``incidents=False`` drops its
    ``incidents:`` section (no incident DAG). ``sharded=False`` (the default) drops its simulation
    shards: each shard is a job that pays its own interpreter start and ``dag.test`` runs them one after
    the other, so only the tests about sharding (and the demo's) keep them. ``gates``: the shipped
    statistical gates, or :data:`GATES` ``"point"`` / ``"lax"`` (without the adaptive budget, unless a
    replacement names its line)."""
    text = (project / "include" / "pipelines" / "acc_longitudinal.yaml").read_text()
    import re

    if not sharded:
        assert SHIPPED_SHARDS in text, "fixture bug: the shipped template's shards line changed"
        text = text.replace(SHIPPED_SHARDS, "")
    if gates != "shipped":
        text = re.sub(r"^gates:.*?\n(?=approval:)", lambda _: GATES[gates], text, count=1, flags=re.S | re.M)
        if SHIPPED_ADAPTIVE not in replacements:
            text = text.replace(SHIPPED_ADAPTIVE, "")

    for old, new in replacements.items():
        # "name: acc_longitudinal" must not also rename "name: acc_longitudinal_policy"
        pattern = re.escape(old) + (r"(?!\w)" if old[-1:].isalnum() or old.endswith("_") else "")
        text, count = re.subn(pattern, lambda _, new=new: new, text)
        assert count, f"fixture bug: {old!r} is not in the shipped template"
    return text if incidents else text.split("\nincidents:")[0] + "\n"


@pytest.fixture
def dags_folder(monkeypatch):
    """Point Airflow's DAG folder (config and the dags-folder bundle) at another folder for one test.

    ``dag.test()`` serializes the DAG through the bundle that holds it, so a DAG built from a
    scratch project must live in the configured DAG folder.
    """
    import airflow.settings
    from airflow.configuration import conf

    old = airflow.settings.DAGS_FOLDER

    def use(folder) -> None:
        monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(folder))  # the environment wins over conf.set
        airflow.settings.DAGS_FOLDER = str(folder)
        assert conf.get("core", "dags_folder") == str(folder)

    yield use
    airflow.settings.DAGS_FOLDER = old

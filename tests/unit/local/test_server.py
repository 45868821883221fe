"""The embedded Airflow's SQLite database waits for its write lock instead of failing (Airflow
answered 500 "database is locked" on an audit-log write after sqlite3's 5 s under load)."""

from __future__ import annotations

import sqlite3
import threading
import time

from closedloop.local.server import SQLITE_CONNECT_ARGS, AirflowServer


def test_airflow_reads_the_connect_args_and_a_writer_outwaits_a_lock_held_past_five_seconds(tmp_path, monkeypatch):
    server = AirflowServer(tmp_path / "a", tmp_path / "dags", {"admin": ("admin", "pw")})
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC"):
        monkeypatch.setenv(key, server.env[key])
    from airflow import settings

    assert settings._get_connect_args("sync") is SQLITE_CONNECT_ARGS  # what Airflow's engine is built with
    assert settings._get_connect_args("async")["timeout"] == 30

    from sqlalchemy import create_engine, text

    db = tmp_path / "airflow.db"
    sqlite3.connect(db).execute("create table log (x int)").connection.commit()
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("begin immediate")  # another component holds the write lock for 6 s
    threading.Timer(6.0, lambda: holder.execute("commit")).start()
    engine = create_engine(f"sqlite:///{db}", connect_args={**settings._get_connect_args("sync"),
                                                            "check_same_thread": False})
    started = time.monotonic()
    with engine.begin() as conn:
        conn.execute(text("insert into log values (1)"))
    assert time.monotonic() - started >= 5.5  # it waited past sqlite3's default 5 s, then wrote
    assert sqlite3.connect(db).execute("select count(*) from log").fetchone() == (1,)


def test_a_server_on_another_database_gets_no_sqlite_arguments(tmp_path):
    server = AirflowServer(tmp_path / "a", tmp_path / "dags", {"admin": ("admin", "pw")},
                           env={"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://x@127.0.0.1/airflow"})
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in server.env
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC" not in server.env


PREPARE = """
import sys
from pathlib import Path
from closedloop.local.server import AirflowServer
root = Path(sys.argv[1])
AirflowServer(root, root / "dags", {"admin": ("admin", "pw")}, home=root / "airflow", port=1).prepare()
"""


def test_first_starts_two_at_a_time_on_fresh_state_create_every_store_once(tmp_path):
    """Two starts of the embedded default at once on fresh state, five times over (ten starts): each
    migrates Airflow's database, creates MLflow's store and the signing key with its pin — one process at
    a time, so every start succeeds and both end with the same key, one pin and a usable MLflow store."""
    import json
    import subprocess
    import sys

    import pytest

    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    for round_ in range(5):
        root = tmp_path / f"fresh{round_}"
        (root / "dags").mkdir(parents=True)
        procs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(root)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
        pins = json.loads((root / "closedloop" / "keys" / "trusted_keys.json").read_text())["keys"]
        public = (root / "closedloop" / "keys" / "release-signing.pub").read_text().strip()
        assert [k["public_key"] for k in pins] == [public]
        assert MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()[0].name == "Default"


def test_the_embedded_database_is_put_in_write_ahead_log_mode(tmp_path):
    """Readers must not block the one writer (a long API read held the scheduler's heartbeat past the lock
    timeout): the file is switched to WAL once, and stays so for every later connection."""
    import sqlite3

    from closedloop.local.server import wal

    path = tmp_path / "airflow.db"
    sqlite3.connect(path).execute("create table t (x)").connection.commit()
    assert wal({"AIRFLOW_HOME": str(tmp_path)}) == str(path)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert wal({"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://x/y"}) is None

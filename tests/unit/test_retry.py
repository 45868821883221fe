"""Which errors are retried: :func:`closedloop.errors.classify` on real exceptions — raised by
the real MLflow client against a local HTTP server answering like a server in trouble, by a
refused connection, by SQLAlchemy on a locked SQLite database — and the Airflow 3.3 retry
policy built on it."""

from __future__ import annotations

import errno
import sqlite3

import pytest
from airflow.sdk.definitions.retry_policy import RetryAction

from closedloop.errors import DataValidationError, GateFailed, PermanentError, SpecError, TransientError, classify
from closedloop.retry import TransientOnlyRetryPolicy
from tests.fixtures.sinks import HttpSink, closed_port


def mlflow_error(url: str):
    """What MlflowClient raises for a call to ``url`` (MLflow's own HTTP retries switched off)."""
    from mlflow import MlflowClient

    with pytest.raises(Exception) as info:
        MlflowClient(tracking_uri=url).get_experiment_by_name("x")
    return info.value


@pytest.fixture(autouse=True)
def _no_mlflow_http_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.mark.parametrize(("status", "body", "transient"), [
    (503, b"Service Unavailable", True),
    (502, b"<html>Bad Gateway</html>", True),
    (429, b'{"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}', True),
    (500, b'{"error_code": "INTERNAL_ERROR", "message": "database restarting"}', True),
    (400, b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "bad name"}', False),
    (403, b'{"error_code": "PERMISSION_DENIED", "message": "no"}', False),
])
def test_mlflow_server_answers(status, body, transient):
    with HttpSink(status=status, body=body) as server:
        exc = mlflow_error(server.url)
    assert server.requests, "the MLflow client never reached the server"
    assert classify(exc)[0] is transient, (type(exc), str(exc)[:300])


def test_mlflow_server_down_is_transient():
    exc = mlflow_error(f"http://127.0.0.1:{closed_port()}")
    transient, reason = classify(exc)
    assert transient, (type(exc), str(exc)[:300])


def test_locked_sqlite_database_is_transient(tmp_path):
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", connect_args={"timeout": 0.1})
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("create table t (x int)"))
    holder = sqlite3.connect(tmp_path / "db.sqlite")
    holder.execute("begin exclusive")
    with pytest.raises(sqlalchemy.exc.OperationalError) as info, engine.begin() as conn:
        conn.execute(sqlalchemy.text("insert into t values (1)"))
    holder.rollback()
    assert "locked" in str(info.value) and classify(info.value)[0] is True


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        if cause is None:
            raise exc
        raise exc from cause
    except BaseException as caught:  # noqa: B036 - we want the object with its traceback and cause
        return caught


@pytest.mark.parametrize(("exc", "transient"), [
    (ConnectionResetError("peer reset"), True),
    (TimeoutError("read timed out"), True),
    (MemoryError(), True),
    (OSError(errno.EMFILE, "Too many open files"), True),
    (TransientError("job lost"), True),
    (OSError(errno.ENOENT, "No such file"), False),
    (TypeError("unsupported operand"), False),
    (KeyError("target_accel"), False),
    (ZeroDivisionError(), False),
    (SpecError("bad template"), False),
    (DataValidationError("3 expectations failed", report={}), False),
    (GateFailed("sim.collision_rate 0.2 > 0", report=[]), False),
    (PermanentError("snapshot modified"), False),
])
def test_error_kinds(exc, transient):
    assert classify(_raised(exc))[0] is transient


def test_the_cause_decides_unless_we_said_so():
    # a library wrapping a connection error is still transient ...
    assert classify(_raised(RuntimeError("request failed"), ConnectionRefusedError()))[0] is True
    # ... but our own verdict wins over the cause
    assert classify(_raised(PermanentError("pinned snapshot is gone"), ConnectionRefusedError()))[0] is False


def _while_handling(outer: type[BaseException], *, suppress: bool) -> BaseException:
    """``outer`` raised inside ``except ConnectionResetError`` (``from None`` when ``suppress``)."""
    try:
        try:
            raise ConnectionResetError("peer reset")
        except ConnectionResetError:
            if suppress:
                raise outer("while handling") from None
            raise outer("while handling")  # noqa: B904 - the implicit context is the point
    except BaseException as caught:  # noqa: B036
        return caught


def test_the_chain_is_followed_as_python_prints_it():
    # a library wrapping a connection error without `from` is still transient (the context is shown)...
    assert classify(_while_handling(RuntimeError, suppress=False))[0] is True
    # ... but `raise ... from None` suppresses the context: it is not this error's cause
    assert classify(_while_handling(RuntimeError, suppress=True))[0] is False
    # ... and a bug raised while handling a connection error is a bug, context or not
    for bug in (KeyError, TypeError, AttributeError, NameError):
        transient, reason = classify(_while_handling(bug, suppress=False))
        assert transient is False and "bug" in reason, bug


@pytest.mark.parametrize(("sql", "transient"), [
    ("select * from no_such_table", False),       # a missing table: no retry creates it
    ("selec x frm t", False),                     # bad SQL
    ("insert into t values (1)", True),           # the database is locked by another writer
])
def test_database_errors_are_transient_only_when_they_say_so(tmp_path, sql, transient):
    """Real SQLAlchemy and sqlite3 errors: the same OperationalError class for all three."""
    import sqlalchemy

    db = tmp_path / "db.sqlite"
    engine = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0.1})
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("create table t (x int)"))
    holder = sqlite3.connect(db)
    if transient:
        holder.execute("begin exclusive")  # another writer holds the database
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError) as wrapped, engine.begin() as conn:
            conn.execute(sqlalchemy.text(sql))
        raw = sqlite3.connect(db, timeout=0.1)
        with pytest.raises(sqlite3.OperationalError) as plain:
            raw.execute(sql)
    finally:
        holder.rollback()
    assert ("locked" in str(wrapped.value)) is transient
    assert classify(wrapped.value)[0] is transient, str(wrapped.value)
    assert classify(plain.value)[0] is transient, str(plain.value)


def test_policy_retries_transient_and_fails_the_rest():
    policy = TransientOnlyRetryPolicy()
    retry = policy.evaluate(ConnectionResetError("x"), try_number=1, max_tries=2)
    assert retry.action == RetryAction.RETRY and retry.retry_delay is None  # the task's exponential backoff
    assert "transient" in retry.reason
    fail = policy.evaluate(TypeError("x"), try_number=1, max_tries=2)
    assert fail.action == RetryAction.FAIL and "not retried" in fail.reason
    assert TransientOnlyRetryPolicy.deserialize(policy.serialize()).evaluate(
        TimeoutError(), try_number=1, max_tries=1).action == RetryAction.RETRY

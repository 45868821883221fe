"""The exception tree. Steps raise these; the Airflow layer maps them to retry / fail-now."""

from __future__ import annotations


class ClosedLoopError(Exception):
    """Base of every error this package raises on purpose."""


class SpecError(ClosedLoopError, ValueError):
    """A pipeline template is invalid. The message names the file and the field path."""

    def __init__(self, message: str, *, path: str | None = None, problems: list[str] | None = None):
        super().__init__(message)
        self.path = path
        self.problems = problems or [message]


class PermanentError(ClosedLoopError):
    """Retrying cannot help (bad data, bad template, a bug): fail now, alert, no retry."""


class TransientError(ClosedLoopError):
    """A passing condition (network, 5xx, timeout): retry with backoff."""


class IntegrityError(PermanentError):
    """Stored data does not match the digest it was recorded under (modified after it was written)."""


class DataValidationError(PermanentError):
    """A dataset snapshot broke its expectation suite."""

    def __init__(self, message: str, *, report: dict):
        super().__init__(message)
        self.report = report


class GateFailed(PermanentError):
    """A release gate refused the model."""

    def __init__(self, message: str, *, report: list[dict]):
        super().__init__(message)
        self.report = report


class ApprovalError(PermanentError):
    """A promotion was attempted without a valid recorded human approval."""


class EvidenceError(ApprovalError):
    """A record that must carry the deployment's seal does not, or was changed after sealing."""


#: Exception classes (by module-qualified name, so nothing heavy is imported to check) whose
#: failures pass: the network, a server that is restarting or overloaded, a busy database.
TRANSIENT_CLASSES = frozenset({
    "requests.exceptions.ConnectionError", "requests.exceptions.Timeout", "requests.exceptions.ChunkedEncodingError",
    "urllib3.exceptions.ProtocolError", "urllib3.exceptions.MaxRetryError", "urllib3.exceptions.NewConnectionError",
    "urllib3.exceptions.TimeoutError", "http.client.RemoteDisconnected", "http.client.IncompleteRead",
    "sqlalchemy.exc.TimeoutError", "sqlalchemy.exc.DisconnectionError",
    "redis.exceptions.ConnectionError", "redis.exceptions.TimeoutError",
    "airflow.sdk.exceptions.AirflowTaskTimeout", "airflow.sdk.exceptions.TaskDeferralTimeout",
})
#: Database errors that are transient only when their message says so (a locked or busy database, a
#: lost or refused connection, a timeout, a deadlock or serialization conflict): the same classes
#: also carry "no such table" and syntax errors, which no retry fixes.
DATABASE_ERRORS = frozenset({"sqlalchemy.exc.OperationalError", "sqlite3.OperationalError",
                             "psycopg2.OperationalError", "psycopg2.errors.OperationalError",
                             "asyncpg.exceptions.PostgresConnectionError"})
TRANSIENT_DB_MESSAGES = ("database is locked", "database table is locked", "database is busy", "could not connect",
                         "connection refused", "connection reset", "connection timed out", "timeout expired",
                         "server closed the connection", "terminating connection", "lost connection",
                         "connection already closed", "too many connections", "deadlock detected",
                         "could not serialize access", "the database system is starting up",
                         "the database system is shutting down", "ssl syscall error", "disk i/o error")
#: Exceptions that are bugs wherever they are raised: one raised while handling a connection error
#: is still a bug (its context is what it was handling, not its cause).
BUGS = (TypeError, NameError, AttributeError, AssertionError, ImportError, LookupError, ArithmeticError,
        NotImplementedError, SyntaxError)
#: errno values of resource exhaustion and interrupted calls.
TRANSIENT_ERRNOS = frozenset({11, 12, 16, 23, 24, 4})  # EAGAIN, ENOMEM, EBUSY, ENFILE, EMFILE, EINTR
#: MLflow REST answers worth retrying: server errors and rate limiting.
TRANSIENT_HTTP = frozenset({429, 500, 502, 503, 504})


def _qualnames(exc: BaseException) -> set[str]:
    return {f"{k.__module__}.{k.__qualname__}" for k in type(exc).__mro__}


def _mlflow_transient(exc: BaseException) -> str | None:
    if "mlflow.exceptions.MlflowException" not in _qualnames(exc):
        return None
    try:
        status = int(exc.get_http_status_code())  # type: ignore[attr-defined]
    except Exception:
        return None
    remote = "mlflow.exceptions.RestException" in _qualnames(exc) or "API request to" in str(exc)
    if status in TRANSIENT_HTTP and remote:
        return f"MLflow answered {status}" if status != 500 or "failed with exception" not in str(exc) \
            else "MLflow server unreachable"
    return None


def classify(exc: BaseException) -> tuple[bool, str]:
    """Is ``exc`` transient (worth retrying)? Returns ``(transient, reason)``.

    Our own :class:`PermanentError` / :class:`TransientError` say so themselves. Otherwise
    connection errors, timeouts, resource exhaustion, MLflow 5xx/429 and a busy database are
    transient — also when they are the cause of another exception (MLflow wraps them) — and
    everything else (template and data errors, gate failures, ``TypeError`` and other bugs) is
    permanent: retrying cannot fix it.

    The chain is followed as Python prints it: the explicit cause (``raise … from err``), else
    the context (the exception being handled) unless it was suppressed (``raise … from None``).
    A bug (:data:`BUGS`) ends the walk: a ``KeyError`` raised while handling a dropped connection
    is a bug, not a network problem. A database error is transient only when it says so
    (:data:`TRANSIENT_DB_MESSAGES`), never for a missing table or bad SQL.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if isinstance(current, PermanentError):
            return False, f"permanent: {name}"
        if isinstance(current, TransientError):
            return True, f"transient: {name}"
        if isinstance(current, BUGS):
            return False, f"permanent: {name} (a bug: retrying cannot fix it)"
        if isinstance(current, ConnectionError | TimeoutError):
            return True, f"transient: {name} (connection/timeout)"
        if isinstance(current, MemoryError):
            return True, "transient: MemoryError (resource exhaustion)"
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return True, f"transient: {name} errno {current.errno} (resource exhaustion)"
        names = _qualnames(current)
        if names & TRANSIENT_CLASSES:
            return True, f"transient: {name}"
        if names & DATABASE_ERRORS:
            message = str(current).lower()
            if getattr(current, "connection_invalidated", False) or any(m in message for m in TRANSIENT_DB_MESSAGES):
                return True, f"transient: {name} (database busy or unreachable)"
            return False, f"permanent: {name} ({str(current).splitlines()[0][:120]})"
        mlflow_reason = _mlflow_transient(current)
        if mlflow_reason:
            return True, f"transient: {mlflow_reason}"
        if current.__cause__ is not None:
            current = current.__cause__
        elif current.__suppress_context__:
            break
        else:
            current = current.__context__
    return False, f"permanent: {type(exc).__name__} (retrying cannot fix it)"


def with_retries(fn, *, attempts: int = 4, first_delay: float = 1.0, what: str = "call"):
    """``fn()``, tried again (1 s, 2 s, 4 s … apart) while it fails with a transient error
    (:func:`classify`); the last error is raised. For a side effect that must not wait for a task retry."""
    import logging
    import time

    for n in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            transient, reason = classify(exc)
            if not transient or n == attempts:
                raise
            logging.getLogger(__name__).warning("%s failed (%s), try %d of %d; again in %g s", what, reason, n,
                                                attempts, first_delay * 2 ** (n - 1))
            time.sleep(first_delay * 2 ** (n - 1))
    raise AssertionError("unreachable")

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
    "sqlalchemy.exc.OperationalError", "sqlalchemy.exc.TimeoutError", "sqlalchemy.exc.DisconnectionError",
    "psycopg2.OperationalError", "redis.exceptions.ConnectionError", "redis.exceptions.TimeoutError",
    "airflow.sdk.exceptions.AirflowTaskTimeout", "airflow.sdk.exceptions.TaskDeferralTimeout",
})
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
        if isinstance(current, ConnectionError | TimeoutError):
            return True, f"transient: {name} (connection/timeout)"
        if isinstance(current, MemoryError):
            return True, "transient: MemoryError (resource exhaustion)"
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return True, f"transient: {name} errno {current.errno} (resource exhaustion)"
        if _qualnames(current) & TRANSIENT_CLASSES:
            return True, f"transient: {name}"
        mlflow_reason = _mlflow_transient(current)
        if mlflow_reason:
            return True, f"transient: {mlflow_reason}"
        current = current.__cause__ or current.__context__
    return False, f"permanent: {type(exc).__name__} (retrying cannot fix it)"

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

"""Retries only where they help: Airflow 3.3's retry policy, fed by :func:`closedloop.errors.classify`.

Every closedloop step operator carries :class:`TransientOnlyRetryPolicy`. Airflow consults it
in the task process with the real exception: a transient error is retried (the task's own
exponential backoff, up to the template's ``reliability.retries``), anything else fails the
task at once, whatever retries remain — and the failure alert goes out on that first try.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy


class TransientOnlyRetryPolicy(RetryPolicy):
    """Retry transient errors; fail permanent ones (bugs included) on the spot."""

    def evaluate(self, exception: BaseException, try_number: int, max_tries: int, context=None) -> RetryDecision:
        from closedloop.errors import classify

        transient, reason = classify(exception)
        if transient:
            return RetryDecision.retry(reason=f"{reason}; try {try_number} of {max_tries + 1}")
        return RetryDecision.fail(reason=f"{reason}; not retried")

    def serialize(self) -> dict[str, Any]:
        return {"__type": "closedloop.retry.TransientOnlyRetryPolicy"}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> TransientOnlyRetryPolicy:
        return cls()

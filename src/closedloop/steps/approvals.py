"""Names of the approval tasks (cheap: the DAG builder reads it at parse time)."""

from __future__ import annotations


def approval_task_ids(required: int) -> list[str]:
    """``approval``, ``approval_2``, … — one human-in-the-loop task per required approval."""
    return ["approval", *(f"approval_{i}" for i in range(2, required + 1))]

"""What the registry recorded about one model version: request, gates, review, approvals, alias moves."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from closedloop import vocab
from closedloop.runtime.context import RunContext
from closedloop.runtime.tracking import mlflow_client
from closedloop.steps.governance import APPROVAL_TAG, AUDIT_PREFIX


def audit_trail(ctx: RunContext, model: str, version: str) -> dict:
    """The request, gate report, review decision and alias changes of one version, in order."""
    c = mlflow_client(ctx.tracking_uri)
    mv = c.get_model_version(model, version)
    tags = mv.tags
    request = {k.removeprefix(vocab.REQUEST_PREFIX): v for k, v in tags.items() if k.startswith(vocab.REQUEST_PREFIX)}
    gates = None
    if tags.get(vocab.GATE_RUN_ID):
        import mlflow

        gates = mlflow.artifacts.load_dict(f"runs:/{tags[vocab.GATE_RUN_ID]}/gates/report.json")
    events = [json.loads(v) for k, v in tags.items() if k.startswith(AUDIT_PREFIX)]
    for k, v in tags.items():  # a recall's hold is its own sealed record on the version: in the trail as an event
        if k.startswith(vocab.HOLD_PREFIX):
            try:
                hold = json.loads(v)
                events.append({"event": "recall.hold", "at": hold["at"], "recall": hold.get("recall"),
                               "how": hold.get("how"), "reason": hold.get("reason")})
            except (ValueError, KeyError, TypeError):
                events.append({"event": "recall.hold (unreadable)", "at": "", "tag": k})
    events.sort(key=lambda e: e["at"])
    review = {k.removeprefix(vocab.REVIEW_PREFIX): v for k, v in tags.items() if k.startswith(vocab.REVIEW_PREFIX)}
    approvals = []
    for key in sorted(k for k in tags if k.startswith(APPROVAL_TAG)):
        try:
            st = json.loads(tags[key]).get("statement") or {}
        except (ValueError, AttributeError):
            st = {}
        approvals.append({"task": key.removeprefix(APPROVAL_TAG), "decision": st.get("decision"),
                          "responder": st.get("responder"), "at": st.get("responded_at"),
                          "production_at_review": st.get("production_at_review")})
    return {"approvals": approvals, "model": model, "version": str(version), "aliases": list(mv.aliases),
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(),
            "run": {"dag_id": tags.get(vocab.AIRFLOW_DAG_ID), "run_id": tags.get(vocab.AIRFLOW_RUN_ID)},
            "request": request, "gates": gates, "gates_verdict": tags.get(vocab.GATES),
            "review": review, "events": events}

"""A model version's audit trail (append-only MLflow tags) and where the sealed promotion records bind:
written by governance (reviews, alias moves) and recalls (holds)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from closedloop import vocab
from closedloop.errors import EvidenceError
from closedloop.runtime.signing import Binding

AUDIT_PREFIX = vocab.AUDIT_PREFIX


def audit(client, model: str, version: str, event: str, *, when: datetime | None = None, key: str = "",
          **details) -> None:
    """Append an audit event to a version's trail. With ``when`` (the time the event happened, e.g. a
    reviewer's answer) and ``key`` (what makes it unique), writing it again — a retry — rewrites the
    same entry instead of adding one."""
    now = when or datetime.now(UTC)
    tag = f"{AUDIT_PREFIX}{now.strftime('%Y%m%dT%H%M%S.%f')}.{event}" + (f".{key}" if key else "")
    client.set_model_version_tag(model, version, tag, json.dumps({"event": event, "at": now.isoformat(), **details},
                                                                  sort_keys=True))


PROMOTION_BINDING = "registry"


def promotion_binding(model: str) -> Binding:
    """Where a sealed promotion record of ``model`` binds (it is the registry's, not a task's)."""
    return Binding(PROMOTION_BINDING, model, vocab.PRODUCTION, "promotion")




def sealed_promotions(client, model: str, verifier):
    """Every sealed promotion record kept in the audit trail of any version of ``model``, as ``(version, record)``
    (a trail entry that does not verify is no record)."""
    for mv in client.search_model_versions(f"name = '{model}'"):
        for key, raw in mv.tags.items():
            if not key.startswith(AUDIT_PREFIX) or '"promotion"' not in raw:
                continue
            try:
                rec = verifier.unseal(json.loads(raw)["promotion"], promotion_binding(model), what="promotion")
            except (EvidenceError, ValueError, KeyError, TypeError):
                continue
            yield str(mv.version), rec

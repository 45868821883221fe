"""The example release process at the hand-off: ``closedloop_release`` runs on every ``production`` asset
event of a governed model, verifies the version's release dossier with the deployment's pinned public keys
(the event's payload is not evidence: anyone with role ``op`` can post an asset event) and only then
"deploys" it — copies the bundle and the model's files to ``$CLOSEDLOOP_HOME/deployed/<model>/v<version>``.
A dossier that does not verify, or is not the one the event names, fails the run with the reason; nothing
is deployed. A real release process replaces the copy with its own deployment."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

RELEASE_DAG_ID = "closedloop_release"


def fetch_bundle(uri: str, dest: Path) -> Path:
    """The bundle whose ``dossier.json`` is at ``uri`` (a path or fsspec URI), copied into ``dest``."""
    import fsspec

    fs, index = fsspec.core.url_to_fs(uri)
    root = index.rsplit("/", 1)[0]
    for path in fs.find(root):
        target = dest / path[len(root):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open(path, "rb") as src:
            target.write_bytes(src.read())
    return dest


def release(event_extra: dict, deploy_root: Path, keys, *, production: str | None = "any") -> dict:
    """Verify the dossier an event names and deploy its version; :class:`AirflowFailException` when it does
    not verify (no retry: a forged or tampered dossier does not get better).

    :param production: the version the registry's sealed promotion record puts in production now (None: no
        promotion); an event naming any other version — an old event posted again — deploys nothing.
        ``"any"`` skips the check (no registry to ask)."""
    import hashlib

    from closedloop.errors import EvidenceError
    from closedloop.steps.dossier import JSON_NAME, verify

    where = event_extra.get("dossier") or {}
    model, version = event_extra.get("model"), str(event_extra.get("version"))
    if not where.get("uri") or not where.get("digest"):
        raise AirflowFailException(f"production event of {model} v{version} names no release dossier: not deployed")
    if production != "any" and production != version:
        raise AirflowFailException(f"the event names {model} v{version}, but the registry's sealed promotion record "
                                   f"puts v{production} in production: an old or posted event; not deployed")
    with tempfile.TemporaryDirectory() as tmp:
        folder = fetch_bundle(where["uri"], Path(tmp))
        actual = "sha256:" + hashlib.sha256((folder / JSON_NAME).read_bytes()).hexdigest()
        if actual != where["digest"]:
            raise AirflowFailException(f"the dossier at {where['uri']} is not the one the event names (digest "
                                       f"{actual}, the event says {where['digest']}): not deployed")
        try:
            body = verify(folder, keys)
        except EvidenceError as exc:
            raise AirflowFailException(f"release dossier of {model} v{version} does not verify: {exc}; not deployed") \
                from None
        if body.get("model") != model or str(body.get("version")) != version:
            raise AirflowFailException(f"the dossier is of {body.get('model')} v{body.get('version')}, the event of "
                                       f"{model} v{version}: not deployed")
        if not str(body["verdict"]["verdict"]).startswith(("accepted", "conditionally accepted")):
            raise AirflowFailException(f"verdict {body['verdict']['verdict']!r}: not deployed")
        target = deploy_root / model / f"v{version}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(folder, target / "dossier")
    note = {"model": model, "version": version, "dossier": where, "verdict": body["verdict"]["verdict"],
            "conditions": body["verdict"]["conditions"]}
    (target / "DEPLOYED.json").write_text(json.dumps(note, indent=1, sort_keys=True))
    log.info("deployed %s v%s (%s) to %s after verifying its dossier", model, version, note["verdict"], target)
    return note


class ReleaseOperator(BaseOperator):
    """Verify and deploy each production version the triggering asset events name."""

    ui_color = "#e3f6e8"

    def execute(self, context: Context) -> Any:
        from closedloop import settings
        from closedloop.hooks.signing import verifier

        events = [e for evs in (context.get("triggering_asset_events") or {}).values() for e in evs]
        if not events:
            raise AirflowFailException("no production event triggered this run: nothing to release")
        keys = verifier()
        return [release(dict(e.extra or {}), settings.home() / "deployed", keys,
                        production=_promoted((e.extra or {}).get("model"), keys)) for e in events]


def _promoted(model: str | None, keys) -> str | None:
    """The version the last sealed promotion record of ``model`` put in production (None: none)."""
    from closedloop.errors import EvidenceError
    from closedloop.hooks.mlflow import MLflowHook
    from closedloop.runtime.tracking import mlflow_client
    from closedloop.steps.governance import last_promotion

    if not model:
        return None
    try:
        record = last_promotion(mlflow_client(MLflowHook().tracking_uri()), model, keys)
    except EvidenceError as exc:
        raise AirflowFailException(f"{model}: the registry's promotion record does not verify ({exc}): not "
                                   "deployed") from None
    return str(record["version"]) if record else None

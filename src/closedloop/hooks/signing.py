"""The deployment's signing key, from an Airflow connection (production) or the local key file."""

from __future__ import annotations

import functools
import logging

from closedloop.steps.signing import Signer, local_signer, signer_from_text

log = logging.getLogger(__name__)

SIGNING_CONN_ID = "closedloop_signing"


def signer(conn_id: str = SIGNING_CONN_ID) -> Signer:
    """The private key tasks sign with.

    The Airflow connection ``closedloop_signing`` (its password: base64 of the 32-byte Ed25519
    seed; ``closedloop keys generate`` makes one) wins: in Airflow 3.3 only roles ``op`` and
    ``admin`` read connections, requesters (``user``) cannot. Without it — the embedded default —
    the key file under ``$CLOSEDLOOP_HOME/keys/`` (created once, mode 0600).
    """
    from closedloop import settings

    return _signer(conn_id, str(settings.home()))


@functools.lru_cache(maxsize=4)
def _signer(conn_id: str, home: str) -> Signer:
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # not defined: the embedded default applies
        conn = None
    if conn is not None and (conn.password or (conn.extra_dejson or {}).get("seed")):
        return signer_from_text(conn.password or conn.extra_dejson["seed"], where=f"Airflow connection {conn_id!r}")
    log.debug("no connection %r: signing with the local key file", conn_id)
    return local_signer()

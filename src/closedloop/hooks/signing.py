"""The deployment's signing key, from a fixed source order that no person's Airflow rights reach.

1. ``CLOSEDLOOP_SIGNING_KEY`` (base64 of the 32-byte Ed25519 seed) or ``CLOSEDLOOP_SIGNING_KEY_FILE``;
2. ``AIRFLOW_CONN_CLOSEDLOOP_SIGNING`` in the environment (Airflow's environment-variable connection);
3. the connection ``closedloop_signing`` in the secrets backend configured under ``[secrets] backend``
   (Vault, AWS Secrets Manager, …) — asked directly, never through Airflow's connection lookup,
   which falls back to the metadata database where role ``op`` creates connections;
4. the embedded default's key file under ``$CLOSEDLOOP_HOME/keys/`` (created once, mode 0600).

Whatever the source, the key must match the pinned public keys
(:func:`closedloop.runtime.signing.trusted_keys`): a mismatch is a refusal naming it, never a new trust.
"""

from __future__ import annotations

import functools
import logging
import os

from closedloop.errors import EvidenceError
from closedloop.hooks.deployment import connection, env_name, from_secrets_backend
from closedloop.runtime.signing import KeyRing, Signer, local_signer, signer_from_text, trusted_keys

log = logging.getLogger(__name__)

SIGNING_CONN_ID = "closedloop_signing"
ENV_KEY, ENV_KEY_FILE = "CLOSEDLOOP_SIGNING_KEY", "CLOSEDLOOP_SIGNING_KEY_FILE"
ENV_CONN = env_name(SIGNING_CONN_ID)


def signer(conn_id: str = SIGNING_CONN_ID) -> Signer:
    """The private key tasks sign with (see the module's source order), checked against the pins."""
    from closedloop import settings

    found, source = _signer(conn_id, str(settings.home()), os.environ.get(ENV_KEY, ""),
                            os.environ.get(ENV_KEY_FILE, ""), os.environ.get(ENV_CONN, ""))
    return trusted_keys().check_signer(found, source)


def verifier() -> KeyRing:
    """What every consumer verifies seals with: the pinned public keys (never the signing key's own)."""
    return trusted_keys()


def _seed_of(conn) -> str | None:
    """The base64 seed a connection holds: its password, or ``extra.seed``."""
    return conn.password or (conn.extra_dejson or {}).get("seed")


@functools.lru_cache(maxsize=4)
def _signer(conn_id: str, home: str, env_key: str, env_key_file: str, env_conn: str) -> tuple[Signer, str]:
    if env_key.strip():
        return signer_from_text(env_key, where=f"${ENV_KEY}"), f"${ENV_KEY}"
    if env_key_file.strip():
        with open(env_key_file, encoding="utf-8") as fh:
            return signer_from_text(fh.read(), where=env_key_file), env_key_file
    if env_conn.strip():  # ``env_conn`` keys the cache; the connection itself is parsed by Airflow
        try:
            conn = connection(conn_id)
        except ValueError as exc:
            raise EvidenceError(f"${ENV_CONN}: not a connection (JSON or URI): {exc}") from None
        seed = _seed_of(conn) if conn is not None else None
        if not seed:
            raise EvidenceError(f"${ENV_CONN} holds no password (the base64 seed)")
        return signer_from_text(seed, where=f"${ENV_CONN}"), f"${ENV_CONN}"
    conn = from_secrets_backend(conn_id)
    seed = _seed_of(conn) if conn is not None else None
    if seed:
        return signer_from_text(seed, where=f"the secrets backend's {conn_id!r}"), f"the secrets backend's {conn_id!r}"
    log.debug("no signing key in the environment or a secrets backend: the embedded default's key file")
    from closedloop.runtime.signing import local_key_path

    return local_signer(), str(local_key_path())

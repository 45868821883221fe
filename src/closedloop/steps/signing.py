"""Signed evidence: Ed25519 seals on what the pipeline itself records (no Airflow import).

The deployment holds one private key (an Airflow connection or secrets backend that tasks read
and requesters' role cannot; :mod:`closedloop.hooks.signing` finds it). Every step's result is
*sealed* where it is born — signed together with the task it came from (DAG, run, task, XCom
key) — and every consumer checks the seal before it believes the result. So an XCom edited
through Airflow's REST API, a result copied from another run or another task, or an MLflow tag
holding a record of another version is refused: nobody but the deployment can make a seal, and
anyone can check one with the published public key (``closedloop audit --verify``).

Seals are over a canonical JSON form (sorted keys, no spaces), so what is verified is exactly
what was signed, whichever store carried it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from closedloop.errors import EvidenceError

SEAL = "_seal"
ALGORITHM = "ed25519"


def canonical(value: Any) -> bytes:
    """The bytes that are signed and digested: sorted keys, compact, UTF-8; dates as ISO text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_text).encode("utf-8")


def _text(value: Any) -> str:
    iso = getattr(value, "isoformat", None)
    return iso() if callable(iso) else str(value)


def normalized(value: Any) -> Any:
    """``value`` as plain JSON types (what XCom and MLflow tags give back), so a seal survives any store."""
    return json.loads(canonical(value))


def digest(value: Any) -> str:
    """``sha256:<hex>`` of the canonical form of ``value`` (a seal, if present, is left out)."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != SEAL}
    return "sha256:" + hashlib.sha256(canonical(value)).hexdigest()


@dataclass(frozen=True)
class Binding:
    """Where a sealed value belongs: the task instance (and XCom key) that produced it."""

    dag_id: str
    run_id: str
    task_id: str
    key: str = "return_value"

    def describe(self) -> str:
        return f"{self.dag_id}/{self.run_id}/{self.task_id}" + ("" if self.key == "return_value" else f"[{self.key}]")

    def as_dict(self) -> dict[str, str]:
        return {"dag_id": self.dag_id, "run_id": self.run_id, "task_id": self.task_id, "key": self.key}


class Signer:
    """The deployment's private key. Built from the 32-byte Ed25519 seed."""

    def __init__(self, seed: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if len(seed) != 32:
            raise EvidenceError(f"signing key: expected a 32-byte Ed25519 seed, got {len(seed)} bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.verifier = Verifier(public_bytes(self._key.public_key()))

    @classmethod
    def generate(cls) -> Signer:
        import os

        return cls(os.urandom(32))

    def seed_b64(self) -> str:
        from cryptography.hazmat.primitives import serialization

        raw = self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
        return base64.b64encode(raw).decode()

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._key.sign(message)).decode()

    def seal(self, value: dict, binding: Binding) -> dict:
        """``value`` (as plain JSON) plus a ``_seal`` binding it to ``binding``."""
        body = {k: v for k, v in normalized(value).items() if k != SEAL}
        message = canonical({"binding": binding.as_dict(), "value": body})
        return {**body, SEAL: {"alg": ALGORITHM, "key_id": self.verifier.key_id, "bound_to": binding.as_dict(),
                               "sig": self.sign(message)}}


def public_bytes(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Verifier:
    """A public key: checks seals, never makes them."""

    def __init__(self, raw: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if len(raw) != 32:
            raise EvidenceError(f"public key: expected 32 raw Ed25519 bytes, got {len(raw)}")
        self._key = Ed25519PublicKey.from_public_bytes(raw)
        self.raw = raw
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def from_text(cls, text: str) -> Verifier:
        """From the published form: base64 of the 32 raw bytes (``ed25519:`` prefix optional)."""
        text = text.strip().removeprefix(f"{ALGORITHM}:")
        try:
            return cls(base64.b64decode(text, validate=True))
        except (ValueError, TypeError) as exc:
            raise EvidenceError(f"public key: not base64 of 32 Ed25519 bytes ({exc})") from None

    def published(self) -> str:
        return f"{ALGORITHM}:{base64.b64encode(self.raw).decode()}"

    def verify_bytes(self, message: bytes, signature: str) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self._key.verify(base64.b64decode(signature, validate=True), message)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def unseal(self, value: Any, binding: Binding | None, *, what: str) -> dict:
        """The sealed ``value`` without its seal, or :class:`EvidenceError` saying why it is not believed.

        :param binding: where the value must come from; None accepts the binding the seal names
            (for records read outside their run, e.g. from MLflow) — the caller then checks the
            record's own fields.
        :param what: how the error names the value, e.g. ``"the result of task 'train'"``.
        """
        if not isinstance(value, dict):
            raise EvidenceError(f"{what}: expected a sealed record, found {type(value).__name__}")
        seal = value.get(SEAL)
        if not isinstance(seal, dict) or not seal.get("sig"):
            raise EvidenceError(f"{what} carries no seal: it was not written by this deployment's pipeline "
                                "(edited through the REST API or MLflow?); refusing to use it")
        bound = seal.get("bound_to") if isinstance(seal.get("bound_to"), dict) else {}
        if binding is not None and bound != binding.as_dict():
            got = Binding(**{k: str(bound.get(k, "?")) for k in ("dag_id", "run_id", "task_id", "key")})
            raise EvidenceError(f"{what} was sealed for {got.describe()}, not {binding.describe()}: "
                                "a record of another run or task is not evidence for this one")
        if seal.get("key_id") != self.key_id:
            raise EvidenceError(f"{what} was sealed with key {seal.get('key_id')!r}, not this deployment's key "
                                f"{self.key_id!r}")
        body = {k: v for k, v in normalized(value).items() if k != SEAL}
        if not self.verify_bytes(canonical({"binding": bound, "value": body}), str(seal["sig"])):
            raise EvidenceError(f"{what}: the seal does not match the content: it was changed after the pipeline "
                                "wrote it (edited XCom or MLflow tag?); refusing to use it")
        return body


def bound_of(value: dict) -> Binding | None:
    """The binding a sealed value names (unchecked: verify before believing it)."""
    seal = value.get(SEAL) if isinstance(value, dict) else None
    bound = seal.get("bound_to") if isinstance(seal, dict) else None
    if not isinstance(bound, dict):
        return None
    try:
        return Binding(**{k: str(bound[k]) for k in ("dag_id", "run_id", "task_id", "key")})
    except KeyError:
        return None


# -- where the keys are ------------------------------------------------------------------------
def local_key_path(home=None):
    """The embedded default's private key file (``$CLOSEDLOOP_HOME/keys/release-signing.key``, mode 0600).

    Only a deployment without the ``closedloop_signing`` connection uses it (one laptop, CI);
    requesters act through Airflow's REST API and the MLflow client and never read it.
    """
    from pathlib import Path

    from closedloop import settings

    return (Path(home) if home is not None else settings.home()) / "keys" / "release-signing.key"


def local_signer(create: bool = True, home=None) -> Signer:
    """The embedded default's key, created once (atomically: concurrent tasks agree on one key).

    :param home: the ``$CLOSEDLOOP_HOME`` it lives under (default: this process's).
    """
    import os

    path = local_key_path(home)
    if not path.exists():
        if not create:
            raise EvidenceError(f"no signing key: neither the Airflow connection 'closedloop_signing' nor {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = Signer.generate()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: use theirs
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(fresh.seed_b64() + "\n")
            path.with_suffix(".pub").write_text(fresh.verifier.published() + "\n")
    text = path.read_text().strip()
    for _ in range(50):  # the creator may still be writing
        if text:
            break
        import time

        time.sleep(0.02)
        text = path.read_text().strip()
    return signer_from_text(text, where=str(path))


def signer_from_text(text: str, *, where: str) -> Signer:
    """A key as stored in a connection or file: base64 of the 32-byte seed (``ed25519:`` prefix optional)."""
    try:
        return Signer(base64.b64decode(text.strip().removeprefix(f"{ALGORITHM}:"), validate=True))
    except (ValueError, TypeError) as exc:
        raise EvidenceError(f"signing key in {where}: expected base64 of a 32-byte Ed25519 seed ({exc})") from None


def published_verifier() -> tuple[Verifier, str]:
    """The public key anyone verifies with, and where it was found: ``$CLOSEDLOOP_PUBLIC_KEY`` (the
    published text or a file holding it), else the embedded default's ``release-signing.pub``."""
    import os
    from pathlib import Path

    given = os.environ.get("CLOSEDLOOP_PUBLIC_KEY", "").strip()
    if given:
        if Path(given).is_file():
            return Verifier.from_text(Path(given).read_text()), given
        return Verifier.from_text(given), "$CLOSEDLOOP_PUBLIC_KEY"
    path = local_key_path().with_suffix(".pub")
    if path.exists():
        return Verifier.from_text(path.read_text()), str(path)
    raise EvidenceError("no public key to verify with: set CLOSEDLOOP_PUBLIC_KEY to the deployment's published key "
                        f"(closedloop keys show prints it) or run where {path} exists")

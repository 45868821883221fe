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
KEY_FILE = "release-signing.key"
PIN_FILE = "trusted_keys.json"


def local_key_path(home=None):
    """The embedded default's private key file (``$CLOSEDLOOP_HOME/keys/release-signing.key``, mode 0600).

    Only a deployment that gives no key in its environment or secrets backend uses it (one laptop,
    CI); people act through Airflow's REST API and the MLflow client and never read it.
    """
    from pathlib import Path

    from closedloop import settings

    return (Path(home) if home is not None else settings.home()) / "keys" / KEY_FILE


def _create_exclusive(path, text: str, mode: int = 0o600) -> bool:
    """Write ``text`` to a new file (never over an existing one); False when it already exists."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return True


def local_signer(create: bool = True, home=None) -> Signer:
    """The embedded default's key, created once (atomically: concurrent tasks agree on one key) and
    pinned at once in ``$CLOSEDLOOP_HOME/keys/trusted_keys.json`` (the first start writes the pin).

    :param home: the ``$CLOSEDLOOP_HOME`` it lives under (default: this process's).
    """
    import time

    path = local_key_path(home)
    if not path.exists():
        if not create:
            raise EvidenceError(f"no signing key: none in the environment (CLOSEDLOOP_SIGNING_KEY) and no {path}")
        fresh = Signer.generate()
        if _create_exclusive(path, fresh.seed_b64() + "\n"):  # else another process made it first: use theirs
            path.with_suffix(".pub").write_text(fresh.verifier.published() + "\n")
            pin_local_key(fresh.verifier, home=home)
    text = path.read_text().strip()
    for _ in range(50):  # the creator may still be writing
        if text:
            break
        time.sleep(0.02)
        text = path.read_text().strip()
    return signer_from_text(text, where=str(path))


def signer_from_text(text: str, *, where: str) -> Signer:
    """A key as stored in the environment, a secret or a file: base64 of the 32-byte seed (``ed25519:``
    prefix optional)."""
    try:
        return Signer(base64.b64decode(text.strip().removeprefix(f"{ALGORITHM}:"), validate=True))
    except (ValueError, TypeError) as exc:
        raise EvidenceError(f"signing key in {where}: expected base64 of a 32-byte Ed25519 seed ({exc})") from None


# -- the trust root: pinned public keys ---------------------------------------------------------
@dataclass(frozen=True)
class PinnedKey:
    """One public key of the deployment's pinned set. A retired key signs nothing new; what it
    sealed before stays verifiable."""

    verifier: Verifier
    added: str = ""
    retired: str | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return {"public_key": self.verifier.published(), "key_id": self.verifier.key_id, "added": self.added,
                "retired": self.retired, "note": self.note}


class KeyRing:
    """The public keys every verifier believes, read only from where no person's Airflow or MLflow
    rights reach: the deployment's configuration (``$CLOSEDLOOP_TRUSTED_KEYS``), the project's
    ``include/keys/trusted_keys.json`` (reviewed in git), or — embedded default — the pin written at
    first start under ``$CLOSEDLOOP_HOME/keys/``. Checks seals like a :class:`Verifier`, with any
    pinned key (rotation keeps old records verifiable); never trusts a key because a record or a
    connection names it."""

    def __init__(self, keys: list[PinnedKey], where: str) -> None:
        if not keys:
            raise EvidenceError(f"no pinned public key in {where}")
        self.keys = list(keys)
        self.where = where
        self._by_id = {k.verifier.key_id: k for k in keys}
        active = [k for k in keys if not k.retired]
        self.current = (active or keys)[-1].verifier

    @property
    def key_id(self) -> str:
        return self.current.key_id

    def published(self) -> str:
        return self.current.published()

    def ids(self) -> list[str]:
        return [k.verifier.key_id for k in self.keys]

    def unseal(self, value: Any, binding: Binding | None, *, what: str) -> dict:
        """As :meth:`Verifier.unseal`, with the pinned key the seal names; a seal by any other key is
        refused naming it."""
        seal = value.get(SEAL) if isinstance(value, dict) else None
        key_id = seal.get("key_id") if isinstance(seal, dict) else None
        pinned = self._by_id.get(str(key_id)) if key_id else None
        if pinned is None:
            return self._refuse(value, binding, what, key_id)
        return pinned.verifier.unseal(value, binding, what=what)

    def _refuse(self, value, binding, what, key_id) -> dict:
        if not isinstance(value, dict) or not isinstance(value.get(SEAL), dict) or not value[SEAL].get("sig"):
            return self.current.unseal(value, binding, what=what)  # says: no seal
        raise EvidenceError(f"{what} was sealed with key {key_id!r}, which is not a pinned key of this deployment "
                            f"(pinned: {', '.join(self.ids())} in {self.where}); a key from anywhere else — an "
                            "Airflow connection, a model tag — is never trusted")

    def check_signer(self, signer: Signer, source: str) -> Signer:
        """``signer`` if its public key is pinned and not retired; else :class:`EvidenceError` naming
        the mismatch (nothing is signed with a key the verifiers would not believe)."""
        pinned = self._by_id.get(signer.verifier.key_id)
        if pinned is None:
            raise EvidenceError(f"the signing key from {source} (key id {signer.verifier.key_id}) does not match the "
                                f"pinned public keys ({', '.join(self.ids())} in {self.where}): refusing to sign; "
                                "a new key is pinned by `closedloop keys rotate`, reviewed like code")
        if pinned.retired:
            raise EvidenceError(f"the signing key from {source} (key id {signer.verifier.key_id}) was retired at "
                                f"{pinned.retired} ({self.where}): sign with the current key "
                                f"{self.current.key_id}")
        return signer

    def document(self) -> dict:
        return {"keys": [k.as_dict() for k in self.keys]}


def keyring_from_json(text: str, where: str) -> KeyRing:
    try:
        data = json.loads(text)
        rows = data["keys"] if isinstance(data, dict) else data
        keys = [PinnedKey(Verifier.from_text(str(r["public_key"])), added=str(r.get("added") or ""),
                          retired=r.get("retired") or None, note=str(r.get("note") or "")) for r in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise EvidenceError(f"pinned keys in {where}: expected {{\"keys\": [{{\"public_key\": \"ed25519:…\", "
                            f"\"added\": …, \"retired\": null}}]}} ({type(exc).__name__}: {exc})") from None
    return KeyRing(keys, where)


def pin_paths(home=None) -> list:
    """Where the pinned set may be, in order: ``$CLOSEDLOOP_TRUSTED_KEYS`` (a file), the project's
    ``include/keys/trusted_keys.json``, the embedded default's ``$CLOSEDLOOP_HOME/keys/trusted_keys.json``."""
    import os
    from pathlib import Path

    from closedloop import settings

    out = []
    given = os.environ.get("CLOSEDLOOP_TRUSTED_KEYS", "").strip()
    if given and not given.startswith(f"{ALGORITHM}:"):
        out.append(Path(given))
    out.append(settings.include_dir() / "keys" / PIN_FILE)
    out.append(local_key_path(home).with_name(PIN_FILE))
    return out


def pin_local_key(verifier: Verifier, home=None) -> bool:
    """Pin the embedded default's key at first start (never over an existing pin)."""
    from closedloop.runtime.timeutil import utc_now_iso

    doc = {"keys": [PinnedKey(verifier, added=utc_now_iso(), note="embedded default, pinned at first start")
                    .as_dict()]}
    return _create_exclusive(local_key_path(home).with_name(PIN_FILE), json.dumps(doc, indent=1) + "\n", 0o644)


def ensure_local_key(home=None) -> Signer:
    """The embedded default's first start: its key made once and pinned once (one process does it,
    before any task runs)."""
    key = local_signer(home=home)
    pin_local_key(key.verifier, home=home)  # a home from before pins: pinned now (never over a pin)
    return key


_RING_CACHE: dict = {}


def trusted_keys(home=None) -> KeyRing:
    """The deployment's pinned public keys (see :class:`KeyRing`), read again when the file changes.

    ``$CLOSEDLOOP_TRUSTED_KEYS`` (or the older ``$CLOSEDLOOP_PUBLIC_KEY``) may also hold published keys
    themselves, comma-separated. An embedded default whose key predates its pin is pinned now.
    """
    import os

    for var in ("CLOSEDLOOP_TRUSTED_KEYS", "CLOSEDLOOP_PUBLIC_KEY"):
        given = os.environ.get(var, "").strip()
        if given.startswith(f"{ALGORITHM}:"):
            keys = [PinnedKey(Verifier.from_text(t)) for t in given.split(",") if t.strip()]
            return KeyRing(keys, f"${var}")
        if given and var == "CLOSEDLOOP_PUBLIC_KEY":
            from pathlib import Path

            if Path(given).is_file():
                return KeyRing([PinnedKey(Verifier.from_text(Path(given).read_text()))], given)
    paths = pin_paths(home)
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        cached = _RING_CACHE.get(str(path))
        if cached is not None and cached[0] == (stat.st_mtime_ns, stat.st_size):
            return cached[1]
        ring = keyring_from_json(path.read_text(), str(path))
        _RING_CACHE[str(path)] = ((stat.st_mtime_ns, stat.st_size), ring)
        return ring
    if os.environ.get("CLOSEDLOOP_TRUSTED_KEYS", "").strip():
        raise EvidenceError(f"$CLOSEDLOOP_TRUSTED_KEYS names {paths[0]}, which does not exist")
    pub = local_key_path(home).with_suffix(".pub")
    if pub.exists():  # an embedded default from before pins: its first start now
        pin_local_key(Verifier.from_text(pub.read_text()), home=home)
        return trusted_keys(home)
    raise EvidenceError("no pinned public key: set CLOSEDLOOP_TRUSTED_KEYS to the deployment's pin file (or its "
                        f"published key), commit include/keys/{PIN_FILE}, or start the embedded default once "
                        f"(it pins its key in {paths[-1]})")


def published_verifier() -> tuple[KeyRing, str]:
    """The pinned keys anyone verifies with, and where they were found (see :func:`trusted_keys`)."""
    ring = trusted_keys()
    return ring, ring.where

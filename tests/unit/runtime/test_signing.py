"""Seals: what the pipeline signs is believed exactly, and nothing else is."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from closedloop.errors import EvidenceError
from closedloop.runtime.signing import (
    SEAL,
    Binding,
    KeyRing,
    PinnedKey,
    Signer,
    Verifier,
    digest,
    ensure_local_key,
    local_signer,
    published_verifier,
    trusted_keys,
)

HERE = Binding("acc", "manual__1", "register_candidate")


def test_a_sealed_value_round_trips_through_json_stores():
    key = Signer.generate()
    value = {"model": "m", "version": "3", "at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "rows": [1, 2.5, None]}
    sealed = key.seal(value, HERE)
    assert sealed[SEAL]["key_id"] == key.verifier.key_id and sealed[SEAL]["bound_to"]["task_id"] == "register_candidate"
    body = key.verifier.unseal(sealed, HERE, what="x")
    assert body == {"model": "m", "version": "3", "at": "2026-01-02T03:04:05+00:00", "rows": [1, 2.5, None]}
    assert digest(sealed) == digest(body)  # the seal is not part of what is digested


@pytest.mark.parametrize(("tamper", "reason"), [
    (lambda v: v.update(version="4"), "does not match the content"),
    (lambda v: v.update(extra="x"), "does not match the content"),
    (lambda v: v.pop(SEAL), "carries no seal"),
    (lambda v: v[SEAL].update(sig="AAAA"), "does not match the content"),
    (lambda v: v[SEAL]["bound_to"].update(run_id="manual__2"), "sealed for acc/manual__2/register_candidate"),
])
def test_any_edit_is_refused_with_its_reason(tamper, reason):
    key = Signer.generate()
    sealed = key.seal({"model": "m", "version": "3"}, HERE)
    tamper(sealed)
    with pytest.raises(EvidenceError, match=reason):
        key.verifier.unseal(sealed, HERE, what="the record")


def test_a_value_sealed_for_another_task_or_by_another_key_is_refused():
    key, other = Signer.generate(), Signer.generate()
    sealed = key.seal({"v": 1}, HERE)
    with pytest.raises(EvidenceError, match="not acc/manual__1/train"):
        key.verifier.unseal(sealed, Binding("acc", "manual__1", "train"), what="x")
    with pytest.raises(EvidenceError, match="not this deployment's key"):
        other.verifier.unseal(sealed, HERE, what="x")
    forged = other.seal({"v": 1}, HERE)  # right binding, wrong key: someone else's signature
    with pytest.raises(EvidenceError, match="not this deployment's key"):
        key.verifier.unseal(forged, HERE, what="x")


def test_published_key_text_and_local_key_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOSEDLOOP_HOME", str(tmp_path))
    monkeypatch.delenv("CLOSEDLOOP_PUBLIC_KEY", raising=False)
    key = local_signer()
    assert local_signer().verifier.key_id == key.verifier.key_id  # created once, then read
    path = tmp_path / "keys" / "release-signing.key"
    assert path.stat().st_mode & 0o777 == 0o600
    verifier, where = published_verifier()
    assert verifier.key_id == key.verifier.key_id and where.endswith("trusted_keys.json")  # pinned at first start
    assert Verifier.from_text(key.verifier.published()).raw == key.verifier.raw
    monkeypatch.setenv("CLOSEDLOOP_PUBLIC_KEY", Signer.generate().verifier.published())
    assert published_verifier()[0].key_id != key.verifier.key_id
    with pytest.raises(EvidenceError, match="not base64"):
        Verifier.from_text("not a key!")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An embedded default's home, with no key given by the environment."""
    for var in ("CLOSEDLOOP_PUBLIC_KEY", "CLOSEDLOOP_TRUSTED_KEYS", "CLOSEDLOOP_SIGNING_KEY", "CLOSEDLOOP_SIGNING_KEY_FILE",
                "AIRFLOW_CONN_CLOSEDLOOP_SIGNING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLOSEDLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLOSEDLOOP_INCLUDE_DIR", str(tmp_path / "include"))
    from closedloop.hooks import signing

    signing._signer.cache_clear()
    yield tmp_path
    signing._signer.cache_clear()


def test_only_pinned_keys_are_believed_and_a_key_that_does_not_match_the_pin_signs_nothing(home, monkeypatch):
    from closedloop.hooks.signing import signer

    key = ensure_local_key()
    assert trusted_keys().ids() == [key.verifier.key_id] and signer().verifier.key_id == key.verifier.key_id
    # a key from anywhere else (a connection someone created, a key in a model tag) is no trust
    forged = Signer.generate()
    with pytest.raises(EvidenceError, match=f"sealed with key '{forged.verifier.key_id}', which is not a pinned key"):
        trusted_keys().unseal(forged.seal({"v": 1}, HERE), HERE, what="the record")
    monkeypatch.setenv("CLOSEDLOOP_SIGNING_KEY", forged.seed_b64())  # the environment gives another key
    with pytest.raises(EvidenceError, match=r"does not match the pinned public keys .* refusing to sign"):
        signer()
    # the source order: the environment before the key file; a connection only from the environment
    monkeypatch.delenv("CLOSEDLOOP_SIGNING_KEY")
    monkeypatch.setenv("AIRFLOW_CONN_CLOSEDLOOP_SIGNING", json.dumps({"conn_type": "generic",
                                                                     "password": key.seed_b64()}))
    assert signer().verifier.key_id == key.verifier.key_id
    monkeypatch.setenv("AIRFLOW_CONN_CLOSEDLOOP_SIGNING", json.dumps({"conn_type": "generic",
                                                                     "password": forged.seed_b64()}))
    with pytest.raises(EvidenceError, match="from \\$AIRFLOW_CONN_CLOSEDLOOP_SIGNING"):
        signer()


def test_the_project_pin_wins_over_the_local_one_and_rotation_keeps_old_records_verifiable(home, monkeypatch):
    key = ensure_local_key()
    old = key.seal({"v": 1}, HERE)
    # a deployment pins its keys in the project (reviewed in git): the local pin no longer counts
    other = Signer.generate()
    pins = home / "include" / "keys" / "trusted_keys.json"
    pins.parent.mkdir(parents=True)
    pins.write_text(json.dumps({"keys": [PinnedKey(other.verifier).as_dict()]}))
    assert trusted_keys().ids() == [other.verifier.key_id] and trusted_keys().where == str(pins)
    with pytest.raises(EvidenceError, match="not a pinned key"):
        trusted_keys().unseal(old, HERE, what="x")
    pins.unlink()
    # rotation (the CLI): a new key appended, the old one retired; what it sealed still verifies
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "closedloop.cli", "keys", "rotate", "--note", "yearly"],
                         capture_output=True, text=True, timeout=120, env={**__import__("os").environ})
    assert out.returncode == 0, out.stderr
    ring = trusted_keys()
    assert len(ring.keys) == 2 and ring.keys[0].retired and ring.current.key_id != key.verifier.key_id
    assert ring.unseal(old, HERE, what="x") == {"v": 1}
    with pytest.raises(EvidenceError, match="was retired at"):
        ring.check_signer(key, "the old key file")
    assert local_signer().verifier.key_id == ring.current.key_id  # tasks now sign with the new key
    assert ring.unseal(local_signer().seal({"v": 2}, HERE), HERE, what="x") == {"v": 2}
    show = subprocess.run([sys.executable, "-m", "closedloop.cli", "keys", "show"], capture_output=True, text=True,
                          timeout=120)
    assert "retired" in show.stdout and "current" in show.stdout, show.stdout


def test_a_keyring_names_what_it_believes():
    a, b = Signer.generate(), Signer.generate()
    ring = KeyRing([PinnedKey(a.verifier, retired="2026-01-01"), PinnedKey(b.verifier)], "test")
    assert ring.current.key_id == b.verifier.key_id and ring.ids() == [a.verifier.key_id, b.verifier.key_id]
    with pytest.raises(EvidenceError, match="carries no seal"):
        ring.unseal({"v": 1}, None, what="x")

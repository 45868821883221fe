"""Seals: what the pipeline signs is believed exactly, and nothing else is."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from closedloop.errors import EvidenceError
from closedloop.steps.signing import SEAL, Binding, Signer, Verifier, digest, local_signer, published_verifier

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
    assert verifier.key_id == key.verifier.key_id and where.endswith("release-signing.pub")
    assert Verifier.from_text(key.verifier.published()).raw == key.verifier.raw
    monkeypatch.setenv("CLOSEDLOOP_PUBLIC_KEY", Signer.generate().verifier.published())
    assert published_verifier()[0].key_id != key.verifier.key_id
    with pytest.raises(EvidenceError, match="not base64"):
        Verifier.from_text("not a key!")

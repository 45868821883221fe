"""The example release process: a production event's dossier is verified with the pinned keys before the
version is deployed; a tampered, swapped or forged one deploys nothing (real keys, real bundle files)."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from closedloop.operators.release import release
from closedloop.runtime.signing import Signer
from tests.unit.steps.test_dossier import _bundle


def _event(folder, out):
    return {"model": "m", "version": "3", "dossier": {"uri": str(folder / "dossier.json"), "digest": out["digest"]}}


def test_a_verified_dossier_is_deployed_and_a_tampered_or_swapped_one_is_not(tmp_path):
    signer = Signer.generate()
    folder, out = _bundle(tmp_path, signer)
    note = release(_event(folder, out), tmp_path / "deployed", signer.verifier, production="3")
    assert note["verdict"] == "accepted"
    deployed = tmp_path / "deployed" / "m" / "v3"
    assert json.loads((deployed / "DEPLOYED.json").read_text())["dossier"]["digest"] == out["digest"]
    assert (deployed / "dossier" / "evidence" / "release_record.json").exists()

    with pytest.raises(AirflowFailException, match="not the one the event names"):
        release({**_event(folder, out), "dossier": {"uri": str(folder / "dossier.json"), "digest": "sha256:00"}},
                tmp_path / "d2", signer.verifier)
    with pytest.raises(AirflowFailException, match="event of m v4"):
        release({**_event(folder, out), "version": "4"}, tmp_path / "d3", signer.verifier)
    with pytest.raises(AirflowFailException, match="not a published key"):
        release(_event(folder, out), tmp_path / "d4", Signer.generate().verifier)
    report = folder / "evidence" / "gate_report.json"
    report.write_bytes(b"[{}]\n")
    with pytest.raises(AirflowFailException, match="gate_report.json: its sha256"):
        release(_event(folder, out), tmp_path / "d5", signer.verifier)
    assert not any((tmp_path / d).exists() for d in ("d2", "d3", "d4", "d5", "d7"))
    with pytest.raises(AirflowFailException, match="puts v4 in production: an old or posted event"):
        release(_event(folder, out), tmp_path / "d7", signer.verifier, production="4")
    with pytest.raises(AirflowFailException, match="names no release dossier"):
        release({"model": "m", "version": "3"}, tmp_path / "d6", signer.verifier)

"""The release dossier bundle: signed over its body and every file it cites, verified offline with the
public key alone — a changed byte anywhere is named — and the train/test independence check it reports
(real Ed25519 keys, real files, the example domain's real logs)."""

from __future__ import annotations

import json
from datetime import date

import pytest

from closedloop.errors import EvidenceError
from closedloop.runtime.signing import Binding, Signer, digest
from closedloop.steps import dossier


def _bundle(tmp_path, signer: Signer, *, approve_other_record: bool = False):
    record = signer.seal({"kind": "release_record", "model": "m", "version": "3", "artifact_digest": "sha256:ab"},
                         Binding("p", "run1", "register_candidate"))
    statement = {"kind": "approval", "model": "m", "version": "3", "decision": "approved", "responder": "lead",
                 "record_digest": "sha256:other" if approve_other_record else digest(record), "task_id": "approval",
                 "responded_at": "2026-12-07T00:00:00+00:00", "comment": None}
    approval = signer.seal({"statement": statement}, Binding("p", "run1", "approval"))
    body = {"format": dossier.FORMAT, "model": "m", "version": "3", "pipeline": "p", "dag_id": "p", "run_id": "run1",
            "built_at": "2026-12-07T00:00:00+00:00", "clauses": dossier.CLAUSES,
            "identity": {"release_record_digest": digest(record), "libraries": {}},
            "odd": None, "data": {"raw": {}, "labelled": {}, "episodes_per_scenario": {}, "label_policy": {"ref": "x",
                                  "entry_point": "y"}, "independence": None,
                                  "validation": {"suite": "s", "success": True, "evaluated": 1, "failed": 0,
                                                 "expectations": []}},
            "coverage": {"scenario_set": "standard", "episodes": 26, "per_type": {}, "known_unsafe_scenarios": [],
                         "not_covered": ["cut_out"]},
            "acceptance": {"gates": [], "hil": None, "shift": None},
            "monitoring": {"kpis": [], "on_breach": "-"},
            "approvals": {"required": 1, "approvers": ["lead"], "requester": "eng", "independent_of_requester": True,
                          "distinct_reviewers": True,
                          "statements": [{**statement, "evidence": "evidence/approvals/approval.json"}]},
            "change": {"replaces": None, "note": "first"},
            "verdict": {"verdict": "accepted", "failed_gates": [], "residual_risks": [], "conditions": []}}
    evidence = {"evidence/release_record.json": json.dumps(record).encode(),
                "evidence/approvals/approval.json": json.dumps(approval).encode(),
                "evidence/gate_report.json": b"[]\n"}
    out = dossier.write(dossier.bundle(body, evidence, signer), str(tmp_path / "bundle"))
    return tmp_path / "bundle", out


def test_a_bundle_verifies_with_the_public_key_alone_and_a_changed_byte_anywhere_is_named(tmp_path):
    signer = Signer.generate()
    folder, out = _bundle(tmp_path, signer)
    public = signer.verifier.published()  # what the deployment publishes: nothing else is needed
    body = dossier.verify(folder, public)
    assert body["verdict"]["verdict"] == "accepted" and out["digest"].startswith("sha256:")
    assert "verdict" in (folder / "dossier.html").read_text() and "cut_out" in (folder / "dossier.html").read_text()
    for name in ("evidence/release_record.json", "evidence/approvals/approval.json", "evidence/gate_report.json",
                 "dossier.html"):
        path = folder / name
        original = path.read_bytes()
        path.write_bytes(original[:-2] + bytes([original[-2] ^ 1]) + original[-1:])
        with pytest.raises(EvidenceError, match=name.replace(".", r"\.") + ": its sha256"):
            dossier.verify(folder, public)
        path.write_bytes(original)
    index = folder / "dossier.json"
    document = json.loads(index.read_text())
    document["body"]["verdict"]["verdict"] = "accepted "  # one byte of the signed body
    index.write_text(json.dumps(document))
    with pytest.raises(EvidenceError, match="signature does not match"):
        dossier.verify(folder, public)


def test_another_key_a_missing_file_and_an_approval_of_another_record_are_refused(tmp_path):
    signer = Signer.generate()
    folder, _ = _bundle(tmp_path / "a", signer)
    with pytest.raises(EvidenceError, match="not a published key"):
        dossier.verify(folder, Signer.generate().verifier.published())
    (folder / "evidence/gate_report.json").unlink()
    with pytest.raises(EvidenceError, match="gate_report.json: cited by the dossier but missing"):
        dossier.verify(folder, signer.verifier.published())
    other, _ = _bundle(tmp_path / "b", signer, approve_other_record=True)
    with pytest.raises(EvidenceError, match="approval is not of this release record"):
        dossier.verify(other, signer.verifier.published())


def test_a_forger_who_re_signs_with_their_own_key_is_refused_by_the_published_key(tmp_path):
    signer, forger = Signer.generate(), Signer.generate()
    folder, _ = _bundle(tmp_path, signer)
    document = json.loads((folder / "dossier.json").read_text())
    document["body"]["verdict"]["verdict"] = "accepted (forged)"
    signed = {"body": document["body"], "files": document["files"]}
    from closedloop.runtime.signing import canonical

    document["signature"] = {"alg": "ed25519", "key_id": forger.verifier.key_id,
                             "public_key": forger.verifier.published(), "sig": forger.sign(canonical(signed))}
    (folder / "dossier.json").write_text(json.dumps(document))
    # the key the document names is never believed: only the published one
    with pytest.raises(EvidenceError, match="not a published key"):
        dossier.verify(folder, signer.verifier.published())


def test_independence_finds_no_leak_in_the_real_split_and_finds_a_copied_episode():
    from closedloop.driving.logs import synthesize_drive_logs

    frame = synthesize_drive_logs(sources=["fleet-eu"], window_start=date(2026, 11, 1), window_end=date(2026, 11, 8),
                                  scenarios=["cruise", "cut_in"], episodes_per_day=2, seed=3)
    from closedloop.steps.evaluation import independence

    clean = independence(frame, 0.2)
    assert clean["independent"] and clean["episodes_in_both"] == 0 and clean["near_duplicates"] == 0
    assert clean["test_episodes"] > 0 and clean["train_episodes"] > clean["test_episodes"]
    from closedloop.steps.training import split

    train, test = split(frame, 0.2)
    leaked = test[test["episode_id"] == test["episode_id"].iloc[0]].copy()
    # the same drive logged again under another id that lands in the training side
    new_id = next(f"copy-{i}" for i in range(10_000) if len(split(leaked.assign(episode_id=f"copy-{i}"), 0.2)[0]))
    import pandas as pd

    leaking = pd.concat([frame, leaked.assign(episode_id=new_id)])
    leaky = independence(leaking, 0.2)
    assert not leaky["independent"] and leaky["near_duplicates"] == 1 and leaky["episodes_in_both"] == 0
    # and the shipped template's independence gate stops a model judged on it
    from closedloop.spec import load_spec
    from closedloop.steps.evaluation import LEAK_METRIC, leak_metrics
    from closedloop.steps.gates import evaluate
    from tests.conftest import PROJECT

    gates = [g for g in load_spec(PROJECT / "include" / "pipelines" / "acc_longitudinal.yaml").spec.gates
             if g.metric == LEAK_METRIC]
    assert gates, "the shipped template has no independence gate"
    assert evaluate(gates, leak_metrics(leaking, 0.2))[0]["passed"] is False
    assert evaluate(gates, leak_metrics(frame, 0.2))[0]["passed"] is True

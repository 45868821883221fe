"""The release dossier: one signed, self-contained bundle per model version that a release engineer, an
assessor or a regulator takes away and checks without our servers.

Generated from the sealed records of the run (never hand-written), after the last human decision and
before ``production`` moves (the ``production`` asset event carries its URI and digest); a pipeline
without review gets a candidate's dossier after registration. The bundle is a folder::

    dossier.json     {"format", "body", "files": {name: sha256}, "signature"}: the signature covers the
                     canonical JSON of body and files (sorted keys, UTF-8), Ed25519, the deployment's key
    dossier.html     the body rendered for people (prints well); cited in ``files``
    evidence/…       the records the body cites: the sealed release record and approval statements, the
                     gate and shift reports, the validation result, the simulation result, the template,
                     the expectation suite and the scenario set — each in ``files`` with its sha256

:func:`verify` needs only the folder and the published public key: it checks the signature, every file's
digest, every sealed record's seal and that they name this version; the first item that does not match is
named. Each section names the clause family it serves (UL 4600, ISO 21448 / SOTIF, ISO/PAS 8800), so the
body reads as a safety case: claim, argument, evidence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from closedloop import vocab
from closedloop.errors import EvidenceError
from closedloop.runtime.signing import ALGORITHM, canonical, digest
from closedloop.runtime.storage import bytes_digest
from closedloop.steps.evaluation import LEAK_METRIC, independence

FORMAT = "closedloop.dossier/1"
JSON_NAME, HTML_NAME = "dossier.json", "dossier.html"

CLAUSES = {
    "identity": "UL 4600 (the safety case holds for this exact configuration)",
    "odd": "UL 4600, ISO 21448 (intended function and operational design domain)",
    "data": "ISO/PAS 8800 (dataset lifecycle: provenance, completeness, independence, label quality)",
    "coverage": "ISO 21448 (known unsafe scenarios and triggering conditions; what the ODD names and the "
                "catalog does not cover)",
    "acceptance": "ISO 21448 (acceptance criteria and their results), UL 4600 (evidence)",
    "monitoring": "UL 4600 (safety performance indicators watched in the field), ISO 21448 (field monitoring "
                  "defined before release)",
    "verdict": "ISO 21448 (release verdict: accepted / conditionally accepted / rejected, residual risk)",
    "approvals": "UL 4600 (independent assessment of the release decision)",
    "change": "UL 4600, ISO 21448 (change impact against the version it replaces)",
}

SHIFTED_PSI = 0.1  # a feature with a PSI above this is named a residual risk (above 0.25: shifted)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("apache-airflow", "mlflow", "great-expectations", "scikit-learn", "numpy", "pandas", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def shift_rows(shift: dict | None) -> dict[str, dict]:
    """Feature → its PSI (and KS) against production's training data, the scenario mix included."""
    if not shift or shift.get("error"):
        return {}
    rows = {k: v for k, v in (shift.get("features") or {}).items() if isinstance(v, dict)}
    if isinstance(shift.get("scenario_mix"), dict):
        rows["scenario_mix"] = shift["scenario_mix"]
    return rows


def verdict_of(report: list[dict], approvals: list[dict], reviewed: bool, shift: dict | None,
               regression: list[dict], simulation: dict) -> dict:
    """accepted / conditionally accepted (with its conditions) / rejected, and the residual risks the
    records show."""
    risks, conditions = [], []
    failed = [r["metric"] for r in report if not r.get("passed")]
    for r in report:
        if r.get("passed") and r.get("value") is None:
            risks.append(f"{r['metric']}: nothing to judge ({r.get('evidence') or 'no value'})")
            conditions.append(f"judge {r['metric']} at the next periodic run")
    adaptive = simulation.get("adaptive") or {}
    if adaptive and adaptive.get("stopped") and "budget" in str(adaptive.get("stopped")):
        risks.append(f"the adaptive simulation budget ran out ({adaptive.get('episodes')} episodes): "
                     "thin evidence for the undecided gates")
    for feature, row in sorted(shift_rows(shift).items()):
        psi = row.get("psi") if isinstance(row, dict) else None
        if psi is not None and psi > SHIFTED_PSI:
            risks.append(f"training data shifted from production's on {feature} (PSI {psi:.3g})")
            conditions.append(f"watch the field KPIs for {feature}-dependent degradation")
    for i in regression:
        if i.get("collisions"):
            risks.append(f"incident {i.get('incident')}: {i['collisions']} collision(s) in its regression scenario")
    decisions = [a.get("decision") for a in approvals]
    if failed or any(d and d != "approved" for d in decisions):
        verdict = "rejected"
    elif not reviewed:
        verdict = "not released (candidate: this pipeline has no human review)"
    elif risks:
        verdict = "conditionally accepted"
    else:
        verdict = "accepted"
    return {"verdict": verdict, "failed_gates": failed, "residual_risks": risks,
            "conditions": sorted(set(conditions)) if verdict == "conditionally accepted" else []}


def assemble(loaded, ctx, *, raw: dict, labelled: dict, validation: dict, trained: dict, offline: dict,
             simulation: dict, gate: dict, record: dict, approvals: list[dict], shift: dict | None,
             frame, production: dict | None, hil: dict | None = None,
             episodes: bytes | None = None) -> tuple[dict, dict[str, bytes]]:
    """The dossier's body and the evidence files it cites (name → bytes), from the run's records.

    ``record``: the sealed release record; ``approvals``: the sealed approval records (each with its
    ``statement``); ``frame``: the labelled snapshot (its rows per scenario and the independence check);
    ``production``: the version it replaces (``{"version", "record"}``) or None."""
    spec = loaded.spec
    suite_text = Path(loaded.suite_path).read_bytes()
    scenarios_text = Path(loaded.scenario_path).read_bytes()
    evidence: dict[str, bytes] = {
        "evidence/release_record.json": _json_bytes(record),
        "evidence/gate_report.json": _json_bytes(gate.get("report") or []),
        "evidence/validation.json": _json_bytes(validation),
        "evidence/simulation.json": _json_bytes(simulation),
        "evidence/template.yaml": Path(loaded.path).read_bytes(),
        f"evidence/expectations/{Path(loaded.suite_path).name}": suite_text,
        f"evidence/scenarios/{Path(loaded.scenario_path).name}": scenarios_text,
    }
    if shift:
        evidence["evidence/shift_report.json"] = _json_bytes(shift)
    if episodes is not None:  # every simulated episode and its outcome, as the simulation logged them
        evidence["evidence/episodes.json"] = episodes
    statements = []
    for a in approvals:
        st = a.get("statement") or {}
        name = f"evidence/approvals/{st.get('task_id') or 'approval'}.json"
        evidence[name] = _json_bytes(a)
        statements.append({**{k: st.get(k) for k in ("task_id", "decision", "responder", "responded_at",
                                                     "opened_at", "production_at_review", "record_digest",
                                                     "comment")}, "evidence": name})
    requester = record.get("requester") or "scheduler"
    reviewers = [s["responder"] for s in statements if s.get("responder")]
    by_scenario = ({str(k): int(v) for k, v in frame.groupby("scenario")["episode_id"].nunique().items()}
                   if frame is not None and "scenario" in frame else {})
    report = gate.get("report") or []
    catalog_types = sorted({str(k).split(".")[1] for k in (simulation.get("metrics") or {})
                            if k.startswith(vocab.SIM) and k.count(".") == 2
                            and k.endswith(".episodes") and not k.startswith("sim.regression.")
                            and not k.startswith("sim.safety_critical.")})
    odd = spec.odd
    in_scope = list(odd.scenario_types) if odd else []
    regression = list(simulation.get("regression") or [])
    body: dict[str, Any] = {
        "format": FORMAT,
        "model": spec.model.name, "version": str(record.get("version")),
        "pipeline": spec.name, "dag_id": ctx.dag_id, "run_id": ctx.run_id,
        "built_at": max([str(record.get("registered_at") or "")] + [str(s.get("responded_at") or "")
                                                                     for s in statements]),
        "clauses": CLAUSES,
        "identity": {
            "model_uri": record.get("model_uri"), "model_files_sha256": record.get("artifact_digest"),
            "training_run_id": record.get("training_run_id"), "code_version": trained.get("code_version"),
            "code_digest": trained.get("code_digest"), "git_commit": trained.get("git_commit"),
            "template": loaded.path.name, "template_hash": loaded.digest,
            "dag_id": ctx.dag_id, "dag_run_id": ctx.run_id, "libraries": library_versions(),
            "release_record_digest": digest(record),
        },
        "odd": odd.model_dump(mode="json") if odd else None,
        "data": {
            "raw": {k: raw.get(k) for k in ("digest", "uri", "rows", "sources", "window_start", "window_end",
                                           "scenarios", "focus") if raw.get(k) is not None},
            "labelled": {k: labelled.get(k) for k in ("digest", "uri", "rows") if labelled.get(k) is not None},
            "episodes_per_scenario": by_scenario,
            "label_policy": {"ref": spec.label_policy.ref, "entry_point": spec.label_policy.entry_point},
            "validation": {"suite": validation.get("suite"), "success": validation.get("success"),
                           "evaluated": validation.get("evaluated"), "failed": validation.get("failed"),
                           "expectations": _expectations(json.loads(suite_text), validation),
                           "evidence": "evidence/validation.json"},
            "independence": independence(frame, spec.training.test_fraction) if frame is not None else None,
            "independence_gate": next((f"{r['metric']}: {r.get('verdict') or ('pass' if r.get('passed') else 'fail')}"
                                       for r in report if r["metric"] == LEAK_METRIC), "no gate on it"),
        },
        "coverage": {
            "scenario_set": spec.simulation.scenario_set,
            "episodes": simulation.get("episodes"),
            "per_type": {t: {"episodes": (simulation.get("metrics") or {}).get(f"{vocab.SIM}{t}.episodes"),
                             "collisions": (simulation.get("metrics") or {}).get(f"{vocab.SIM}{t}.collisions"),
                             "collision_rate": (simulation.get("metrics") or {}).get(f"{vocab.SIM}{t}.collision_rate")}
                         for t in catalog_types},
            "known_unsafe_scenarios": regression,
            "not_covered": sorted(set(in_scope) - set(catalog_types)),
            "evidence": "evidence/simulation.json",
            "episodes_evidence": "evidence/episodes.json" if episodes is not None else None,
        },
        "acceptance": {
            "gates": [{k: r.get(k) for k in ("metric", "min", "max", "confidence", "value", "lower", "upper",
                                             "events", "trials", "production", "delta", "passed", "verdict",
                                             "reason", "evidence", "description")} for r in report],
            "hil": (hil or {}).get("metrics"),
            "offline": offline.get("metrics"),
            "shift": shift_rows(shift) or None,
            "evidence": "evidence/gate_report.json",
        },
        "monitoring": {
            "kpis": [k.model_dump(mode="json") for k in (spec.incidents.kpis if spec.incidents else [])],
            "on_breach": (f"an incident on {spec.model.name}'s asset starts {spec.incident_dag_id} "
                          "(high priority; admitted, debounced, retrained with more of the scenario type)")
            if spec.incidents else "no field monitoring declared (template has no incidents: section)",
        },
        "approvals": {
            "required": spec.approval.required if spec.approval else 0,
            "approvers": list(spec.approval.approvers) if spec.approval else [],
            "statements": statements,
            "requester": requester,
            "independent_of_requester": bool(reviewers) and requester not in reviewers,
            "distinct_reviewers": len(set(reviewers)) == len(reviewers),
        },
        "change": _change(record, production, report),
    }
    body["verdict"] = verdict_of(report, statements, spec.approval is not None, shift, regression, simulation)
    return body, evidence


def _expectations(suite: dict, validation: dict) -> list[dict]:
    failed = {json.dumps(c.get("expectation"), sort_keys=True) for c in validation.get("checks") or []
              if not c.get("success")}
    out = []
    for e in suite.get("expectations") or []:
        kind = e.get("type") or e.get("expectation_type")
        kwargs = e.get("kwargs") or {}
        out.append({"expectation": kind, "kwargs": kwargs,
                    "outcome": "failed" if json.dumps(kind, sort_keys=True) in failed else
                    ("passed" if validation.get("success") else "see evidence")})
    return out


def _change(record: dict, production: dict | None, report: list[dict]) -> dict:
    if not production:
        return {"replaces": None, "note": "no production version: this is the first release of the model"}
    before = production.get("record") or {}
    return {"replaces": production.get("version"),
            "data": {"labelled": [before.get("dataset_digest"), record.get("dataset_digest")],
                     "raw": [before.get("raw_dataset_digest"), record.get("raw_dataset_digest")]},
            "template_hash": [before.get("template_hash"), record.get("template_hash")],
            "label_policy": [before.get("label_policy"), record.get("label_policy")],
            "model_files_sha256": [before.get("artifact_digest"), record.get("artifact_digest")],
            "metrics": {r["metric"]: {"production": r.get("production"), "candidate": r.get("value"),
                                      "delta": r.get("delta")} for r in report if r.get("production") is not None}}


def render_html(body: dict) -> str:
    from closedloop.runtime.pages import render

    return render("dossier.html", d=body)


def bundle(body: dict, evidence: dict[str, bytes], signer) -> dict[str, bytes]:
    """Every file of the bundle (name → bytes): the evidence, the HTML and the signed ``dossier.json``."""
    files = dict(evidence)
    files[HTML_NAME] = render_html(body).encode("utf-8")
    manifest = {name: bytes_digest(data) for name, data in sorted(files.items())}
    signed = {"body": body, "files": manifest}
    document = {**signed, "format": FORMAT,
                "signature": {"alg": ALGORITHM, "key_id": signer.verifier.key_id,
                              "public_key": signer.verifier.published(), "sig": signer.sign(canonical(signed))}}
    files[JSON_NAME] = _json_bytes(document)
    return files


def write(files: dict[str, bytes], dest: str) -> dict:
    """Write the bundle under ``dest`` (a folder or fsspec URI): every file written aside and renamed, the
    same bytes again on a retry. Returns its URI and the sha256 of ``dossier.json``."""
    import uuid

    import fsspec

    fs, root = fsspec.core.url_to_fs(dest)
    for name, data in sorted(files.items(), key=lambda kv: kv[0] == JSON_NAME):  # the signed index last
        path = f"{root.rstrip('/')}/{name}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)
    return {"uri": f"{dest.rstrip('/')}/{JSON_NAME}", "folder": dest.rstrip("/"),
            "digest": "sha256:" + bytes_digest(files[JSON_NAME])}


def location(data_root: str, model: str, version: str) -> str:
    return f"{data_root.rstrip('/')}/dossiers/{model}/v{version}"


def verify(path: str | Path, keys) -> dict:
    """Check a bundle offline with the published public key(s) ``keys`` (a Verifier or KeyRing, or its
    published text): the signature, every cited file's sha256, every sealed record's seal, and that the
    records name this model version. Returns the body; raises :class:`EvidenceError` naming the first
    item that does not match."""
    from closedloop.runtime.signing import Verifier

    if isinstance(keys, str):
        keys = Verifier.from_text(keys)
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    index = folder / JSON_NAME
    try:
        document = json.loads(index.read_bytes())
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"{index}: not a readable dossier ({exc})") from None
    if document.get("format") != FORMAT or not isinstance(document.get("signature"), dict):
        raise EvidenceError(f"{index}: not a {FORMAT} document")
    sig = document["signature"]
    ids = getattr(keys, "ids", None)
    known = ids() if callable(ids) else [keys.key_id]
    if sig.get("key_id") not in known:
        raise EvidenceError(f"{JSON_NAME}: signed with key {sig.get('key_id')!r}, not a published key ({', '.join(known)})")
    signed = {"body": document.get("body"), "files": document.get("files")}
    if not _verify_bytes(keys, sig.get("key_id"), canonical(signed), str(sig.get("sig"))):
        raise EvidenceError(f"{JSON_NAME}: the signature does not match its content (body or file list changed)")
    for name, expected in sorted((document.get("files") or {}).items()):
        target = folder / name
        if not target.resolve().is_relative_to(folder.resolve()):
            raise EvidenceError(f"{name}: a cited file outside the bundle")
        try:
            actual = bytes_digest(target.read_bytes())
        except OSError:
            raise EvidenceError(f"{name}: cited by the dossier but missing from the bundle") from None
        if actual != expected:
            raise EvidenceError(f"{name}: its sha256 is {actual}, the dossier signed {expected}: the file was changed")
    body = document["body"]
    _check_records(folder, body, keys)
    return body


def _verify_bytes(keys, key_id: str, message: bytes, sig: str) -> bool:
    if hasattr(keys, "verify_bytes"):
        return keys.verify_bytes(message, sig)
    for k in getattr(keys, "keys", []):  # a KeyRing: the pinned key with this id
        verifier = getattr(k, "verifier", None)
        if verifier is not None and verifier.key_id == key_id:
            return verifier.verify_bytes(message, sig)
    return False


def _check_records(folder: Path, body: dict, keys) -> None:
    """The sealed records the bundle carries are the deployment's, about this version."""
    record_file = folder / "evidence/release_record.json"
    record = json.loads(record_file.read_bytes())
    plain = keys.unseal(record, None, what="evidence/release_record.json")
    if plain.get("model") != body.get("model") or str(plain.get("version")) != str(body.get("version")):
        raise EvidenceError(f"evidence/release_record.json is the record of {plain.get('model')} v{plain.get('version')}, "
                            f"not of {body.get('model')} v{body.get('version')}")
    if digest(record) != body["identity"]["release_record_digest"]:
        raise EvidenceError("evidence/release_record.json: not the release record the dossier's identity names")
    for st in body.get("approvals", {}).get("statements") or []:
        name = st["evidence"]
        sealed = json.loads((folder / name).read_bytes())
        approval = keys.unseal(sealed, None, what=name)
        statement = approval.get("statement") or {}
        if statement.get("record_digest") != digest(record) or statement.get("decision") != st.get("decision"):
            raise EvidenceError(f"{name}: the approval is not of this release record, or not the decision the "
                                "dossier states")


def build_for_run(loaded, ctx, inputs: dict, *, signer, verifier, approval_tasks: list[str]) -> dict:
    # inputs: the results the row reads (step id → result), the run's simulation result as "simulation"
    """The ``dossier`` step: assemble, sign and write the bundle of this run's version (once per run: a
    retry finds the finished step's result; a crash before it finished writes the same bytes again), and
    name it on the model version (tag ``closedloop.dossier``)."""
    from closedloop.runtime import tracking
    from closedloop.runtime.faults import strike
    from closedloop.runtime.storage import read_snapshot
    from closedloop.steps.gates import SHIFT_ARTIFACT
    from closedloop.steps.simulation import EPISODES_ARTIFACT

    run = tracking.step_run(loaded, ctx, "dossier")
    done = tracking.finished_result(run)
    if done is not None:
        return done
    c = tracking.client(ctx)
    reg = inputs["register_candidate"]
    model, version = reg["model"], str(reg["version"])
    mv = c.get_model_version(model, version)
    record = json.loads(mv.tags.get(vocab.RELEASE_RECORD) or "null")
    if not isinstance(record, dict) or digest(record) != digest(reg):
        raise EvidenceError(f"{model} v{version}: the release record on the version is not the one this run "
                            "sealed; no dossier is built from it")
    approvals = []
    for task in approval_tasks:  # the sealed statements kept on the version, believed only with their seal
        sealed = json.loads(mv.tags.get(vocab.APPROVAL_PREFIX + task) or "null")
        statement = verifier.unseal(sealed, None, what=f"{model} v{version}'s {task} statement").get("statement") or {}
        if statement.get("record_digest") != digest(record) or statement.get("decision") != "approved":
            raise EvidenceError(f"{model} v{version}: the {task} statement on the version is not an approval of this "
                                "release record; no dossier is built from it")
        approvals.append(sealed)
    trained = dict(inputs["train"])
    ttags = c.get_run(trained["run_id"]).data.tags
    trained.update(code_version=ttags.get(vocab.CODE_VERSION), code_digest=ttags.get(vocab.CODE_DIGEST),
                   git_commit=ttags.get(vocab.GIT_COMMIT))
    gate = inputs["release_gate"]
    shift = _artifact_json(c, gate["run_id"], SHIFT_ARTIFACT)  # None: nothing in production to compare with
    labelled = inputs["label"]
    frame = read_snapshot(labelled["uri"], labelled["digest"])
    production = None
    prod_version = tracking.alias_version(c, model, vocab.PRODUCTION)
    if prod_version and prod_version != version:
        prod_record = c.get_model_version(model, prod_version).tags.get(vocab.RELEASE_RECORD)
        production = {"version": prod_version, "record": json.loads(prod_record) if prod_record else None}
    simulation = inputs["simulation"]
    body, evidence = assemble(loaded, ctx, raw=inputs["generate_dataset"], labelled=labelled,
                              validation=inputs["validate_data"], trained=trained, offline=inputs["offline_eval"],
                              simulation=simulation, gate=gate, record=record, approvals=approvals, shift=shift,
                              frame=frame, production=production, hil=inputs.get("await_hil"),
                              episodes=_artifact_bytes(c, simulation["run_id"], EPISODES_ARTIFACT))
    files = bundle(body, evidence, signer)
    out = write(files, location(ctx.data_root, model, version))
    strike(ctx, "bundle_written")
    out.update(model=model, version=version, verdict=body["verdict"]["verdict"], files=len(files))
    c.set_model_version_tag(model, version, vocab.DOSSIER, json.dumps({k: out[k] for k in ("uri", "digest")}))
    return tracking.finish(ctx, run.info.run_id, {**out, "run_id": run.info.run_id})


def _artifact_bytes(client, run_id: str | None, path: str) -> bytes | None:
    """An artifact of an MLflow run as it was logged (None when the run has none)."""
    import tempfile

    if not run_id:
        return None
    folder = path.rpartition("/")[0]
    if path not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()


def _artifact_json(client, run_id: str, path: str) -> dict | None:
    data = _artifact_bytes(client, run_id, path)
    return json.loads(data) if data is not None else None

"""Trace a model to its origins and list what a data change touches — from MLflow's records.

Every MLflow run and model version of a pipeline run carries the lineage tags (pipeline,
template hash, dataset digests, label policy, Airflow dag/run/task, code version, what started
the run); the training run also carries the dataset manifest (sources, window, sampling, rows,
validation). :func:`trace` and :func:`impact` read only those records, with indexed lookups, so
they stay fast on a store with many thousands of runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from closedloop import pipeline, vocab
from closedloop.errors import ClosedLoopError
from closedloop.runtime.tracking import literal, mlflow_client, not_found, pages
from closedloop.spec.schema import NAME_RE, SOURCE_RE, VERSION_RE

LIVE_ALIASES = ("production", "candidate")
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
SOURCE_NAME, NAME, VERSION = re.compile(SOURCE_RE), re.compile(NAME_RE), re.compile(VERSION_RE)
MAX_LIMIT = 1000
"""The most rows one answer of :func:`impact` lists (``limit``; ``offset`` pages on; totals are exact)."""


class LineageError(ClosedLoopError):
    """A reference that names nothing (exit code 2 in the CLI)."""


def _experiments(c) -> list[str]:
    return [e.experiment_id for e in c.search_experiments(filter_string="name LIKE 'closedloop/%'", max_results=1000)]


def registered_model(name: str, tracking_uri: str | None = None):
    """The registered model ``name``. :raises LineageError: naming the models there are."""
    c = mlflow_client(tracking_uri)
    try:
        return c.get_registered_model(name)
    except Exception as exc:
        if not not_found(exc):
            raise
    known = ", ".join(sorted(m.name for m in c.search_registered_models(max_results=50))) or "none"
    raise LineageError(f"unknown model {name!r} (registered models: {known})")


def _version(c, name: str, version: str | None = None, alias: str | None = None):
    try:
        if alias is not None:
            return c.get_model_version_by_alias(name, alias)
        return c.get_model_version(name, version)
    except Exception as exc:
        if not not_found(exc):
            raise
    try:
        c.get_registered_model(name)
    except Exception as exc:
        if not_found(exc):
            known = ", ".join(sorted(m.name for m in c.search_registered_models(max_results=50))) or "none"
            raise LineageError(f"unknown model {name!r} (registered models: {known})") from None
        raise
    if alias is not None:
        raise LineageError(f"model {name!r} has no alias {alias!r}") from None
    raise LineageError(f"model {name!r} has no version {version!r}") from None


def resolve(ref: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """What ``ref`` names: ``{"version": ModelVersion | None, "pipeline_run": Run | None}``.

    ``ref`` is ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``NAME/VERSION``, ``NAME@ALIAS``,
    an MLflow run id (any step of a pipeline run), an Airflow dag run id, or ``DAG_ID/RUN_ID`` (how ``runs``,
    ``trace`` and ``impact`` print a pipeline run).
    """
    c = mlflow_client(tracking_uri)
    body = ref.removeprefix("models:/")
    if "@" in body and "/" not in body:
        name, alias = body.rsplit("@", 1)
        mv = _version(c, name, alias=alias)
        return {"version": mv, "pipeline_run": _pipeline_run_of_version(c, mv)}
    if "/" in body and body.rsplit("/", 1)[1].isdigit():
        name, version = body.rsplit("/", 1)
        mv = _version(c, name, version=version)
        return {"version": mv, "pipeline_run": _pipeline_run_of_version(c, mv)}
    if ref.startswith("models:/"):
        raise LineageError(f"{ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if "/" in ref:  # DAG_ID/RUN_ID: the pipeline run's key
        parent = _pipeline_run(c, ref, _experiments(c))
        if parent is None:
            raise LineageError(f"{ref!r}: no pipeline run DAG_ID/RUN_ID that closedloop recorded")
        return {"version": _version_of_run_key(c, ref), "pipeline_run": parent}
    if RUN_ID_RE.match(ref):
        try:
            run = c.get_run(ref)
        except Exception as exc:
            if not_found(exc):
                raise LineageError(f"no MLflow run {ref!r}") from None
            raise
        key = run.data.tags.get(vocab.RUN_KEY)
        if not key:
            raise LineageError(f"MLflow run {ref!r} was not made by a closedloop pipeline (no closedloop.run_key)")
        parent = _pipeline_run(c, key, [run.info.experiment_id])
        return {"version": _version_of_run_key(c, key), "pipeline_run": parent or run}
    runs = c.search_runs(_experiments(c), filter_string=f"tags.`airflow.run_id` = {_q(ref)} and "
                         "tags.`closedloop.step` = 'pipeline'", max_results=10)
    if not runs:
        raise LineageError(f"{ref!r} is no model (models:/NAME@ALIAS, NAME/VERSION), MLflow run id or Airflow dag "
                           "run id that a closedloop pipeline recorded")
    if len(runs) > 1:
        dags = sorted({r.data.tags.get(vocab.AIRFLOW_DAG_ID) for r in runs})
        raise LineageError(f"Airflow run id {ref!r} exists in several DAGs {dags}; give the model version instead")
    run = runs[0]
    return {"version": _version_of_run_key(c, run.data.tags[vocab.RUN_KEY]), "pipeline_run": run}


def _q(value: str) -> str:
    """``value`` as a literal in an MLflow filter (never spliced: :func:`tracking.literal`)."""
    try:
        return literal(value)
    except ValueError as exc:
        raise LineageError(str(exc)) from None


def _pipeline_run(c, run_key: str, experiment_ids: list[str]):
    runs = c.search_runs(experiment_ids, filter_string=f"tags.`closedloop.run_key` = {_q(run_key)} and "
                         "tags.`closedloop.step` = 'pipeline'", max_results=1)
    return runs[0] if runs else None


def _pipeline_run_of_version(c, mv):
    key = mv.tags.get(vocab.RUN_KEY)
    if not key or not mv.run_id:
        return None
    try:
        train = c.get_run(mv.run_id)
    except Exception as exc:
        if not_found(exc):
            return None
        raise
    return _pipeline_run(c, key, [train.info.experiment_id])


def _version_of_run_key(c, run_key: str):
    pipeline = run_key  # tags on versions: closedloop.run_key = "<dag_id>/<run_id>"
    try:
        found = c.search_model_versions(f"tags.`closedloop.run_key` = {_q(pipeline)}", max_results=5)
    except Exception as exc:
        if not_found(exc):
            return None
        raise
    if not found:
        return None
    first = min(found, key=lambda v: int(v.version))
    return c.get_model_version(first.name, first.version)  # search results carry no aliases


def _step_runs(c, parent) -> dict[str, Any]:
    key = parent.data.tags.get(vocab.RUN_KEY)
    runs = c.search_runs([parent.info.experiment_id], filter_string=f"tags.`closedloop.run_key` = {_q(key)}",
                         max_results=50, order_by=["attributes.start_time ASC"])  # a re-done step: newest wins
    return {r.data.tags.get(vocab.STEP): r for r in runs}


def _result(run) -> dict | None:
    raw = run.data.tags.get(vocab.RESULT) if run else None
    return json.loads(raw) if raw else None


def _origin(tags: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"trigger": tags.get(vocab.TRIGGER, "unknown")}
    if tags.get(vocab.REQUESTER) or tags.get(vocab.REQUEST_REQUESTER):
        out["requester"] = tags.get(vocab.REQUESTER) or tags.get(vocab.REQUEST_REQUESTER)
    incident = {k.removeprefix(vocab.INCIDENT_PREFIX): v for k, v in tags.items() if k.startswith(vocab.INCIDENT_PREFIX)}
    if incident:
        out["incident"] = incident
    for key in (vocab.RERUN_OF, vocab.RERUNS, vocab.RETRAIN_FOR):
        if tags.get(key):
            out[key.removeprefix(vocab.NAMESPACE)] = tags[key]
    return out


def trace(ref: str, tracking_uri: str | None = None, *, limit: int = MAX_LIMIT, offset: int = 0) -> dict[str, Any]:
    """The chain behind ``ref``, newest first: model version → training run → dataset snapshots →
    label policy → template → Airflow run (and what started it) → gates and review.

    One record per link; the one list that grows with the store — the regression scenarios the
    model's incidents added, each with its outcome (under ``simulation``; the regression gate's row
    refers to it) — is paged by ``limit`` (at most :data:`MAX_LIMIT`) and ``offset``, with its total
    in ``totals``."""
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise LineageError(f"limit must be 1..{MAX_LIMIT} and offset >= 0 (got limit {limit}, offset {offset})")
    c = mlflow_client(tracking_uri)
    found = resolve(ref, tracking_uri)
    mv, parent = found["version"], found["pipeline_run"]
    steps = _step_runs(c, parent) if parent is not None and parent.data.tags.get(vocab.STEP) == "pipeline" \
        else ({"train": parent} if parent is not None else {})
    train = steps.get("train")
    if train is None and mv is not None and mv.run_id:
        train = c.get_run(mv.run_id)
    tags = dict((parent or train).data.tags) if (parent or train) else dict(mv.tags)
    ttags = dict(train.data.tags) if train else {}
    manifest = json.loads(ttags.get(vocab.DATASET_MANIFEST) or "null") or {}
    gate = _result(steps.get("release_gate"))
    out: dict[str, Any] = {"ref": ref}
    if mv is not None:
        aliases = list(mv.aliases)
        out["model_version"] = {
            "name": mv.name, "version": str(mv.version), "aliases": aliases, "status": mv.status,
            "created": mv.creation_timestamp, "source": mv.source,
            "request": {k.removeprefix(vocab.REQUEST_PREFIX): v for k, v in mv.tags.items()
                        if k.startswith(vocab.REQUEST_PREFIX)},
        }
    if train is not None:
        out["training_run"] = {
            "run_id": train.info.run_id, "status": train.info.status, "params": dict(train.data.params),
            "metrics": dict(train.data.metrics), "code_version": ttags.get(vocab.CODE_VERSION),
            "code_digest": ttags.get(vocab.CODE_DIGEST), "git_commit": ttags.get(vocab.GIT_COMMIT),
            "model_uri": ttags.get(vocab.MODEL_URI),
        }
        if ttags.get(vocab.CACHE) == "hit":  # the model was trained by an earlier run with identical inputs
            out["training_run"]["cache_hit"] = {"source_run_id": ttags.get(vocab.CACHE_SOURCE_RUN_ID),
                                                "source_run_key": ttags.get(vocab.CACHE_SOURCE_RUN_KEY)}
    out["datasets"] = [d for d in (
        {"kind": "labelled", **(manifest.get("labelled") or {"digest": ttags.get(vocab.DATASET_VERSION)})},
        {"kind": "raw", **(manifest.get("raw") or {"digest": ttags.get(vocab.RAW_DATASET_VERSION)})},
    ) if d.get("digest")]
    out["validation"] = manifest.get("validation")
    out["label_policy"] = tags.get(vocab.LABEL_POLICY)
    out["template"] = {"pipeline": tags.get(vocab.PIPELINE), "file": tags.get(vocab.TEMPLATE),
                       "hash": tags.get(vocab.TEMPLATE_HASH)}
    out["airflow_run"] = {"dag_id": tags.get(vocab.AIRFLOW_DAG_ID), "run_id": tags.get(vocab.AIRFLOW_RUN_ID),
                          "started_by": _origin({**tags, **(dict(mv.tags) if mv is not None else {})})}
    sim_run = next((steps[k] for k in pipeline.SIMULATION_RESULT if steps.get(k)), None)
    sim = _result(sim_run)
    out["simulation"] = {
        "run_id": sim_run.info.run_id, "episodes": sim.get("episodes"), "shards": sim.get("shards", 1),
        "scenario_set": sim_run.data.params.get("scenario_set"),
        "regression_catalog": sim.get("regression_catalog") or sim_run.data.tags.get(vocab.REGRESSION_CATALOG),
        "regression": sim.get("regression") or [],
    } if sim_run is not None and sim else None
    out["gates"] = {"passed": gate.get("passed"), "report": gate.get("report")} if gate else None
    out["steps"] = [{"id": row.id, "run_id": steps[row.id].info.run_id, "status": steps[row.id].info.status,
                     "cache": steps[row.id].data.tags.get(vocab.CACHE)}
                    for row in pipeline.STEPS if row.id in steps]  # in the table's order
    review = {k.removeprefix(vocab.REVIEW_PREFIX): v for k, v in (mv.tags.items() if mv is not None else ())
              if k.startswith(vocab.REVIEW_PREFIX)}
    out["review"] = review or None
    out["dossier"] = json.loads(mv.tags[vocab.DOSSIER]) if mv is not None and mv.tags.get(vocab.DOSSIER) else None
    out["recalls"] = _recalls_of(c, mv) if mv is not None else []
    outcomes = (out["simulation"] or {}).get("regression") or []
    if out["simulation"]:
        out["simulation"]["regression"] = outcomes[offset:offset + limit]
    for row in (out["gates"] or {}).get("report") or []:
        row.pop("incidents", None)  # the same outcomes as simulation.regression: listed (and paged) once
    out.update(totals={"regression": len(outcomes)}, limit=limit, offset=offset)
    return out


def _recalls_of(c, mv) -> list[dict]:
    """The recalls that hold the version (checked with the pinned keys; without them, the hold tags as they
    stand, marked unverified)."""
    from closedloop.errors import EvidenceError
    from closedloop.runtime.signing import trusted_keys
    from closedloop.steps import recall

    try:
        ring = trusted_keys()
    except EvidenceError:
        return [{"id": k.removeprefix(vocab.HOLD_PREFIX), "verified": False, **{
                 f: (json.loads(v) if v.startswith("{") else {}).get(f) for f in ("query", "how", "reason")}}
                for k, v in mv.tags.items() if k.startswith(vocab.HOLD_PREFIX)]
    return [{**h, "verified": True} for h in recall.holds(c, mv.name, str(mv.version), ring, tags=dict(mv.tags))]


def dossier_of(ref: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Where the release dossier of the version ``ref`` names is (``{"model", "version", "uri", "digest",
    "verdict", "html"}``), from the version's tag; :class:`LineageError` when it has none."""
    found = resolve(ref, tracking_uri)
    mv = found["version"]
    if mv is None:
        raise LineageError(f"{ref}: names no model version")
    tag = mv.tags.get(vocab.DOSSIER)
    if not tag:
        raise LineageError(f"{mv.name} v{mv.version} has no release dossier (it is built after the last approval, "
                           "or after registration in a pipeline without review)")
    where = json.loads(tag)
    out = {"model": mv.name, "version": str(mv.version), "uri": where.get("uri"), "digest": where.get("digest"),
           "html": str(where.get("uri") or "").rsplit("/", 1)[0] + "/dossier.html", "verdict": None}
    try:
        import fsspec

        with fsspec.open(out["uri"], "rb") as fh:
            out["verdict"] = json.loads(fh.read())["body"]["verdict"]["verdict"]
    except (OSError, ValueError, KeyError) as exc:
        out["error"] = f"cannot read {out['uri']}: {exc}"
    return out





def _all_runs(c, filter_string: str) -> list:
    exps = _experiments(c)
    if not exps:
        return []
    return pages(lambda token: c.search_runs(exps, filter_string=filter_string, max_results=10_000, page_token=token))


def impact(*, source: str | None = None, label_policy: str | None = None, dataset: str | None = None,
           tracking_uri: str | None = None, limit: int = MAX_LIMIT, offset: int = 0,
           dag_ids: Collection[str] | None = None) -> dict[str, Any]:
    """Everything touched by a data source, a label policy (``NAME`` or ``NAME@VERSION``) or a
    dataset digest: snapshots, training runs, model versions, aliases; live ones flagged.

    One indexed tag query for the training runs and one for the model versions (both carry the
    lineage tags), so the cost grows with what is touched, not with the size of the store.

    ``limit`` (at most :data:`MAX_LIMIT`) and ``offset`` page the training runs and model versions;
    ``totals`` counts them all, and every live version is always listed. ``dag_ids``: only records of
    runs in these DAGs (what the caller may read); None: all."""
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise LineageError(f"limit must be 1..{MAX_LIMIT} and offset >= 0 (got limit {limit}, offset {offset})")
    given = [x for x in (source, label_policy, dataset) if x]
    if len(given) != 1:
        raise LineageError("give exactly one of --source, --label-policy, --dataset")
    c = mlflow_client(tracking_uri)
    if source:
        if not SOURCE_NAME.match(source):
            raise LineageError(f"--source {source!r}: a source name is letters, digits and _ . : / @ + - "
                               "(no wildcards, commas or quotes)")
        predicates = [f"tags.`{vocab.DATASET_SOURCES}` LIKE {_q(f'%,{source},%')}"]
        exact = (vocab.DATASET_SOURCES, lambda tag: f",{source}," in tag)  # '_' is a LIKE wildcard
        what = f"source {source}"
    elif label_policy:
        name, at, version = label_policy.partition("@")
        if not NAME.match(name) or (at and not VERSION.match(version)):
            raise LineageError(f"--label-policy {label_policy!r}: expected NAME or NAME@VERSION (letters, digits, "
                               "_ . -; no wildcards)")
        op = f"= {_q(label_policy)}" if at else f"LIKE {_q(label_policy + '@%')}"
        predicates = [f"tags.`{vocab.LABEL_POLICY}` {op}"]
        exact = (vocab.LABEL_POLICY, lambda tag: tag == label_policy or (not at and tag.startswith(name + "@")))
        what = f"label policy {label_policy}"
    else:
        if not re.fullmatch(r"[0-9a-f]{8,64}", dataset):
            raise LineageError(f"--dataset {dataset!r}: expected a snapshot's sha256, or its first 8 or more hex "
                               "digits")
        op = f"= {_q(dataset)}" if len(dataset) == 64 else f"LIKE {_q(dataset + '%')}"  # a short form: its prefix
        predicates = [f"tags.`{vocab.DATASET_VERSION}` {op}", f"tags.`{vocab.RAW_DATASET_VERSION}` {op}"]
        exact = None
        what = f"dataset {dataset}"
    runs: dict[str, Any] = {}
    found_versions: dict[tuple[str, str], Any] = {}
    for predicate in predicates:  # the same tags are on the training runs and on the model versions
        runs.update((r.info.run_id, r) for r in _all_runs(c, f"tags.`closedloop.step` = 'train' and {predicate}"))
        found_versions.update(((v.name, str(v.version)), v) for v in _versions_where(c, predicate))
    runs = list(runs.values())
    if dag_ids is not None:
        runs = [r for r in runs if r.data.tags.get(vocab.AIRFLOW_DAG_ID) in dag_ids]
        found_versions = {k: v for k, v in found_versions.items() if v.tags.get(vocab.AIRFLOW_DAG_ID) in dag_ids}
    if exact is not None:
        tag, matches = exact
        runs = [r for r in runs if matches(r.data.tags.get(tag, ""))]
        found_versions = {k: v for k, v in found_versions.items() if matches(v.tags.get(tag, ""))}
    snapshots: dict[str, dict] = {}
    training = []
    for r in runs:
        t = r.data.tags
        for kind, key in (("raw", vocab.RAW_DATASET_VERSION), ("labelled", vocab.DATASET_VERSION)):
            if t.get(key):
                snapshots.setdefault(t[key], {"digest": t[key], "kind": kind, "pipeline": t.get(vocab.PIPELINE),
                                              "label_policy": t.get(vocab.LABEL_POLICY) if kind == "labelled"
                                              else None, "window": t.get(vocab.DATASET_WINDOW)})
        entry = {"run_id": r.info.run_id, "pipeline": t.get(vocab.PIPELINE), "dag_id": t.get(vocab.AIRFLOW_DAG_ID),
                 "airflow_run_id": t.get(vocab.AIRFLOW_RUN_ID), "status": r.info.status,
                 "dataset_version": t.get(vocab.DATASET_VERSION), "label_policy": t.get(vocab.LABEL_POLICY)}
        training.append(entry)
    versions = []
    aliases_of: dict[str, dict[str, list[str]]] = {}
    for (name, version), mv in found_versions.items():
        if name not in aliases_of:  # search results carry no aliases: one read per model
            aliases_of[name] = {}
            for alias, v in (c.get_registered_model(name).aliases or {}).items():
                aliases_of[name].setdefault(str(v), []).append(alias)
        aliases = sorted(aliases_of[name].get(version, []))
        versions.append({"model": name, "version": version, "aliases": aliases,
                         "live": sorted(set(aliases) & set(LIVE_ALIASES)),
                         "training_run_id": mv.tags.get(vocab.TRAINING_RUN_ID) or mv.run_id})
    versions.sort(key=lambda v: (v["model"], int(v["version"])))
    training.sort(key=lambda e: (e["pipeline"] or "", e["airflow_run_id"] or ""))
    snapshots = sorted(snapshots.values(), key=lambda s: (s["pipeline"] or "", s["kind"], s["digest"]))
    return {"query": what, "totals": {"snapshots": len(snapshots), "training_runs": len(training),
                                      "model_versions": len(versions)},
            "limit": limit, "offset": offset,
            "snapshots": snapshots[offset:offset + limit], "training_runs": training[offset:offset + limit],
            "model_versions": versions[offset:offset + limit], "live": [v for v in versions if v["live"]]}


def _versions_where(c, filter_string: str) -> list:
    return pages(lambda token: c.search_model_versions(filter_string, max_results=10_000, page_token=token))


def rerun_plan(ref: str, specs, *, fresh_data: bool = False, allow_template_change: bool = False,
               no_cache: bool = False, tracking_uri: str | None = None) -> dict[str, Any]:
    """How to rerun the pipeline run behind ``ref`` exactly: ``{"dag_id", "conf", "notes", "original"}``.

    Same DAG, same request, same pinned raw snapshot (unless ``fresh_data``), same label policy;
    refused when the template changed since (its hash differs) unless ``allow_template_change``.
    ``no_cache``: every step does its work again (the step cache is bypassed for this run).
    ``notes`` say what is not identical (e.g. another code version).
    """
    from closedloop.runtime.context import code_version

    t = trace(ref, tracking_uri)
    ar, tp = t["airflow_run"], t["template"]
    if not ar.get("dag_id") or not ar.get("run_id"):
        raise LineageError(f"{ref!r}: no Airflow run recorded for it; nothing to rerun")
    loaded = next((s for s in specs if s.spec.name == tp["pipeline"]), None)
    if loaded is None:
        raise LineageError(f"{ref!r} came from pipeline {tp['pipeline']!r}, which no valid template defines now")
    notes = []
    if loaded.digest != tp["hash"]:
        msg = (f"template {loaded.path.name} changed since the original run (hash {tp['hash']} then, "
               f"{loaded.digest} now)")
        if not allow_template_change:
            raise LineageError(msg + ": the rerun would not be exact; pass --allow-template-change to rerun "
                               "with the current template anyway")
        notes.append(msg + ": rerunning with the current template")
    if loaded.spec.label_policy.ref != t["label_policy"]:
        notes.append(f"label policy is {loaded.spec.label_policy.ref} now, {t['label_policy']} then")
    then = (t.get("training_run") or {}).get("code_version")
    if then and then != code_version():
        notes.append(f"code version differs: {then} then, {code_version()} now")
    raw = next((d for d in t["datasets"] if d["kind"] == "raw"), None)
    from closedloop.spec.request import RerunPin

    pin = ({k: raw[k] for k in RerunPin.model_fields if raw.get(k) is not None}  # by digest: never the file's URI
           if raw and raw.get("digest") and raw.get("window_end") else None)
    if not fresh_data and pin is None:
        raise LineageError(f"{ref!r}: the original run recorded no raw snapshot to pin (use --fresh-data)")
    original = f"{ar['dag_id']}/{ar['run_id']}"
    conf: dict[str, Any] = {vocab.CONF_RERUN: {"of": original, "fresh_data": fresh_data,
                                                 **({"raw": pin} if not fresh_data else {})}}
    if no_cache:
        conf[vocab.CONF_CACHE] = False
    request = (t.get("model_version") or {}).get("request") or {}
    incident = ar["started_by"].get("incident")
    if ar["dag_id"] == loaded.spec.incident_dag_id:
        if not incident:
            raise LineageError(f"{ref!r}: incident run without a recorded incident; cannot rerun it")
        conf["incident"] = {k: v for k, v in {
            "id": incident.get("id", "").split(",")[0], "model": loaded.spec.model.name,
            "scenario_type": incident.get("scenario_type", "").split(",")[0], "severity": incident.get("severity"),
            "kind": incident.get("kind"), "reported_by": incident.get("reported_by") or None,
            "log_refs": [r for r in (incident.get("log_refs") or "").split(",") if r],
        }.items() if v not in (None, "")}
    else:
        from closedloop.spec.request import FIELDS

        for k in FIELDS:
            if request.get(k):
                conf[k] = [x.strip() for x in request[k].split(",")] if k == "change" else request[k]
    return {"dag_id": ar["dag_id"], "conf": conf, "notes": notes, "original": original,
            "pinned": pin["digest"] if pin and not fresh_data else None}

"""Recalls: a data source (or a window of it), a label policy version, a code version or a snapshot
turns out bad — every model version it touched is found, held, taken out of production by a governed
rollback when an approved unaffected version exists, retrained without it, and the recall is closed
when every affected pipeline has an unaffected version in production.

Records (all in MLflow, all sealed with the deployment's key):

- the **recall** — one MLflow run per recall in the experiment ``closedloop/recalls``, named by the
  recall's id (a digest of what it recalls: opening the same recall twice finds the first). Its
  opening record (what, why, who, when) is a sealed *param*, which MLflow never changes or deletes;
  its close record a sealed tag; the affected set at opening an artifact (``affected.json``).
- a **hold** per affected version — a sealed tag ``closedloop.hold.<id>`` and an audit event.

A version is held when any recall's query matches the lineage its sealed release record states
(sources, data window and what was excluded from it, label policy, code digest, snapshots) — checked
again by every promote, rollback and restore and by the alias watcher, so removing a hold tag in
MLflow releases nothing. Holds stay after a recall closes: the input is still bad.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from closedloop import vocab
from closedloop.errors import ApprovalError, EvidenceError, PermanentError
from closedloop.runtime.signing import Binding, Signer
from closedloop.runtime.tracking import pages

log = logging.getLogger(__name__)

KINDS = ("source", "label_policy", "code_digest", "snapshot")
RECALL_ID_RE = re.compile(r"^R-[0-9a-f]{10}$")
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
BINDING_DAG = "closedloop_recall"


class RecallError(PermanentError, LookupError):
    """A recall request that names nothing valid, or no recall (exit code 2 in the CLI)."""


@dataclass(frozen=True)
class Query:
    """What a recall recalls: one input, and for a source optionally a window of days (inclusive)."""

    kind: str
    value: str
    window: tuple[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "window": list(self.window) if self.window else None}

    @property
    def id(self) -> str:
        """The recall's id: the same input (and window) is always the same recall."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return "R-" + hashlib.sha256(text.encode()).hexdigest()[:10]

    def describe(self) -> str:
        what = {"source": "source", "label_policy": "label policy", "code_digest": "code",
                "snapshot": "snapshot"}[self.kind]
        return f"{what} {self.value}" + (f" {self.window[0]}..{self.window[1]}" if self.window else "")

    @classmethod
    def of(cls, data: dict) -> Query:
        w = data.get("window")
        return cls(str(data["kind"]), str(data["value"]), (str(w[0]), str(w[1])) if w else None)


def query_of(*, source: str | None = None, window: str | None = None, label_policy: str | None = None,
             code_digest: str | None = None, snapshot: str | None = None) -> Query:
    """The recall's query from what a person gives (``--source S [--window A..B]``, ``--label-policy
    NAME@VERSION``, ``--code-digest HEX``, ``--snapshot HEX``); :class:`RecallError` naming the field."""
    from closedloop.spec.schema import NAME_RE, SOURCE_RE, VERSION_RE

    given = {k: v for k, v in {"source": source, "label_policy": label_policy, "code_digest": code_digest,
                               "snapshot": snapshot}.items() if v}
    if len(given) != 1:
        raise RecallError("a recall names exactly one of --source, --label-policy, --code-digest, --snapshot "
                          f"(got {', '.join(given) or 'none'})")
    (kind, value), = given.items()
    value = str(value).strip()
    if window and kind != "source":
        raise RecallError("--window narrows a --source recall only")
    if kind == "source" and not re.match(SOURCE_RE, value):
        raise RecallError(f"--source {value!r}: a source name is letters, digits and _ . : / @ + -")
    if kind == "label_policy":
        name, at, version = value.partition("@")
        if not (re.match(NAME_RE, name) and at and re.match(VERSION_RE, version)):
            raise RecallError(f"--label-policy {value!r}: expected NAME@VERSION (e.g. expert_idm_smoothed@2)")
    if kind in ("code_digest", "snapshot"):
        value = value.lower().removeprefix("sha256:")
        if not _HEX.match(value):
            raise RecallError(f"--{kind.replace('_', '-')} {value!r}: expected at least 8 hex digits of the digest")
    span = None
    if window:
        first, sep, last = str(window).partition("..")
        if not (sep and _DAY.match(first) and _DAY.match(last)):
            raise RecallError(f"--window {window!r}: expected FIRST..LAST days, e.g. 2026-11-01..2026-11-08")
        try:
            if date.fromisoformat(first) > date.fromisoformat(last):
                raise RecallError(f"--window {window!r}: the first day is after the last")
        except ValueError as exc:
            raise RecallError(f"--window {window!r}: {exc}") from None
        span = (first, last)
    return Query(kind, value, span)


# -- what a version was made from, and whether a query touches it --------------------------------------

def lineage_of(tags: dict[str, str], verifier) -> dict[str, Any]:
    """What a model version was made from: its sealed release record's word where it has one (tags are
    anybody's to edit in MLflow), its lineage tags for what the record does not state."""
    record: dict = {}
    raw = tags.get(vocab.RELEASE_RECORD)
    if raw and verifier is not None:
        try:
            record = verifier.unseal(json.loads(raw), None, what="release record")
        except (EvidenceError, ValueError):
            record = {}
    window = record.get("window") or (tags.get(vocab.DATASET_WINDOW) or "").split("..")
    excluded = record.get("excluded")
    if excluded is None:
        try:
            excluded = json.loads(tags.get(vocab.DATASET_EXCLUDED) or "[]")
        except ValueError:
            excluded = []
    sources = record.get("sources")
    if sources is None:
        sources = [s for s in (tags.get(vocab.DATASET_SOURCES) or "").split(",") if s]
    return {"sources": list(sources), "window": [w for w in window if w][:2], "excluded": excluded or [],
            "label_policy": record.get("label_policy") or tags.get(vocab.LABEL_POLICY),
            "code_digest": record.get("code_digest") or tags.get(vocab.CODE_DIGEST),
            "snapshots": [d for d in (record.get("dataset_digest") or tags.get(vocab.DATASET_VERSION),
                                      record.get("raw_dataset_digest") or tags.get(vocab.RAW_DATASET_VERSION)) if d],
            "sealed": bool(record)}


def how_affected(query: Query, lineage: dict[str, Any]) -> str | None:
    """Why ``lineage`` is touched by ``query`` (one line), or None when it is not."""
    if query.kind == "source":
        if query.value not in lineage["sources"]:
            return None
        if not query.window:
            return f"trained on source {query.value}"
        if len(lineage["window"]) != 2:
            return f"trained on source {query.value} (its data window is not recorded)"
        start, end = lineage["window"]  # [start, end): the window's last day is end - 1
        first, last = query.window
        if not (start <= last and first < end):
            return None
        for ex in lineage["excluded"]:
            if ex.get("source") == query.value and (ex.get("window") is None or
                                                     (ex["window"][0] <= first and last <= ex["window"][1])):
                return None  # that retrain already took the recalled days out of its data
        return (f"trained on source {query.value} {start}..{end} (exclusive), which overlaps the recalled days "
                f"{first}..{last}")
    if query.kind == "label_policy":
        return f"labelled with {query.value}" if lineage["label_policy"] == query.value else None
    if query.kind == "code_digest":
        code = str(lineage["code_digest"] or "").removeprefix("sha256:")
        return f"trained by code {code[:12]}" if code and code.startswith(query.value) else None
    for digest in lineage["snapshots"]:
        if str(digest).startswith(query.value):
            return f"made from snapshot {str(digest)[:12]}"
    return None


def months(first: str, last: str) -> list[str]:
    """The months (``YYYY-MM``) from day ``first`` to day ``last``, both included."""
    y, m = int(first[:4]), int(first[5:7])
    out = []
    while f"{y:04d}-{m:02d}" <= last[:7]:
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def months_tag(window_start: str, window_end: str) -> str:
    """``,YYYY-MM,…,``: the months a data window [start, end) touches (what a windowed recall searches for)."""
    last = (date.fromisoformat(window_end) - timedelta(days=1)).isoformat()
    return "," + ",".join(months(window_start, max(window_start, last))) + ","


def _candidates_filter(query: Query) -> list[str]:
    """MLflow filters (indexed tag lookups) that find every version the query may touch; a windowed source
    recall searches month by month (MLflow's filters have no OR), so it loads only the versions whose
    data window touches a recalled month."""
    from closedloop.runtime.tracking import literal

    if query.kind == "source":
        source = f"tags.`{vocab.DATASET_SOURCES}` LIKE {literal('%,' + query.value + ',%')}"
        if query.window is None:
            return [source]
        return [f"{source} and tags.`{vocab.DATASET_MONTHS}` LIKE {literal('%,' + m + ',%')}"
                for m in months(*query.window)]
    if query.kind == "label_policy":
        return [f"tags.`{vocab.LABEL_POLICY}` = {literal(query.value)}"]
    if query.kind == "code_digest":
        return [f"tags.`{vocab.CODE_DIGEST}` LIKE {literal(query.value + '%')}",
                f"tags.`{vocab.CODE_DIGEST}` LIKE {literal('sha256:' + query.value + '%')}"]
    return [f"tags.`{vocab.DATASET_VERSION}` LIKE {literal(query.value + '%')}",
            f"tags.`{vocab.RAW_DATASET_VERSION}` LIKE {literal(query.value + '%')}"]


def affected(client, query: Query, verifier, *, also: list[dict] | tuple = ()) -> list[dict[str, Any]]:
    """Every model version ``query`` touches, across pipelines: ``{model, version, pipeline, dag_id,
    run_id, training_run_id, snapshots, how, aliases, live}``, by model then version.

    ``also``: versions (``{model, version}``) to judge even if their lineage tags no longer match the
    search — those a recall listed when it opened (tags are anybody's to edit in MLflow)."""
    found: dict[tuple[str, str], Any] = {}
    for flt in _candidates_filter(query):
        for mv in pages(lambda token, flt=flt: client.search_model_versions(flt, max_results=10_000,
                                                                               page_token=token)):
            found[(mv.name, str(mv.version))] = mv
    for row in also:
        key = (str(row["model"]), str(row["version"]))
        if key not in found:
            try:
                found[key] = client.get_model_version(*key)
            except Exception as exc:  # deleted from the registry since
                from closedloop.runtime.tracking import not_found

                if not not_found(exc):
                    raise
    aliases_of: dict[str, dict[str, list[str]]] = {}
    rows = []
    listed = {(str(r["model"]), str(r["version"])) for r in also}
    for (name, version), mv in sorted(found.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        tags = dict(mv.tags)
        if (name, version) not in listed and how_affected(query, lineage_of(tags, None)) is None:
            continue  # cheap first: the lineage tags say no (an edited tag still holds: promotion reads the record)
        lineage = lineage_of(tags, verifier)
        how = how_affected(query, lineage)  # the sealed record decides
        if how is None:
            continue
        if name not in aliases_of:  # search results carry no aliases: one read per model
            aliases_of[name] = {}
            for alias, v in (client.get_registered_model(name).aliases or {}).items():
                aliases_of[name].setdefault(str(v), []).append(alias)
        aliases = sorted(aliases_of[name].get(version, []))
        rows.append({"model": name, "version": version, "pipeline": mv.tags.get(vocab.PIPELINE),
                     "dag_id": mv.tags.get(vocab.AIRFLOW_DAG_ID), "run_id": mv.tags.get(vocab.AIRFLOW_RUN_ID),
                     "training_run_id": mv.tags.get(vocab.TRAINING_RUN_ID) or mv.run_id,
                     "snapshots": lineage["snapshots"], "how": how, "aliases": aliases,
                     "live": sorted(set(aliases) & {vocab.PRODUCTION, vocab.CANDIDATE})})
    return rows


# -- the recalls themselves -------------------------------------------------------------------------

def _experiment(client) -> str:
    exp = client.get_experiment_by_name(vocab.RECALL_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(vocab.RECALL_EXPERIMENT)
    except Exception as exc:  # made by another process meanwhile
        if "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
        return client.get_experiment_by_name(vocab.RECALL_EXPERIMENT).experiment_id


def _runs(client, recall_id: str | None = None) -> list:
    """The recalls' MLflow runs, deleted ones too (deleting a recall's run in MLflow releases nothing)."""
    from mlflow.entities import ViewType

    from closedloop.runtime.tracking import literal

    exp = client.get_experiment_by_name(vocab.RECALL_EXPERIMENT)
    if exp is None:
        return []
    flt = f"tags.`{vocab.RECALL_ID}` = {literal(recall_id)}" if recall_id else ""
    return pages(lambda token: client.search_runs([exp.experiment_id], filter_string=flt,
                                                   run_view_type=ViewType.ALL, max_results=1000,
                                                   order_by=["attributes.start_time ASC"], page_token=token))


def _writable(client, run_id: str) -> None:
    """A recall's run deleted in MLflow is restored before the recall writes to it (deleting one hides nothing)."""
    run = client.get_run(run_id)
    if run.info.lifecycle_stage == "deleted":
        log.warning("recall run %s was deleted in MLflow: restored", run_id)
        client.restore_run(run_id)


def _believed(run, verifier) -> dict | None:
    """A recall run's sealed opening and close records, or None (with a warning) when they do not verify."""
    raw = run.data.params.get(vocab.RECALL_PARAM)
    try:
        opening = verifier.unseal(json.loads(raw or "null"), None, what=f"recall run {run.info.run_id}")
        if not RECALL_ID_RE.match(str(opening.get("id"))) or \
                Query.of(opening["query"]).id != opening["id"]:
            raise EvidenceError("its id does not match its query")
    except (EvidenceError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring recall run %s: %s", run.info.run_id, exc)
        return None
    closed = None
    if run.data.tags.get(vocab.RECALL_CLOSED):
        try:
            closed = verifier.unseal(json.loads(run.data.tags[vocab.RECALL_CLOSED]),
                                     Binding(BINDING_DAG, opening["id"], "close"), what="the recall's close record")
        except (EvidenceError, ValueError) as exc:
            log.warning("recall %s: its close record is not believed: %s", opening["id"], exc)
    return {**opening, "closed": closed, "state": "closed" if closed else "open", "mlflow_run_id": run.info.run_id}


def recalls(client, verifier, *, state: str | None = None) -> list[dict[str, Any]]:
    """Every recall the deployment sealed (oldest first), with its state; ``state`` filters."""
    out, seen = [], set()
    for run in _runs(client):
        r = _believed(run, verifier)
        if r is None or r["id"] in seen:
            continue
        seen.add(r["id"])
        if state is None or r["state"] == state:
            out.append(r)
    return out


def get(client, recall_id: str, verifier) -> dict[str, Any]:
    """One recall by id; :class:`RecallError` when there is none."""
    if not RECALL_ID_RE.match(recall_id or ""):
        raise RecallError(f"{recall_id!r} is no recall id (R- and 10 hex digits; closedloop recall list)")
    for run in _runs(client, recall_id):
        r = _believed(run, verifier)
        if r is not None and r["id"] == recall_id:
            return r
    raise RecallError(f"no recall {recall_id} (closedloop recall list)")


def holds(client, model: str, version: str, verifier, *, tags: dict | None = None,
          open_only: bool = False) -> list[dict[str, Any]]:
    """The recalls that hold ``model`` version ``version``: those whose query touches the lineage its
    sealed release record states, and those whose sealed hold is on it. ``[{id, query, how, reason}]``."""
    if tags is None:
        tags = dict(client.get_model_version(model, version).tags)
    lineage = lineage_of(tags, verifier)
    found = {}
    for r in recalls(client, verifier, state="open" if open_only else None):
        how = how_affected(Query.of(r["query"]), lineage)
        if how is not None:
            found[r["id"]] = {"id": r["id"], "query": Query.of(r["query"]).describe(), "how": how,
                              "reason": r.get("reason"), "state": r["state"]}
    for key, raw in tags.items():
        rid = key.removeprefix(vocab.HOLD_PREFIX)
        if key.startswith(vocab.HOLD_PREFIX) and rid not in found:
            try:
                hold = verifier.unseal(json.loads(raw), Binding(BINDING_DAG, rid, "hold", f"{model}/{version}"),
                                       what="hold")
            except (EvidenceError, ValueError):
                continue
            found[rid] = {"id": rid, "query": hold.get("query"), "how": hold.get("how"), "reason": hold.get("reason"),
                          "state": "open"}
    return sorted(found.values(), key=lambda h: h["id"])


def refuse_if_held(client, model: str, version: str, verifier, *, what: str) -> None:
    """:class:`ApprovalError` naming the recall(s) when ``model`` version ``version`` is held."""
    held = holds(client, model, version, verifier)
    if held:
        h = held[0]
        raise ApprovalError(f"refusing to {what} {model} version {version}: it is held by recall {h['id']} "
                            f"({h['query']}: {h['how']}; {h['reason'] or 'no reason given'})"
                            + (f" and {len(held) - 1} more" if len(held) > 1 else "")
                            + " — a held version never becomes candidate or production (closedloop recall show "
                            f"{h['id']})")


def exclusions(client, verifier, sources: list[str], *, may_exclude: list[str] | None = None) -> list[dict]:
    """What every recall of one of ``sources`` takes out of new data: ``[{source, window, recall}]``
    (``window`` None: the whole source). Sources outside ``may_exclude`` are not taken out (the template
    says a recall may not); a recall of them holds what the data makes instead."""
    out = []
    allowed = set(sources if may_exclude is None else may_exclude)
    for r in recalls(client, verifier):
        q = Query.of(r["query"])
        if q.kind == "source" and q.value in sources and q.value in allowed:
            out.append({"source": q.value, "window": list(q.window) if q.window else None, "recall": r["id"]})
    return sorted(out, key=lambda e: (e["source"], e["window"] or [], e["recall"]))


def refused_inputs(client, verifier, *, label_policy: str) -> list[dict]:
    """The recalls of ``label_policy`` (a run that would label with it is stopped before any compute)."""
    return [r for r in recalls(client, verifier) if r["query"]["kind"] == "label_policy"
            and r["query"]["value"] == label_policy]


# -- opening, holding, proposing, closing ------------------------------------------------------------

def _hold_binding(recall_id: str, model: str, version: str) -> Binding:
    return Binding(BINDING_DAG, recall_id, "hold", f"{model}/{version}")


def open_recall(client, query: Query, *, reason: str, by: str, signer: Signer, verifier,
                rows: list[dict] | None = None, request: str = "") -> dict[str, Any]:
    """Record the recall (once: the same query is the same recall) and hold every affected version.

    Idempotent: opening it again (or a retry after a crash) finds the recall and writes the same holds."""
    if not (reason or "").strip():
        raise RecallError("a recall needs a reason (--reason)")
    rows = affected(client, query, verifier) if rows is None else rows
    existing = None
    try:
        existing = get(client, query.id, verifier)
    except RecallError:
        pass
    if existing is None:
        opening = {"kind": "recall", "id": query.id, "query": query.as_dict(), "reason": reason.strip(),
                   "opened_by": by, "opened_at": datetime.now(UTC).isoformat(), "request": request}
        sealed = signer.seal(opening, Binding(BINDING_DAG, query.id, "open"))
        run = client.create_run(_experiment(client), run_name=query.id,
                                tags={vocab.RECALL_ID: query.id, vocab.RECALL_STATE: "open",
                                      vocab.RECALL_KIND: query.kind})
        client.log_param(run.info.run_id, vocab.RECALL_PARAM, json.dumps(sealed, sort_keys=True))
        existing = {**opening, "closed": None, "state": "open", "mlflow_run_id": run.info.run_id}
        first = True
    else:
        first = False
    rid, at = existing["id"], existing["opened_at"]
    _writable(client, existing["mlflow_run_id"])
    for row in rows:  # the same tag and audit entry every time: a retry adds nothing
        hold = {"kind": "hold", "recall": rid, "model": row["model"], "version": row["version"],
                "query": query.describe(), "how": row["how"], "reason": existing["reason"], "at": at}
        client.set_model_version_tag(row["model"], row["version"], vocab.HOLD_PREFIX + rid,
                                     json.dumps(signer.seal(hold, _hold_binding(rid, row["model"], row["version"])),
                                                sort_keys=True))
    client.log_dict(existing["mlflow_run_id"], {"recall": rid, "affected": rows}, "affected.json")
    client.set_tag(existing["mlflow_run_id"], vocab.RECALL_AFFECTED, str(len(rows)))
    return {**existing, "affected": rows, "new": first}


def once_promoted(client, model: str, verifier) -> dict[str, dict]:
    """Version → its newest sealed promotion that put it in production (kind ``promotion``: approved)."""
    from closedloop.steps.trail import sealed_promotions

    return {version: rec for version, rec in sealed_promotions(client, model, verifier)
            if rec.get("kind") == "promotion" and str(rec.get("version")) == version}


def proposal(client, model: str, verifier, *, held: set[str] | None = None) -> dict[str, Any]:
    """Where ``production`` of ``model`` should go when it is held: the newest version that was approved
    and promoted once and that no recall holds. ``{model, production, held, target, why}``."""
    from closedloop.runtime.tracking import alias_version

    prod = alias_version(client, model, vocab.PRODUCTION)
    out: dict[str, Any] = {"model": model, "production": prod, "held": False, "target": None, "why": ""}
    if prod is None:
        out["why"] = "no production version"
        return out
    prod_holds = holds(client, model, prod, verifier)
    out["held"] = bool(prod_holds) or prod in (held or set())
    if not out["held"]:
        out["why"] = "production is not affected"
        return out
    for version in sorted(once_promoted(client, model, verifier), key=int, reverse=True):
        if version != prod and version not in (held or set()) and not holds(client, model, version, verifier):
            out["target"] = version
            out["why"] = (f"roll production back to version {version}, the newest approved version no recall holds: "
                          f"closedloop rollback {model} --to {version} --reason … (an approver's governed rollback)")
            return out
    out["why"] = ("no approved version that no recall holds: production stays on the held version until a retrain "
                  "without the recalled input is approved and promoted")
    return out


def pending(client, recall: dict, verifier) -> list[str]:
    """Why ``recall`` is not done yet: per affected model, production still held by it (or none yet)."""
    rows = recall.get("affected")
    if rows is None:
        rows = affected(client, Query.of(recall["query"]), verifier)
    q = Query.of(recall["query"])
    waiting = []
    from closedloop.runtime.tracking import alias_version

    for model in sorted({r["model"] for r in rows}):
        prod = alias_version(client, model, vocab.PRODUCTION)
        if prod is None:
            waiting.append(f"{model}: no version in production yet")
            continue
        lineage = lineage_of(dict(client.get_model_version(model, prod).tags), verifier)
        if how_affected(q, lineage) is not None:
            waiting.append(f"{model}: production (version {prod}) is still affected")
    return waiting


def stored_affected(client, recall: dict) -> list[dict]:
    """The versions the recall listed when it opened (its ``affected.json``); [] when unreadable."""
    import os
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(recall["mlflow_run_id"], "affected.json", tmp)
            with open(os.path.join(path) if os.path.isfile(path) else os.path.join(path, "affected.json")) as fh:
                return list(json.load(fh).get("affected") or [])
    except Exception as exc:  # noqa: BLE001 - the search finds the rest
        log.warning("recall %s: its affected.json is unreadable (%s); listing from the registry only",
                    recall.get("id"), exc)
        return []


def close_recall(client, recall_id: str, *, by: str, reason: str, signer: Signer, verifier,
                 automatic: bool = False) -> dict[str, Any]:
    """Close a recall: when every affected pipeline has an unaffected version in production — or, with a
    ``reason``, whatever is left (said in the record). Idempotent: a closed recall stays as it was closed."""
    r = get(client, recall_id, verifier)
    if r["closed"]:
        return {**r, "already_closed": True}
    _writable(client, r["mlflow_run_id"])
    r["affected"] = affected(client, Query.of(r["query"]), verifier, also=stored_affected(client, r))
    waiting = pending(client, r, verifier)
    if waiting and not (reason or "").strip():
        raise ApprovalError(f"recall {recall_id} is not done: " + "; ".join(waiting)
                            + " — close it anyway with --reason saying why")
    opened = datetime.fromisoformat(r["opened_at"])
    now = datetime.now(UTC)
    close = {"kind": "recall_close", "id": recall_id, "closed_by": by, "closed_at": now.isoformat(),
             "reason": (reason or "").strip() or "every affected pipeline has an unaffected version in production",
             "left": waiting, "automatic": automatic, "open_seconds": round((now - opened).total_seconds(), 1)}
    client.set_tag(r["mlflow_run_id"], vocab.RECALL_CLOSED,
                   json.dumps(signer.seal(close, Binding(BINDING_DAG, recall_id, "close")), sort_keys=True))
    client.set_tag(r["mlflow_run_id"], vocab.RECALL_STATE, "closed")
    return {**r, "closed": close, "state": "closed"}


def sweep(client, *, signer: Signer, verifier) -> list[str]:
    """Close every open recall that is done (run on each production move); the ids closed."""
    closed = []
    for r in recalls(client, verifier, state="open"):
        try:
            close_recall(client, r["id"], by="closedloop (production moved)", reason="", signer=signer,
                         verifier=verifier, automatic=True)
        except ApprovalError as exc:
            log.info("recall %s stays open: %s", r["id"], exc)
            continue
        closed.append(r["id"])
    return closed


def summary(client, recall: dict, verifier) -> dict[str, Any]:
    """A recall as ``closedloop recall show`` and the health page print it."""
    q = Query.of(recall["query"])
    rows = affected(client, q, verifier, also=stored_affected(client, recall))
    models = sorted({r["model"] for r in rows})
    closed = recall.get("closed") or {}
    opened = datetime.fromisoformat(recall["opened_at"])
    end = datetime.fromisoformat(closed["closed_at"]) if closed else datetime.now(UTC)
    return {"id": recall["id"], "query": q.describe(), "kind": q.kind, "reason": recall.get("reason"),
            "state": recall["state"], "opened_by": recall.get("opened_by"), "opened_at": recall["opened_at"],
            "closed_by": closed.get("closed_by"), "closed_at": closed.get("closed_at"),
            "close_reason": closed.get("reason"), "left_when_closed": closed.get("left") or [],
            "hours_open": round((end - opened).total_seconds() / 3600, 2),
            "affected": rows, "totals": {"model_versions": len(rows), "models": len(models),
                                         "pipelines": len({r["pipeline"] for r in rows}),
                                         "snapshots": len({s for r in rows for s in r["snapshots"]}),
                                         "training_runs": len({r["training_run_id"] for r in rows})},
            "proposals": [proposal(client, m, verifier) for m in models] if recall["state"] == "open" else [],
            "waiting": pending(client, {**recall, "affected": rows}, verifier) if recall["state"] == "open" else []}

"""Recalls on a real MLflow store (SQLite in a temp dir) with real sealed records: three pipelines share a
source; a recall holds exactly what it touched, every promotion path refuses a held version, the rollback it
proposes, and it closes when production is clean. Sources, label policies and code digests alike."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest
from mlflow import MlflowClient

from closedloop import vocab
from closedloop.errors import ApprovalError
from closedloop.runtime.context import RunContext
from closedloop.runtime.signing import Binding, Signer, digest
from closedloop.steps import governance as gov
from closedloop.steps import recall

POLICY = gov.ApprovalPolicy(approvers=["bob", "carol"], required=1, valid_hours=24)
EU_NOV = dict(source="fleet-eu", window="2026-11-01..2026-11-08")


class Store:
    """A registry with versions made the way register_candidate makes them: lineage tags and a sealed record."""

    def __init__(self, tmp_path):
        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        self.c = MlflowClient(self.uri)
        self.exp = self.c.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
        self.tmp, self.key, self.n = tmp_path, Signer.generate(), 0
        self.ring = self.key.verifier

    def ctx(self, pipeline="p") -> RunContext:
        return RunContext(pipeline=pipeline, template_digest="", dag_id=pipeline, run_id="r",
                          tracking_uri=self.uri)

    def version(self, model: str, pipeline: str, *, sources=("fleet-eu",), window=("2026-10-25", "2026-11-08"),
                label_policy="expert@2", code="c0de" * 16, excluded=()) -> dict:
        from closedloop.steps.registry import artifact_digest

        self.n += 1
        if not self.c.search_registered_models(f"name = '{model}'"):
            self.c.create_registered_model(model)
        run = self.c.create_run(self.exp)
        d = self.tmp / f"model{self.n}"
        d.mkdir()
        (d / "weights.txt").write_text(f"weights {self.n}")
        self.c.log_artifacts(run.info.run_id, str(d), "model")
        raw, labelled = f"{self.n:064x}", f"{self.n + 1000:064x}"
        tags = {vocab.PIPELINE: pipeline, vocab.AIRFLOW_DAG_ID: pipeline, vocab.AIRFLOW_RUN_ID: f"run{self.n}",
                vocab.DATASET_SOURCES: "," + ",".join(sources) + ",", vocab.DATASET_WINDOW: "..".join(window),
                vocab.DATASET_MONTHS: recall.months_tag(*window),
                vocab.LABEL_POLICY: label_policy, vocab.CODE_DIGEST: code, vocab.DATASET_VERSION: labelled,
                vocab.RAW_DATASET_VERSION: raw, vocab.TRAINING_RUN_ID: run.info.run_id}
        if excluded:
            tags[vocab.DATASET_EXCLUDED] = json.dumps(list(excluded))
        mv = self.c.create_model_version(model, f"runs:/{run.info.run_id}/model", run.info.run_id, tags=tags)
        uri = f"models:/{model}/{mv.version}"
        record = {"kind": "release_record", "model": model, "version": str(mv.version), "gates_passed": True,
                  "dag_id": pipeline, "run_id": f"run{self.n}", "requester_user": "alice", "source": mv.source,
                  "model_uri": uri, "artifact_digest": artifact_digest(uri, self.uri), "label_policy": label_policy,
                  "dataset_digest": labelled, "raw_dataset_digest": raw, "sources": list(sources),
                  "window": list(window), "excluded": list(excluded), "code_digest": code}
        sealed = self.key.seal(record, Binding(pipeline, f"run{self.n}", "register_candidate"))
        self.c.set_model_version_tag(model, mv.version, vocab.RELEASE_RECORD, json.dumps(sealed, sort_keys=True))
        return record

    def promote(self, record: dict) -> dict:
        now = datetime.now(UTC)
        prod = gov.current_production(self.ctx(), record["model"])
        st = {"kind": "approval", "model": record["model"], "version": record["version"],
              "record_digest": digest(record), "decision": "approved", "chosen_options": ["Approve"],
              "responder": "bob", "responded_at": (now - timedelta(minutes=5)).isoformat(),
              "production_at_review": prod}
        return gov.promote(self.ctx(), record, [st], model=record["model"], policy=POLICY, signer=self.key,
                           actor="promote", now=now)

    def production(self, model: str) -> str | None:
        return gov.current_production(self.ctx(), model)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path)


def test_a_source_recall_holds_what_it_touched_across_pipelines_and_only_that(store):
    acc1 = store.version("m_acc", "acc", sources=("fleet-eu", "fleet-us"), window=("2026-10-01", "2026-10-15"))
    store.promote(acc1)
    acc2 = store.version("m_acc", "acc", sources=("fleet-eu", "fleet-us"))  # 10-25..11-08: overlaps
    store.promote(acc2)
    lane1 = store.version("m_lane", "lane", window=("2026-11-01", "2026-11-15"))
    store.promote(lane1)
    park1 = store.version("m_park", "park", sources=("fleet-us",), window=("2026-11-01", "2026-11-15"))
    store.promote(park1)
    edge = store.version("m_lane", "lane", window=("2026-10-10", "2026-11-01"))  # ends the day the window starts

    q = recall.query_of(**EU_NOV)
    rows = recall.affected(store.c, q, store.ring)
    assert [(r["model"], r["version"]) for r in rows] == [("m_acc", "2"), ("m_lane", "1")]
    assert rows[0]["live"] == ["production"] and "overlaps the recalled days 2026-11-01..2026-11-08" in rows[0]["how"]
    assert edge["version"] == "2"  # its window [10-10, 11-01) holds no recalled day

    out = recall.open_recall(store.c, q, reason="logs mis-synchronised", by="carol", signer=store.key,
                             verifier=store.ring)
    assert out["new"] and out["id"] == q.id and len(out["affected"]) == 2
    again = recall.open_recall(store.c, recall.query_of(**EU_NOV), reason="again", by="bob", signer=store.key,
                               verifier=store.ring)
    assert not again["new"] and again["id"] == out["id"] and again["opened_by"] == "carol"
    assert len(recall.recalls(store.c, store.ring)) == 1  # opened twice: one recall
    tags = store.c.get_model_version("m_acc", "2").tags
    assert json.loads(tags[vocab.HOLD_PREFIX + q.id])["recall"] == q.id
    assert vocab.HOLD_PREFIX + q.id not in store.c.get_model_version("m_acc", "1").tags
    assert not recall.holds(store.c, "m_park", "1", store.ring)
    from closedloop.records.audit import audit_trail

    (event,) = [e for e in audit_trail(store.ctx(), "m_acc", "2")["events"] if e["event"] == "recall.hold"]
    assert event["recall"] == q.id and "overlaps" in event["how"]

    # the alias watcher's check names the held production version
    problems = gov.check_aliases(store.c, "m_acc", store.ring)["problems"]
    assert any(f"m_acc@production → version 2, which recall {q.id} holds" in p for p in problems), problems
    # a new version trained on the recalled days is never promoted
    acc3 = store.version("m_acc", "acc", window=("2026-11-02", "2026-11-16"))
    with pytest.raises(ApprovalError, match=f"refusing to promote m_acc version 3: it is held by recall {q.id}"):
        store.promote(acc3)
    # the proposal: back to the newest approved unaffected version, or say there is none
    p_acc = recall.proposal(store.c, "m_acc", store.ring)
    assert (p_acc["held"], p_acc["target"]) == (True, "1") and "closedloop rollback m_acc --to 1" in p_acc["why"]
    p_lane = recall.proposal(store.c, "m_lane", store.ring)
    assert p_lane["held"] and p_lane["target"] is None and "no approved version" in p_lane["why"]
    assert recall.proposal(store.c, "m_park", store.ring)["held"] is False

    # an approver's governed rollback to the proposal; back to the held version is refused
    out = gov.rollback(store.ctx(), "m_acc", actor="bob", reason=f"recall {q.id}", allowed=["bob"],
                       signer=store.key, move=gov.move_of("m_acc", "2", "1", "closedloop_registry/r1"))
    assert out["production"] == "1" and store.production("m_acc") == "1"
    with pytest.raises(ApprovalError, match=f"refusing to roll back to m_acc version 2: it is held by recall {q.id}"):
        gov.rollback(store.ctx(), "m_acc", actor="bob", reason="undo", allowed=["bob"], signer=store.key,
                     move=gov.move_of("m_acc", "1", "2", "closedloop_registry/r2"))
    # restore puts back only the last governed version, and never a held one
    store.c.delete_registered_model_alias("m_lane", "production")
    with pytest.raises(ApprovalError, match="refusing to restore m_lane version 1: it is held"):
        gov.restore(store.ctx(), "m_lane", actor="bob", reason="x", allowed=["bob"], signer=store.key)

    # deleting the hold tag, or the lineage tags, in MLflow releases nothing: the sealed record says what it is
    store.c.delete_model_version_tag("m_acc", "2", vocab.HOLD_PREFIX + q.id)
    store.c.delete_model_version_tag("m_acc", "2", vocab.DATASET_SOURCES)
    assert [h["id"] for h in recall.holds(store.c, "m_acc", "2", store.ring)] == [q.id]
    # so does deleting the recall's MLflow run
    store.c.delete_run(out_run := recall.get(store.c, q.id, store.ring)["mlflow_run_id"])
    assert recall.get(store.c, q.id, store.ring)["mlflow_run_id"] == out_run
    # a recall nobody sealed (a forged run in the experiment) is no recall
    forged = store.c.create_run(store.c.get_experiment_by_name(vocab.RECALL_EXPERIMENT).experiment_id,
                                tags={vocab.RECALL_ID: "R-0000000000"})
    store.c.log_param(forged.info.run_id, vocab.RECALL_PARAM, json.dumps({"id": "R-0000000000"}))
    assert [r["id"] for r in recall.recalls(store.c, store.ring)] == [q.id]

    # closing: refused while a pipeline's production is still affected, unless the closer says why
    with pytest.raises(ApprovalError, match=r"m_lane: no version in production yet"):
        recall.close_recall(store.c, q.id, by="carol", reason="", signer=store.key, verifier=store.ring)
    assert recall.sweep(store.c, signer=store.key, verifier=store.ring) == []
    # the retrain took the recalled days out of its data: unaffected, promoted, and the sweep closes the recall
    lane3 = store.version("m_lane", "lane", window=("2026-11-01", "2026-11-15"),
                          excluded=[{"source": "fleet-eu", "window": ["2026-11-01", "2026-11-08"], "recall": q.id}])
    assert not recall.holds(store.c, "m_lane", "3", store.ring)
    store.promote(lane3)
    assert recall.sweep(store.c, signer=store.key, verifier=store.ring) == [q.id]
    closed = recall.get(store.c, q.id, store.ring)
    assert closed["state"] == "closed" and closed["closed"]["automatic"] and closed["closed"]["left"] == []
    s = recall.summary(store.c, closed, store.ring)
    assert s["state"] == "closed" and s["hours_open"] >= 0 and s["totals"]["model_versions"] == 3  # with acc v3
    # closed, the input stays bad: its versions stay held
    with pytest.raises(ApprovalError, match="held by recall"):
        store.promote(acc3)


def test_a_windowed_recall_searches_the_months_it_covers():
    assert recall.months("2026-11-20", "2027-01-03") == ["2026-11", "2026-12", "2027-01"]
    assert recall.months_tag("2026-10-25", "2026-11-01") == ",2026-10,"  # the end day is not in the window
    assert recall.months_tag("2026-10-25", "2026-11-08") == ",2026-10,2026-11,"


def test_label_policy_and_code_recalls_hold_their_versions(store):
    a = store.version("m_a", "pa", label_policy="expert@2", code="aa" * 32)
    b = store.version("m_b", "pb", label_policy="expert@3", code="bb" * 32)
    store.promote(a)
    store.promote(b)
    lp = recall.open_recall(store.c, recall.query_of(label_policy="expert@2"), reason="sign error",
                            by="bob", signer=store.key, verifier=store.ring)
    assert [(r["model"], r["how"]) for r in lp["affected"]] == [("m_a", "labelled with expert@2")]
    code = recall.open_recall(store.c, recall.query_of(code_digest="BBbbbbbb"), reason="bug in the loss",
                              by="bob", signer=store.key, verifier=store.ring)
    assert [(r["model"], r["version"]) for r in code["affected"]] == [("m_b", "1")]
    assert code["id"] != lp["id"]
    assert gov.check_aliases(store.c, "m_b", store.ring)["problems"]
    # a close with a reason records what was left
    out = recall.close_recall(store.c, lp["id"], by="bob", reason="m_a is retired", signer=store.key,
                              verifier=store.ring)
    assert out["closed"]["left"] == ["m_a: production (version 1) is still affected"]


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({}, "exactly one of"),
    ({"source": "fleet-eu", "label_policy": "x@1"}, "exactly one of"),
    ({"source": "fleet eu"}, "--source 'fleet eu'"),
    ({"label_policy": "expert"}, "expected NAME@VERSION"),
    ({"code_digest": "xyz"}, "at least 8 hex digits"),
    ({"source": "fleet-eu", "window": "2026-11-08..2026-11-01"}, "first day is after the last"),
    ({"source": "fleet-eu", "window": "last week"}, "expected FIRST..LAST"),
    ({"label_policy": "expert@2", "window": "2026-11-01..2026-11-02"}, "narrows a --source recall only"),
])
def test_a_malformed_recall_names_what_is_wrong(kwargs, fragment):
    with pytest.raises(recall.RecallError, match=None) as info:
        recall.query_of(**kwargs)
    assert fragment in str(info.value)


def test_the_dataset_step_takes_the_recalled_days_out_and_says_so(tmp_path, project):
    from closedloop.runtime.storage import read_snapshot
    from closedloop.spec import load_spec
    from closedloop.steps.dataset import generate_dataset

    loaded = load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml")
    ctx = RunContext(pipeline=loaded.spec.name, template_digest=loaded.digest, dag_id="d", run_id="r1",
                     data_root=str(tmp_path / "data"), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    full = generate_dataset(loaded, ctx, interval_end=date(2026, 11, 10))
    rec = {"source": "fleet-eu", "window": ["2026-11-01", "2026-11-08"], "recall": "R-0123456789"}
    clean = generate_dataset(loaded, ctx.for_key("d/r2"), interval_end=date(2026, 11, 10), exclude=[rec])
    assert clean["digest"] != full["digest"] and clean["excluded"][0]["rows"] > 0
    frame = read_snapshot(clean["uri"], clean["digest"])
    days = frame[frame["source"] == "fleet-eu"]["log_date"].dt.date.astype(str)
    assert not days.between("2026-11-01", "2026-11-08").any() and (days < "2026-11-01").any()
    assert len(frame) == full["rows"] - clean["excluded"][0]["rows"]
    # a recall outside the window changes nothing (same snapshot, from the cache)
    other = generate_dataset(loaded, ctx.for_key("d/r3"), interval_end=date(2026, 11, 10),
                             exclude=[{**rec, "window": ["2025-01-01", "2025-01-02"]}])
    assert other["digest"] == full["digest"] and other["excluded"] == []
    # a whole source out: the generator never reads it
    us_only = generate_dataset(loaded, ctx.for_key("d/r4"), interval_end=date(2026, 11, 10),
                               exclude=[{**rec, "window": None}])
    assert us_only["sources"] == ["fleet-us"]

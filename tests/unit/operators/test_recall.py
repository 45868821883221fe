"""The recall DAG's checks: who may open a recall, and the retrain each affected pipeline is asked for."""

from __future__ import annotations

import pytest

from closedloop import vocab
from closedloop.errors import ApprovalError
from closedloop.steps import recall

EU_NOV = dict(source="fleet-eu", window="2026-11-01..2026-11-08")


def test_who_may_open_a_recall(project):
    from closedloop.operators.recall import check_opener
    from closedloop.spec import load_spec

    loaded = load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml")
    q = recall.query_of(**EU_NOV)
    approver = loaded.spec.approval.approvers[0]
    check_opener([loaded], approver, {"acc_longitudinal"}, q)
    with pytest.raises(ApprovalError, match="'mallory' may not open a recall touching acc_longitudinal"):
        check_opener([loaded], "mallory", {"acc_longitudinal"}, q)
    with pytest.raises(ApprovalError, match="no pipeline that reads it names them"):
        check_opener([loaded], "mallory", set(), q)


def test_each_affected_pipeline_gets_a_retrain_request_or_the_reason_it_cannot(project):
    """What the recall asks of each pipeline: a request naming the recall (the opener recorded as who asked), or
    why not yet — the template still names the recalled label policy, or forbids taking the source out."""
    import dataclasses

    from closedloop.operators.recall import retrain_request
    from closedloop.spec import load_spec
    from closedloop.spec.request import validate_request
    from closedloop.spec.schema import RecallSpec

    loaded = load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml")
    rec = {"id": "R-0123456789", "reason": "clock drift", "opened_by": "carol",
           "query": recall.query_of(**EU_NOV).as_dict()}
    conf, how = retrain_request(loaded, rec)
    assert how == "without source fleet-eu 2026-11-01..2026-11-08" and conf["ticket"] == "R-0123456789"
    assert conf[vocab.CONF_RECALL] == {"id": "R-0123456789", "opened_by": "carol"}
    validate_request({k: v for k, v in conf.items() if k != vocab.CONF_RECALL})  # what Airflow's form accepts
    policy = {**rec, "query": recall.query_of(label_policy=loaded.spec.label_policy.ref).as_dict()}
    conf, why = retrain_request(loaded, policy)
    assert conf is None and "still names the recalled label policy" in why and "recall retrain R-0123456789" in why
    fixed = {**rec, "query": recall.query_of(label_policy=loaded.spec.label_policy.name + "@1").as_dict()}
    conf, how = retrain_request(loaded, fixed)
    assert conf["change"] == ["label_policy"] and f"with label policy {loaded.spec.label_policy.ref}" in how
    narrow = dataclasses.replace(loaded, spec=loaded.spec.model_copy(update={"recall": RecallSpec(
        may_exclude=["fleet-us"])}))
    conf, why = retrain_request(narrow, rec)
    assert conf is None and "does not let a recall take fleet-eu out" in why
    off = dataclasses.replace(loaded, spec=loaded.spec.model_copy(update={"recall": RecallSpec(retrain=False)}))
    assert retrain_request(off, rec)[0] is None

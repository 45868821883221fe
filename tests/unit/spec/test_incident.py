"""Incident validation (every channel uses it) and the admission decision (debounce)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from closedloop.errors import PermanentError
from closedloop.spec import load_spec
from closedloop.spec.incident import IncidentError, parse_incident, payload_of
from closedloop.steps.incidents import admit, focus_of, incident_request, origin_tags

ROUTES = {"acc": ["hard_braking", "cut_in"]}
GOOD = {"model": "acc", "scenario_type": "hard_braking", "severity": "high"}
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def test_valid_incident_is_normalized_with_a_stable_content_id():
    a = parse_incident({**GOOD, "occurred_at": "2026-11-25T17:42:10Z"}, ROUTES)
    b = parse_incident({**GOOD, "occurred_at": "2026-11-25T17:42:10Z"}, ROUTES)
    assert a == b and a["id"].startswith("inc-") and a["kind"] == "other" and a["log_refs"] == []
    assert a["occurred_at"] == "2026-11-25T17:42:10+00:00"
    assert parse_incident({**GOOD, "id": "JIRA-7"}, ROUTES)["id"] == "JIRA-7"


@pytest.mark.parametrize("data, fragment", [
    ({**GOOD, "model": "other"}, "model: unknown model 'other'; models that take incidents: acc"),
    ({**GOOD, "scenario_type": "cruise"}, "scenario_type: 'cruise' is not a scenario type"),
    ({"model": "acc", "severity": "high"}, "scenario_type: required"),
    ({**GOOD, "severity": 3}, "severity: expected one of"),
    ({**GOOD, "kind": "crash"}, "kind: expected one of"),
    ({**GOOD, "occurred_at": "yesterday"}, "occurred_at: expected an ISO 8601 time"),
    ({**GOOD, "log_refs": "s3://x"}, "log_refs: expected a list"),
    ({**GOOD, "id": "has spaces"}, "id: expected 1-100 letters"),
    ({**GOOD, "colour": "red"}, "unknown field(s) ['colour']"),
    ([GOOD], "expected a JSON object"),
])
def test_malformed_incident_names_the_field(data, fragment):
    with pytest.raises(IncidentError) as info:
        parse_incident(data, ROUTES)
    assert fragment in str(info.value)


def test_payload_of_each_channel():
    assert payload_of({"from_trigger": True, "payload": GOOD}) == GOOD  # watcher
    assert payload_of({**GOOD, "from_rest_api": True}) == GOOD  # REST post
    assert payload_of({"from_trigger": True, "payload": '{"model": "acc"}'}) == {"model": "acc"}  # queue body
    assert payload_of(GOOD) == GOOD  # manual run conf


@pytest.fixture(scope="module")
def spec(project):
    return load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml").spec


def event(spec, at, **fields):
    return {"extra": {"model": spec.model.name, "severity": "high", "scenario_type": "hard_braking", **fields},
            "timestamp": at}


def test_admission_debounces_per_scenario_type_within_the_window(spec):
    first = admit(spec, [event(spec, T0, id="A")], {}, run_id="r1")
    assert first["admitted"] and first["focus_types"] == ["hard_braking"]
    last = first["state"]
    inside = admit(spec, [event(spec, T0 + timedelta(minutes=29), id="B")], last, run_id="r2")
    assert inside["admitted"] is False and inside["merged_into"] == {"B": "r1"} and inside["state"] == {}
    other_type = admit(spec, [event(spec, T0 + timedelta(minutes=5), id="C", scenario_type="cut_in")], last, run_id="r3")
    assert other_type["admitted"] and other_type["focus_types"] == ["cut_in"]
    after = admit(spec, [event(spec, T0 + timedelta(minutes=31), id="D")], last, run_id="r4")
    assert after["admitted"]
    retry = admit(spec, [event(spec, T0 + timedelta(minutes=1), id="A")], last, run_id="r1")
    assert retry["admitted"]  # the same run admitting again (a retry) is not a repeat


def nested(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def test_coalesced_events_of_one_run(spec):
    d = admit(spec, [event(spec, T0, id="LOW", severity="low", scenario_type="cut_in"),
                     event(spec, T0 + timedelta(seconds=1), id="HIGH"),
                     event(spec, T0 + timedelta(seconds=2), id="DUP"),
                     {"extra": {"severity": "bad"}, "timestamp": T0},
                     {"extra": {**event(spec, T0)["extra"], "occurred_at": nested(5_000), "id": "DEEP"},
                      "timestamp": T0},
                     {"extra": {"from_rest_api": True, "model": "sk-" + "x" * 40, "severity": nested(10)},
                      "timestamp": T0}], {}, run_id="r1")
    # events the scheduler put in one run are all answered by it, most severe first; malformed or
    # hostile ones (a shape that breaks Python's recursion, a pasted secret) never drop the others
    assert [i["id"] for i in d["incidents"]] == ["HIGH", "DUP", "LOW"]
    assert d["merged_into"] == {} and len(d["rejected"]) == 3
    assert "unreadable (RecursionError)" in d["rejected"][1] and "x" * 40 not in d["rejected"][2]
    assert d["focus_types"] == ["cut_in", "hard_braking"]
    assert focus_of(spec, d["focus_types"]) == {"hard_braking": 2.0, "cut_in": 20.0}
    request = incident_request(spec, d["incidents"])
    assert request["ticket"] == "HIGH" and request["change"] == ["data"] and "HIGH" in request["purpose"]
    assert origin_tags(d["incidents"])["closedloop.incident.id"] == "HIGH,DUP,LOW"


def test_run_without_any_valid_incident_is_refused(spec):
    with pytest.raises(PermanentError, match="(?s)no valid incident.*severity: expected one of"):
        admit(spec, [{"extra": {"model": spec.model.name, "scenario_type": "cut_in", "severity": "urgent"},
                      "timestamp": T0}], {}, run_id="r1")
    with pytest.raises(PermanentError, match="no events"):
        admit(spec, [], {}, run_id="r1")

"""The incident watchers' loops, run in an asyncio loop here (the scheduler test runs them in
Airflow's triggerer): the inbox sorts files into accepted/rejected, the KPI watcher fires once
per degradation against a real MLflow store. Outside a triggerer there is no asset state store;
the KPI watcher then keeps its alarms in memory (the scheduler test covers the real store)."""

from __future__ import annotations

import asyncio
import json

import pytest
from mlflow import MlflowClient

from closedloop.steps.monitoring import report_kpis
from closedloop.triggers.incidents import IncidentInboxTrigger, KpiWatchTrigger, scan_inbox

ROUTES = {"m1": ["hard_braking", "cut_in"], "m2": ["cut_in"]}
GOOD = {"model": "m1", "scenario_type": "hard_braking", "severity": "high", "kind": "collision"}


def test_inbox_scan_takes_own_files_leaves_others_and_rejects_bad_ones(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({**GOOD, "id": "A"}))
    (tmp_path / "other.json").write_text(json.dumps({**GOOD, "model": "m2", "scenario_type": "cut_in"}))
    (tmp_path / "bad.json").write_text(json.dumps({**GOOD, "severity": "urgent"}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / ".partial.json").write_text("{")
    found = scan_inbox(tmp_path, "m1", ROUTES)
    assert [(p.name, i["id"], i["reported_by"]) for p, i in found] == [("a.json", "A", "inbox:a.json")]
    # a.json moves after its event was handed over; another model's file stays for its own watcher
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [".partial.json", "a.json", "other.json"]
    assert "severity: expected one of" in (tmp_path / "rejected" / "bad.json.error.txt").read_text()
    assert "not JSON" in (tmp_path / "rejected" / "broken.json.error.txt").read_text()
    assert (tmp_path / ".partial.json").exists()


def test_hostile_files_are_set_aside_unread_and_a_good_one_in_the_same_look_still_counts(tmp_path):
    """A FIFO, a link to /dev/zero or out of the inbox, deep nesting, an oversized file, a huge
    number, a pasted credential: each is moved to rejected/ with its reason, nothing is read through
    a link, no reason copies the credential, and the valid incident beside them is taken."""
    import signal

    from tests.fixtures.hostile import SECRET, plant

    inbox = tmp_path / "inbox"
    expected = plant(inbox, tmp_path / "outside", max_bytes=10_000)
    (inbox / "good.json").write_text(json.dumps({**GOOD, "id": "G"}))
    signal.alarm(60)  # a FIFO read would block forever: fail the test instead of hanging it
    try:
        found = scan_inbox(inbox, "m1", ROUTES, max_bytes=10_000)
    finally:
        signal.alarm(0)
    assert [i["id"] for _, i in found] == ["G"]
    rejected = inbox / "rejected"
    for name, words in expected.items():
        reason = (rejected / f"{name}.error.txt").read_text()
        assert words in reason, (name, reason)
        assert SECRET not in reason
        assert (rejected / name).is_symlink() == (name in ("zero.json", "escape.json"))  # moved, not followed
    assert (tmp_path / "outside" / "incident.json").exists()  # the link's target was not touched
    assert sorted(p.name for p in inbox.iterdir()) == ["good.json", "rejected"]


def test_inbox_trigger_yields_then_accepts(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({**GOOD, "id": "A"}))
    trigger = IncidentInboxTrigger(inbox=str(tmp_path), model="m1", routes=ROUTES, poll_interval=0.05)

    async def first_two():
        events, gen = [], trigger.run()
        events.append(await asyncio.wait_for(gen.__anext__(), 5))
        (tmp_path / "b.json").write_text(json.dumps({**GOOD, "id": "B"}))
        events.append(await asyncio.wait_for(gen.__anext__(), 5))
        await gen.aclose()
        return events

    events = asyncio.run(first_two())
    assert [e.payload["id"] for e in events] == ["A", "B"]
    # a file moves to accepted/ only once the triggerer took its event (the generator resumed):
    # b.json's event was taken last, so a crash now would send it again (at least once)
    assert [p.name for p in (tmp_path / "accepted").iterdir()] == ["a.json"]
    assert (tmp_path / "b.json").exists()
    assert classpath_and_kwargs_round_trip(trigger)


def classpath_and_kwargs_round_trip(trigger) -> bool:
    import importlib

    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs).serialize() == (path, kwargs)


@pytest.fixture
def mlflow_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_kpi_watcher_fires_once_per_degradation_and_rearms(mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    rules = [{"metric": "online.cut_in.min_ttc_s", "min": 1.5, "scenario_type": "cut_in", "severity": "medium"}]
    trigger = KpiWatchTrigger(model="m1", rules=json.dumps(rules), poll_interval=0.05, mlflow_conn_id="none")
    assert classpath_and_kwargs_round_trip(trigger)
    client = MlflowClient(mlflow_uri)

    async def scenario():
        gen = trigger.run()

        async def next_event(timeout):
            try:
                return await asyncio.wait_for(asyncio.shield(pending[0]), timeout)
            except TimeoutError:
                return None

        pending = [asyncio.ensure_future(gen.__anext__())]
        assert await next_event(1.5) is None  # no model, no production version: nothing
        client.create_registered_model("m1")
        v1 = client.create_model_version("m1", source="file:///m1/1")
        client.set_registered_model_alias("m1", "production", v1.version)
        report_kpis("m1", {"online.cut_in.min_ttc_s": 2.0}, tracking_uri=mlflow_uri)
        assert await next_event(1.0) is None  # healthy
        report_kpis("m1", {"online.cut_in.min_ttc_s": 1.1}, tracking_uri=mlflow_uri)
        first = await next_event(10)
        assert first is not None
        pending[0] = asyncio.ensure_future(gen.__anext__())
        report_kpis("m1", {"online.cut_in.min_ttc_s": 0.9}, tracking_uri=mlflow_uri)
        assert await next_event(1.0) is None  # the same degradation: no second incident
        report_kpis("m1", {"online.cut_in.min_ttc_s": 2.2}, tracking_uri=mlflow_uri)  # recovered: re-armed
        await asyncio.sleep(0.5)
        report_kpis("m1", {"online.cut_in.min_ttc_s": 1.0}, tracking_uri=mlflow_uri)
        second = await next_event(10)
        pending[0].cancel()
        await gen.aclose()
        return first, second

    first, second = asyncio.run(scenario())
    assert first.payload["kind"] == "kpi_degradation" and first.payload["scenario_type"] == "cut_in"
    assert first.payload["severity"] == "medium" and "= 1.1 on production version 1" in first.payload["description"]
    assert second is not None and "= 1 on production version 1" in second.payload["description"]

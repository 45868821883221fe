"""The regression catalog: one scenario per admitted incident, written once, versioned by content."""

from __future__ import annotations

import json
import threading

import pytest

from closedloop.spec.incident import IncidentError, parse_incident
from closedloop.steps import regression

ROUTES = {"acc_policy": ["hard_braking", "cut_in"]}


def incident(**extra):
    return parse_incident({"id": "INC-9", "model": "acc_policy", "scenario_type": "hard_braking", "severity": "high",
                           "kind": "near_miss", **extra}, ROUTES)


def test_an_incident_becomes_a_scenario_once_and_the_version_follows_the_content(tmp_path):
    root = str(tmp_path)
    assert regression.catalog(root, "acc_policy") == {"model": "acc_policy", "version": "v0",
                                                      "digest": regression.catalog(root, "acc_policy")["digest"],
                                                      "entries": []}
    first = regression.add(root, "acc_policy", incident(scenario={"params": {"decel": 9, "gap": 20}, "seed": 5}),
                           repeats=3, dag_id="acc_incident", run_id="r1")
    assert first["added"] and first["scenario"] == {"id": "incident-INC-9", "incident": "INC-9", "type": "hard_braking",
                                                    "params": {"decel": 9.0, "gap": 20.0}, "seed": 5, "repeats": 3,
                                                    "safety_critical": True}
    assert first["lineage"]["dag_id"] == "acc_incident" and first["lineage"]["run_id"] == "r1"
    v1 = regression.catalog(root, "acc_policy")
    assert v1["version"].startswith("v1-") and [e["incident"]["id"] for e in v1["entries"]] == ["INC-9"]
    again = regression.add(root, "acc_policy", incident(scenario={"params": {"decel": 1}}), repeats=9,
                           dag_id="acc_incident", run_id="r2")  # a re-sent incident keeps its first scenario
    assert not again["added"] and again["scenario"]["params"] == {"decel": 9.0, "gap": 20.0}
    assert regression.catalog(root, "acc_policy") == v1
    other = parse_incident({"id": "INC-10", "model": "acc_policy", "scenario_type": "cut_in", "severity": "low"}, ROUTES)
    regression.add(root, "acc_policy", other, repeats=2, dag_id="acc_incident", run_id="r3")
    v2 = regression.catalog(root, "acc_policy")
    assert v2["version"].startswith("v2-") and v2["digest"] != v1["digest"]
    drawn = v2["entries"][1]["scenario"]  # no params reported: the type's own draws, seed fixed by the incident
    assert drawn["params"] == {} and drawn["seed"] == regression.scenario_of(other, repeats=2)["seed"]
    assert regression.catalog(root, "other_model")["entries"] == []  # per model


def test_concurrent_admissions_of_different_incidents_lose_none(tmp_path):
    root = str(tmp_path)
    incidents = [parse_incident({"id": f"INC-{i}", "model": "acc_policy", "scenario_type": "cut_in",
                                 "severity": "low"}, ROUTES) for i in range(12)]
    threads = [threading.Thread(target=regression.add, args=(root, "acc_policy", inc),
                                kwargs={"repeats": 1, "dag_id": "d", "run_id": f"r{n}"}) for n, inc in enumerate(incidents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e["incident"]["id"] for e in regression.catalog(root, "acc_policy")["entries"]) == \
        sorted(f"INC-{i}" for i in range(12))
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(("scenario", "says"), [
    ("fast", "scenario: expected an object"),
    ({"params": {"decel": "9"}}, "scenario.params.decel: expected a finite number, got '9'"),
    ({"params": {"decel": float("nan")}}, "scenario.params.decel: expected a finite number"),
    ({"params": {"rm -rf": 1}}, "is not a parameter name"),
    ({"params": {f"p{i}": 1 for i in range(21)}}, "expected up to 20 names"),
    ({"seed": -1}, "scenario.seed: expected an integer"),
    ({"seed": True}, "scenario.seed: expected an integer"),
    ({"params": {}, "code": "x"}, "scenario: expected an object"),
])
def test_a_bad_scenario_in_an_incident_is_refused_by_field(scenario, says):
    with pytest.raises(IncidentError) as err:
        incident(scenario=scenario)
    assert says in str(err.value)


def test_the_cli_lists_a_models_scenarios(tmp_path, monkeypatch, capsys):
    from closedloop.cli.commands import main

    from mlflow import MlflowClient

    monkeypatch.setenv("CLOSEDLOOP_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["scenarios", "list", "acc_policy"]) == 2  # no such model: not found, like trace
    assert "unknown model 'acc_policy' (registered models: none)" in capsys.readouterr().err
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_registered_model("acc_policy")
    assert main(["scenarios", "list", "acc_policy"]) == 0
    assert "no regression scenarios yet (catalog v0)" in capsys.readouterr().out
    regression.add(str(tmp_path), "acc_policy", incident(scenario={"params": {"decel": 9}}), repeats=3,
                   dag_id="acc_incident", run_id="manual__1")
    assert main(["scenarios", "list", "acc_policy"]) == 0
    out = capsys.readouterr().out
    assert "regression catalog v1-" in out and "INC-9" in out and "hard_braking" in out and "decel=9" in out
    assert "acc_incident / manual__1" in out
    assert main(["scenarios", "list", "acc_policy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"][0]["scenario"]["seed"] > 0


def test_a_run_keeps_the_catalog_it_first_read(tmp_path, project):
    """An incident admitted while a run simulates joins the next run, not the shards or the merge of this one."""
    from closedloop.runtime.context import RunContext
    from closedloop.spec import load_spec
    from closedloop.steps.simulation import pinned_regression, whole_catalog

    loaded = load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml")
    model = loaded.spec.model.name
    routes = {model: ["hard_braking", "cut_in"]}
    ctx = RunContext(pipeline=loaded.spec.name, template_digest="", dag_id="d", run_id="r1", data_root=str(tmp_path))
    regression.add(str(tmp_path), model, parse_incident({"id": "INC-1", "model": model, "scenario_type": "cut_in",
                                                         "severity": "low"}, routes), repeats=2, dag_id="i", run_id="a")
    first = pinned_regression(loaded, ctx)
    regression.add(str(tmp_path), model, parse_incident({"id": "INC-2", "model": model, "scenario_type": "cut_in",
                                                         "severity": "low"}, routes), repeats=2, dag_id="i", run_id="b")
    assert pinned_regression(loaded, ctx) == first and whole_catalog(loaded, ctx)["regression"]["incidents"] == ["INC-1"]
    later = RunContext(pipeline=loaded.spec.name, template_digest="", dag_id="d", run_id="r2", data_root=str(tmp_path))
    assert whole_catalog(loaded, later)["regression"]["incidents"] == ["INC-1", "INC-2"]

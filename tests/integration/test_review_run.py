"""The review's evidence through real Airflow (dag.test), real MLflow and a real browser: the shift
report and a shift gate that stops a shifted fleet's model before registration, the review card of
a candidate against production (its numbers read in headless Chromium and checked against MLflow),
the model card in the registry, and the asset events of the hand-off."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from mlflow import MlflowClient

from closedloop import settings
from closedloop.local.run import load_dag, run_dag
from tests.conftest import NO_REVIEW, SAFE_DATA, scratch_project, template_text

pytestmark = pytest.mark.integration

WHEN = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
MODEL = "acc_review_model"
SHIFT_GATE = {"gates:\n": "gates:\n  - metric: shift.ego_speed.psi\n    max: 0.25\n"
                          "    description: the fleet's speeds look like production's training data\n"}
SHIFTED = {"generator: closedloop.driving.logs:synthesize_drive_logs": "generator: tests.fixtures.domain:shifted_drive_logs"}


def states(summary: dict) -> dict[str, str]:
    return {t["task_id"]: t["state"] for t in summary["tasks"]}


@pytest.fixture(scope="module")
def runs(airflow_db, tmp_path_factory, project):
    import airflow.settings

    root = scratch_project(tmp_path_factory.mktemp("review"))
    path = root / "include" / "pipelines" / "acc_review.yaml"
    base = {**NO_REVIEW, **SAFE_DATA, **SHIFT_GATE, "name: acc_longitudinal": "name: acc_review",
            "name: acc_longitudinal_policy": f"name: {MODEL}"}
    out = {"root": root}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(root / "dags"))
        old, airflow.settings.DAGS_FOLDER = airflow.settings.DAGS_FOLDER, str(root / "dags")
        try:
            path.write_text(template_text(project, gates="point", incidents=False, **base))
            out["first"] = run_dag(load_dag("acc_review"), WHEN)
            # production: the first candidate. (The approval and promotion that put it there are
            # tested against a real scheduler in test_governance_scheduler; here the test sets the alias.)
            MlflowClient(settings.tracking_uri()).set_registered_model_alias(
                MODEL, "production", out["first"]["registry"]["version"])
            path.write_text(template_text(project, gates="point", incidents=False, **base, **SHIFTED))
            out["shifted"] = run_dag(load_dag("acc_review"), WHEN.replace(day=24))
            path.write_text(template_text(project, gates="point", incidents=False, **base))
            out["second"] = run_dag(load_dag("acc_review"), WHEN.replace(day=25))
        finally:
            airflow.settings.DAGS_FOLDER = old
    return out


def test_without_production_the_shift_gate_has_nothing_to_judge_and_says_so(runs):
    first = runs["first"]
    assert first["state"] == "success", states(first)
    gate = {r["metric"]: r for r in first["results"]["release_gate"]["report"]}["shift.ego_speed.psi"]
    assert gate["passed"] and gate["value"] is None and "no production version" in gate["evidence"]


def test_a_shifted_fleet_is_flagged_and_its_model_stopped_before_registration(runs):
    s = runs["shifted"]
    assert s["state"] == "failed" and states(s)["release_gate"] == "failed"
    assert states(s)["register_candidate"] == "upstream_failed"
    report = {r["metric"]: r for r in next(t for t in s["tasks"] if t["task_id"] == "release_gate")["error"]["report"]}
    assert not report["shift.ego_speed.psi"]["passed"] and report["shift.ego_speed.psi"]["value"] > 0.25
    client = MlflowClient(settings.tracking_uri())
    gate_run = client.search_runs([client.get_experiment_by_name("closedloop/acc_review").experiment_id],
                                  filter_string=f"tags.`airflow.run_id` = '{s['run_id']}' and "
                                                "tags.`closedloop.step` = 'release_gate'")[0]
    assert gate_run.data.metrics["shift.ego_speed.psi"] == report["shift.ego_speed.psi"]["value"]
    shift = client.download_artifacts(gate_run.info.run_id, "shift/report.json", str(runs["root"]))
    import json

    shifted = json.loads(open(shift).read())
    assert shifted["features"]["ego_speed"]["mean"]["candidate"] < 0.7 * shifted["features"]["ego_speed"]["mean"]["production"]
    assert shifted["snapshots"]["production"] == runs["first"]["results"]["label"]["digest"]
    assert [v for v in client.search_model_versions(f"name = '{MODEL}'")
            if v.tags.get("airflow.run_id") == s["run_id"]] == []  # nothing registered


def test_the_review_card_shows_candidate_against_production_in_a_browser(runs, tmp_path):
    from closedloop.steps.cards import CARD_HTML, CARD_JSON
    from tests.browser import Browser, chromium_path

    second, first = runs["second"], runs["first"]
    assert second["state"] == "success", [(t["task_id"], t["state"], t["error"]) for t in second["tasks"]
                                          if t["state"] != "success"]
    client = MlflowClient(settings.tracking_uri())
    v2, v1 = second["registry"]["version"], first["registry"]["version"]
    train_run = second["results"]["train"]["run_id"]
    html = client.download_artifacts(train_run, CARD_HTML, str(tmp_path))
    card = __import__("json").loads(open(client.download_artifacts(train_run, CARD_JSON, str(tmp_path))).read())
    assert card["compared_with"] == {"version": v1, "note": None}
    assert card["datasets"]["production"]["labelled"]["digest"] == first["results"]["label"]["digest"]
    assert card["shift"]["features"]["ego_speed"]["psi"] < 0.25  # the same fleet, a later week
    gate = {v: client.get_run(client.get_model_version(MODEL, v).tags["closedloop.gate_run_id"]).data.metrics
            for v in (v1, v2)}
    if chromium_path() is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    with Browser() as b:
        b.goto(f"file://{html}")
        assert b.eval("document.getElementById('version').textContent") == v2
        assert f"production version {v1}" in b.eval("document.getElementById('compared').textContent")
        for metric in ("sim.collision_rate", "sim.cut_in.min_ttc_s", "offline.rmse", "offline.hard_braking.mae"):
            row = f"document.querySelector('#metrics tr[data-metric=\"{metric}\"]')"
            shown = [float(b.eval(f"{row}.querySelector('.{c}').textContent")) for c in ("c", "p")]
            assert shown == pytest.approx([gate[v2][metric], gate[v1][metric]], rel=1e-3), metric
        bars = b.eval("[...document.querySelectorAll('#charts text.v')].map(t => [t.dataset.series, t.dataset.label, "
                      "Number(t.textContent)])")
        assert ["candidate", "hard_braking", pytest.approx(gate[v2]["sim.hard_braking.min_ttc_s"], rel=1e-3)] in bars
        assert b.eval("document.querySelectorAll('#hists svg').length") == len(card["shift"]["features"]) >= 4
        assert b.eval("document.querySelector('#charts svg').getBoundingClientRect().width") > 100


def test_every_version_has_a_model_card_from_the_records(runs):
    client = MlflowClient(settings.tracking_uri())
    second = runs["second"]
    mv = client.get_model_version(MODEL, second["registry"]["version"])
    text = mv.description
    assert f"# {MODEL} version {mv.version}\n" in text and "Aliases when this card was written: candidate" in text
    assert second["results"]["label"]["digest"] in text and "label policy `expert_idm_smoothed@2`" in text
    gate = client.get_run(mv.tags["closedloop.gate_run_id"]).data.metrics
    row = next(line for line in text.splitlines() if line.startswith("| hard_braking |"))
    assert f"| {gate['sim.hard_braking.collision_rate']:g} |" in row
    assert f"{int(gate['sim.hard_braking.collisions'])} / {int(gate['sim.hard_braking.episodes'])}" in row
    assert "## Known limitations" in text and "95 % upper bound" in text  # 8 episodes are thin evidence
    assert "- not reviewed yet" in text

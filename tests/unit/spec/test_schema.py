"""Template schema: the shipped templates validate; each kind of mistake gets its own clear message."""

from __future__ import annotations

import pytest

from closedloop.errors import SpecError
from closedloop.spec import load_all, load_spec
from tests.conftest import template_text


def test_shipped_templates_are_valid(project):
    specs, errors = load_all(project / "include" / "pipelines")
    assert errors == []
    assert {s.spec.name for s in specs} >= {"acc_longitudinal"}
    periodic = next(s for s in specs if s.spec.name == "acc_longitudinal")
    assert periodic.spec.label_policy.ref == "expert_idm_smoothed@2"
    assert periodic.spec.schedule == "0 3 * * 1"
    assert len(periodic.digest) == 16


def test_template_hash_ignores_comments_but_not_content(make_project, project):
    a = load_spec(make_project("a.yaml", template_text(project)))
    b = load_spec(make_project("b.yaml", "# a new comment\n" + template_text(project)))
    c = load_spec(make_project("c.yaml", template_text(project, **{"max: 0.35": "max: 0.36"})))
    assert a.digest == b.digest
    assert a.digest != c.digest


BROKEN = [
    # (id, replacements on the shipped template or full text, fragments the message must contain)
    ("yaml-syntax", {"owner: acc-ml-team": "owner: [acc-ml-team"}, ["not valid YAML", "line"]),
    ("not-a-mapping", "- just\n- a list\n", ["expected a mapping of template fields", "got list"]),
    ("missing-field", {"  name: acc_longitudinal_policy\n": ""}, ["model.name", "required field is missing"]),
    ("unknown-field-typo", {"window_days: 14": "window_dayz: 14"},
     ["dataset.window_dayz", "unknown field", "did you mean 'window_days'"]),
    ("wrong-type", {"window_days: 14": "window_days: two weeks"},
     ["dataset.window_days", "valid integer", '"two weeks"']),
    ("out-of-range", {"window_days: 14": "window_days: 0"}, ["dataset.window_days", "greater than or equal to 1"]),
    ("bad-cron", {'schedule: "0 3 * * 1"': 'schedule: "every monday"'},
     ["schedule", "expected a cron expression", "'every monday'"]),
    ("bad-name", {"name: acc_longitudinal": "name: ACC Periodic!"}, ["name:", "should match pattern"]),
    ("entry-point-syntax", {"entry_point: closedloop.driving.policy:train_policy": "entry_point: train_policy"},
     ["training.entry_point", "expected an entry point 'package.module:function'"]),
    ("entry-point-missing-module",
     {"entry_point: closedloop.driving.policy:train_policy": "entry_point: nosuchpkg.trainers:fit"},
     ["training.entry_point", "module 'nosuchpkg.trainers'", "cannot be found"]),
    ("gate-without-bound", {"    max: 0.35\n    max_regression: 0.05       # and no more than 0.05 worse than the production version\n": ""},
     ["gates[0]", "needs a bound", "got none"]),
    ("gate-impossible", {"    max: 0.35\n": "    max: 0.35\n    min: 0.5\n"}, ["gates[0]", "can never pass"]),
    ("gate-unknown-namespace", {"metric: offline.rmse": "metric: online.rmse"}, ["gates[0].metric", "should match pattern"]),
    ("gate-metric-not-computed", {"metrics: [mae, rmse, max_abs_error]": "metrics: [mae]"},
     ["gates[0].metric 'offline.rmse'", "evaluation.metrics does not compute"]),
    ("unknown-offline-metric", {"metrics: [mae, rmse, max_abs_error]": "metrics: [mae, rmse, r2]"},
     ["evaluation.metrics[2]", "'mae', 'rmse'", '"r2"']),
    ("missing-suite", {"suite: drive_log_labels": "suite: drive_logs_v9"},
     ["validation.suite", "'drive_logs_v9' not found", "available: drive_log_labels"]),
    ("missing-scenario-set", {"scenario_set: standard": "scenario_set: nightly"},
     ["simulation.scenario_set", "'nightly' not found", "available: standard"]),
    ("duplicate-sources", {"sources: [fleet-eu, fleet-us]": "sources: [fleet-eu, fleet-eu]"},
     ["dataset.sources", "duplicates ['fleet-eu']"]),
    ("empty-approvers", {"approvers: [safety-lead, safety-deputy]": "approvers: []"}, ["approval.approvers", "at least 1 item"]),
    ("catchup-without-start", {"catchup: false": "catchup: true"}, ["catchup: true needs start_date"]),
    ("gate-regression-negative", {"    max_regression: 0.05 ": "    max_regression: -0.1 "},
     ["gates[0].max_regression", "greater than or equal to 0"]),
    ("hil-gate-without-hil", {"metric: offline.rmse": "metric: hil.brake_distance_m"},
     ["gates[0].metric 'hil.brake_distance_m' needs hardware-in-the-loop results", "add a 'hil:' section"]),
    ("nested-hyperparameter", {"max_leaf_nodes: 31}": "max_leaf_nodes: {a: 1}}"},
     ["training.hyperparameters.max_leaf_nodes"]),
    ("sampling-unknown-scenario", {"sampling: {hard_braking: 0.1}": "sampling: {hard_brakes: 0.1}"},
     ["dataset", "sampling names scenario types ['hard_brakes']"]),
    ("incident-scenario-not-mined", {"scenario_types: [cut_in, hard_braking, stop_and_go]":
                                     "scenario_types: [cut_in, rain]"},
     ["incidents.scenario_types ['rain'] are not in dataset.scenarios"]),
    ("kpi-scenario-not-answered", {"      scenario_type: cut_in\n": "      scenario_type: cruise\n"},
     ["incidents.kpis[1].scenario_type 'cruise' is not one of the incident scenario types"]),
    ("kpi-without-bound", {"      min: 1.5\n": ""}, ["incidents.kpis[1]", "needs 'min:' and/or 'max:'"]),
    ("kpi-bad-severity", {"      severity: medium": "      severity: urgent"},
     ["incidents.kpis[1].severity", "'low', 'medium', 'high' or 'critical'"]),
    ("queue-without-scheme", {"  pool: closedloop_incident\n": "  pool: closedloop_incident\n  queue: {topics: [x]}\n"},
     ["incidents.queue needs 'scheme:'"]),
    ("debounce-negative", {"debounce_minutes: 30": "debounce_minutes: -5"},
     ["incidents.debounce_minutes", "greater than or equal to 0"]),
    ("reliability-unknown-step", {"    train: {retries: 3}": "    trian: {retries: 3}"},
     ["reliability", "unknown step 'trian'", "did you mean 'train'"]),
    ("reliability-cache-a-gate", {"    train: {retries: 3}": "    release_gate: {cache: true}"},
     ["reliability.steps.release_gate.cache", "release_gate always runs"]),
    ("reliability-negative-retries", {"  retries: 2 ": "  retries: -1 "},
     ["reliability.retries", "greater than or equal to 0"]),
    ("reliability-max-below-first", {"max_retry_delay_seconds: 600": "max_retry_delay_seconds: 5"},
     ["max_retry_delay_seconds 5 is below retry_delay_seconds 20"]),
    ("alert-webhook-without-connection", {"  - kind: local ": "  - kind: webhook "},
     ["alerts[0]", "needs conn_id", "never goes in a template"]),
    ("alert-unknown-kind", {"  - kind: local ": "  - kind: pager "}, ["alerts[0].kind", "'local', 'webhook' or 'email'"]),
    ("alert-bad-address", {"  - kind: local ": "  - kind: email\n    to: [oncall]\n "},
     ["alerts[0].to[0]", "should match pattern"]),
]


@pytest.mark.parametrize(("replacements", "fragments"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_template_gives_clear_message(make_project, project, replacements, fragments):
    text = replacements if isinstance(replacements, str) else template_text(project, **replacements)
    path = make_project("broken.yaml", text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(str(path)), message  # every message names the file first
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_each_broken_kind_has_its_own_message(make_project, project):
    messages = set()
    for _id, replacements, _ in BROKEN:
        text = replacements if isinstance(replacements, str) else template_text(project, **replacements)
        with pytest.raises(SpecError) as info:
            load_spec(make_project(f"{_id}.yaml", text))
        messages.add(str(info.value).split(":", 1)[1])
    assert len(messages) == len(BROKEN)


def test_several_problems_are_reported_together(make_project, project):
    text = template_text(project, **{"window_days: 14": "window_days: -1", "owner: acc-ml-team": "owner: ''"})
    with pytest.raises(SpecError) as info:
        load_spec(make_project("two.yaml", text))
    assert len(info.value.problems) == 2
    assert "2 problems" in str(info.value)


def test_one_bad_file_does_not_hide_the_others(make_project, project):
    make_project("good.yaml", template_text(project))
    make_project("bad.yaml", template_text(project, **{"name: acc_longitudinal": "name: acc_bad",
                                                      "window_days: 14": "window_days: x"}))
    specs, errors = load_all(make_project.root / "include" / "pipelines")
    assert [s.spec.name for s in specs] == ["acc_longitudinal"]
    assert len(errors) == 1 and "bad.yaml" in str(errors[0])


def test_duplicate_pipeline_or_model_names_are_refused(make_project, project):
    make_project("a.yaml", template_text(project))
    make_project("b.yaml", template_text(project))
    make_project("c.yaml", template_text(project, **{"name: acc_longitudinal": "name: acc_other"}))
    specs, errors = load_all(make_project.root / "include" / "pipelines")
    assert [s.path.name for s in specs] == ["a.yaml"]
    text = "\n".join(map(str, errors))
    assert "b.yaml: name: pipeline name 'acc_longitudinal' is already used by" in text
    assert "c.yaml: model.name: registered model 'acc_longitudinal_policy' is already produced by" in text

"""DAG files: one DAG per template, the task graph, import errors, parse-time budget (imports)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from closedloop.spec import template_files
from tests.conftest import NO_REVIEW, ONE_APPROVAL, template_text

EXPECTED_EDGES = {
    "generate_dataset": set(),
    "label": {"generate_dataset"},
    "validate_data": {"label"},
    "train": {"validate_data"},
    "offline_eval": {"train", "label"},
    "simulate": {"offline_eval"},
    "release_gate": {"simulate"},
    "register_candidate": {"release_gate"},
    "dossier": {"register_candidate"},
}
GOVERNED_EDGES = {**EXPECTED_EDGES, "approval": {"register_candidate"}, "dossier": {"register_candidate", "approval"},
                  "promote": {"dossier"}}
SHIPPED_EDGES = {**GOVERNED_EDGES, "merge_simulation": {"simulate"}, "release_gate": {"simulate", "merge_simulation"},
                 "approval_2": {"approval"}, "dossier": {"register_candidate", "approval_2"}}
"""The shipped template: simulation in shards (merged), the two-person rule (approval, approval_2)."""
REGISTRY = {"closedloop_registry", "closedloop_registry_watch", "closedloop_release", "closedloop_recall"}
INCIDENT_EDGES = {**SHIPPED_EDGES, "admit_incident": set(), "generate_dataset": {"admit_incident"}}


def without_incidents(text: str) -> str:
    return text.split("\nincidents:")[0] + "\n"


def dagbag(folder):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(folder))


def test_dags_folder_has_one_dag_per_template_and_no_import_errors(project):
    bag = dagbag(project / "dags")
    assert bag.import_errors == {}
    names = {p.stem for p in template_files(project / "include" / "pipelines")}
    assert set(bag.dag_ids) == names | {f"{n}_incident" for n in names} | REGISTRY
    for name in names:
        dag = bag.dags[name]
        assert {t.task_id: set(t.upstream_task_ids) for t in dag.tasks} == SHIPPED_EDGES
        assert dag.doc_md and f"# Pipeline `{name}`" in dag.doc_md
        assert "closedloop" in dag.tags
        incident = bag.dags[f"{name}_incident"]
        assert {t.task_id: set(t.upstream_task_ids) for t in incident.tasks} == INCIDENT_EDGES


def test_incident_dag_runs_on_the_incident_asset_with_its_own_pool_and_priority(project):
    bag = dagbag(project / "dags")
    periodic, incident = bag.dags["acc_longitudinal"], bag.dags["acc_longitudinal_incident"]
    (asset,) = incident.timetable.asset_condition.objects
    assert asset.uri == "closedloop://incidents/acc_longitudinal_policy"
    watchers = {w.name: w.trigger for w in asset.watchers}
    assert set(watchers) == {"acc_longitudinal_inbox", "acc_longitudinal_kpis"}
    assert json.loads(watchers["acc_longitudinal_kpis"].rules)[0]["metric"] == "online.hard_braking.intervention_rate"
    for task in incident.tasks:
        assert (task.pool, task.priority_weight, task.weight_rule) == ("closedloop_incident", 100, "absolute")
    for task in periodic.tasks:
        assert task.pool == "default_pool" and task.priority_weight == 1
    admit = incident.get_task("admit_incident")
    assert admit.max_active_tis_per_dag == 1 and admit.retries == 0 and admit.inlets == [asset]


def test_dag_settings_come_from_the_template(project):
    dag = dagbag(project / "dags").dags["acc_longitudinal"]
    assert dag.timetable.expression == "0 3 * * 1"
    assert dag.catchup is False
    assert dag.default_args["owner"] == "acc-ml-team"
    assert type(dag.get_task("simulate")).__name__ == "MappedOperator"  # its shards get the policy when unmapped
    for step in ("generate_dataset", "train", "merge_simulation", "release_gate", "register_candidate", "promote"):
        task = dag.get_task(step)  # transient errors only: the policy fails gate failures and bugs at once
        assert type(task.retry_policy).__name__ == "TransientOnlyRetryPolicy"
        assert task.retries == (3 if step == "train" else 2)  # reliability.steps.train.retries
        assert task.retry_exponential_backoff == 2.0 and task.retry_delay.total_seconds() == 20
    assert dag.get_task("approval").retries == 2  # recording the decision; the answer is never asked again
    assert type(dag.get_task("approval").retry_policy).__name__ == "TransientOnlyRetryPolicy"
    assert "sim.hard_braking.collision_rate (its 95% Clopper-Pearson bound) <= 0.05" in dag.doc_md
    assert dag.start_date is None  # no start date + catchup off: unpausing waits for the next tick
    review = dag.get_task("approval")
    assert [u["id"] for u in review.assigned_users] == ["safety-lead", "safety-deputy"]
    assert review.defaults == ["Reject"] and review.response_timeout.total_seconds() == 72 * 3600
    assert set(dag.params.keys()) == {"purpose", "change", "expected_impact", "scope", "ticket"}
    assert dag.params.validate()["change"] == ["data"]  # the scheduled run's standing request


def test_template_without_review_ends_at_register_candidate(make_project, project):
    make_project("acc_longitudinal.yaml", template_text(project, **NO_REVIEW))
    dag = dagbag(make_project.root / "dags").dags["acc_longitudinal"]
    assert {t.task_id: set(t.upstream_task_ids) for t in dag.tasks} == EXPECTED_EDGES
    assert "never promotes" in dag.doc_md


def test_copied_template_is_a_second_pipeline(make_project, project):
    make_project("acc_longitudinal.yaml", template_text(project))
    make_project("acc_eu_only.yaml", template_text(project, **{
        "name: acc_longitudinal": "name: acc_eu_only",
        "name: acc_longitudinal_policy": "name: acc_policy_eu",
        "max: 0.35": "max: 0.30",
    }))
    bag = dagbag(make_project.root / "dags")
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"acc_longitudinal", "acc_eu_only", "acc_longitudinal_incident", "acc_eu_only_incident",
                                *REGISTRY}
    assert set(bag.dags["closedloop_registry"].params.get_param("model").schema["enum"]) == {"acc_longitudinal_policy",
                                                                                  "acc_policy_eu"}
    eu = bag.dags["acc_eu_only"].get_task("register_candidate").loaded.spec
    assert eu.model.name == "acc_policy_eu" and eu.gates[0].max == 0.30


def test_broken_template_is_an_import_error_and_others_still_load(make_project, project):
    make_project("acc_longitudinal.yaml", without_incidents(template_text(project)))
    bad = make_project("acc_typo.yaml", template_text(project, **{
        "name: acc_longitudinal": "name: acc_typo", "name: acc_longitudinal_policy": "name: acc_typo_model",
        "window_days: 14": "window_days: fourteen"}))
    bag = dagbag(make_project.root / "dags")
    # the broken template's DAG is held back (it says why and does nothing); the others are untouched
    assert set(bag.dag_ids) == {"acc_longitudinal", "acc_typo", "acc_typo_incident", *REGISTRY}
    held = bag.dags["acc_typo"]
    assert "template-error" in held.tags and held.description.startswith("HELD BACK by a template error")
    assert [t.task_id for t in held.tasks] == ["template_error"]
    assert "dataset.window_days: input should be a valid integer" in held.doc_md
    # the error is the import error of the file that builds no DAG, never of the one that builds them
    assert len(bag.import_errors) == 1
    (dag_file, message), = bag.import_errors.items()
    assert dag_file.endswith("closedloop_template_errors.py")
    assert f"{bad}: invalid pipeline template" in message
    assert "dataset.window_days: input should be a valid integer" in message


@pytest.mark.parametrize("templates", [1, 100])
def test_parse_imports_nothing_heavy(make_project, project, templates):
    """Loading dags/ must not import mlflow, great_expectations, sklearn, pandas or numpy (a sharded
    simulation's mapped task included)."""
    for i in range(templates):
        make_project(f"p{i:03d}.yaml", template_text(project, **{
            "name: acc_longitudinal": f"name: acc_p{i:03d}", "name: acc_longitudinal_policy": f"name: model_{i:03d}",
            **({"scenario_set: standard": "scenario_set: standard\n  shards: {count: 3}"} if i % 2 == 0 else {})}))
    code = (
        "import sys, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(make_project.root / 'dags')!r})\n"
        "heavy = [m for m in ('mlflow', 'great_expectations', 'sklearn', 'pandas', 'numpy', 'pyarrow') if m in sys.modules]\n"
        "print(json.dumps({'dags': len(bag.dags), 'errors': len(bag.import_errors), 'heavy': heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"dags": 2 * templates + 4, "errors": 0, "heavy": []}  # periodic + incident each; registry, watch, release, recall


def test_watcher_triggers_survive_airflows_storage_round_trip(project):
    """Airflow keeps a watcher only if its trigger hashes the same before and after the database."""
    from airflow.models.trigger import Trigger
    from airflow.serialization.encoders import encode_trigger
    from airflow.triggers.base import BaseEventTrigger

    bag = dagbag(project / "dags")
    (asset,) = bag.dags["acc_longitudinal_incident"].timetable.asset_condition.objects
    (alarms,) = bag.dags["closedloop_registry_watch"].timetable.asset_condition.objects
    for watcher in [*asset.watchers, *alarms.watchers]:
        encoded = encode_trigger(watcher.trigger)
        stored = Trigger(classpath=encoded["classpath"], kwargs=encoded["kwargs"])
        assert BaseEventTrigger.hash(encoded["classpath"], encoded["kwargs"]) == \
            BaseEventTrigger.hash(stored.classpath, stored.kwargs), watcher.name


def test_a_quorum_of_two_chains_two_approval_tasks_and_the_registry_dags_are_built(make_project, project):
    from airflow.sdk import DAG

    from closedloop.dagbuilder import build_dags
    from closedloop.operators.governance import ReviewOperator
    from closedloop.triggers.registry import AliasWatchTrigger

    make_project("acc_two.yaml", template_text(project, incidents=False, **{
        "name: acc_longitudinal": "name: acc_two", "timeout_hours: 72": "timeout_hours: 72\n  required: 2", **ONE_APPROVAL}))
    dags = build_dags(make_project.root / "include" / "pipelines")
    dag = dags["acc_two"]
    edges = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    assert edges == {**EXPECTED_EDGES, "approval": {"register_candidate"}, "approval_2": {"approval"},
                     "dossier": {"register_candidate", "approval_2"}, "promote": {"dossier"}}
    second = dag.get_task("approval_2")
    assert isinstance(second, ReviewOperator) and second.prior == ["approval"]

    registry = dags["closedloop_registry"]
    assert isinstance(registry, DAG) and registry.max_active_runs == 1 and registry.schedule is None
    assert registry.params.get_param("action").schema["enum"] == ["promote", "rollback", "restore"]
    assert registry.params.get_param("model").schema["enum"] == ["acc_longitudinal_policy"]
    (asset,) = dags["closedloop_registry_watch"].timetable.asset_condition.objects
    (watcher,) = asset.watchers
    trigger = watcher.trigger
    assert isinstance(trigger, AliasWatchTrigger)
    assert trigger.serialize() == ("closedloop.triggers.registry.AliasWatchTrigger",
                                   {"models": "acc_longitudinal_policy", "poll_interval": 30.0,
                                    "mlflow_conn_id": "mlflow_default"})


def test_a_quorum_larger_than_the_approver_list_is_a_template_error(make_project, project):
    from closedloop.spec import load_all

    make_project("acc_three.yaml", template_text(project, incidents=False, **{
        "name: acc_longitudinal": "name: acc_three", "timeout_hours: 72": "timeout_hours: 72\n  required: 3", **ONE_APPROVAL}))
    specs, errors = load_all(make_project.root / "include" / "pipelines")
    assert not specs and len(errors) == 1
    assert "approval: required: 3 distinct approvals need at least 3 approvers" in str(errors[0])


def test_an_unbuildable_template_is_held_back_and_named_by_the_errors_file(make_project, project, monkeypatch):
    """A template that validates but whose DAG cannot be built: its DAGs are held back, the build error is
    recorded by the pipelines' DAG file and raised by the errors file (which builds nothing itself)."""
    import closedloop.dagbuilder as builder

    real = builder.build_dag

    def build(loaded):
        if loaded.spec.name == "acc_boom":
            raise RuntimeError("operator wiring broke")
        return real(loaded)

    monkeypatch.setattr(builder, "build_dag", build)
    make_project("acc_longitudinal.yaml", without_incidents(template_text(project)))
    boom = make_project("acc_boom.yaml", without_incidents(template_text(project, **{
        "name: acc_longitudinal": "name: acc_boom", "name: acc_longitudinal_policy": "name: acc_boom_model"})))
    dagbag(make_project.root / "dags")  # the processor parses again and again: the record is there by the next parse
    bag = dagbag(make_project.root / "dags")
    assert set(bag.dag_ids) == {"acc_longitudinal", "acc_boom", *REGISTRY}
    assert bag.dags["acc_boom"].description.startswith("HELD BACK")
    (dag_file, message), = bag.import_errors.items()
    assert dag_file.endswith("closedloop_template_errors.py")
    assert f"{boom}: cannot build DAG: RuntimeError: operator wiring broke" in message
    # fixed (here: the builder works again), the record is cleared on the next parse and nothing is raised
    monkeypatch.setattr(builder, "build_dag", real)
    dagbag(make_project.root / "dags")
    bag = dagbag(make_project.root / "dags")
    assert bag.import_errors == {} and "template-error" not in bag.dags["acc_boom"].tags

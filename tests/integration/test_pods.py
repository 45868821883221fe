"""``train`` and ``simulate`` as Kubernetes pods. There is no cluster here, so: the pods the
KubernetesPodOperator would create are rendered from a template and checked field by field, and
the pod's command (``python -m closedloop.podstep``) runs here as a process with exactly what the
operator hands it — the same step code on real MLflow and Great Expectations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from closedloop import settings
from closedloop.runtime.context import RunContext
from closedloop.spec import load_spec
from tests.conftest import NO_REVIEW, SAFE_DATA, template_text

pytestmark = pytest.mark.integration

PODS = """
kubernetes:
  train:
    image: registry.example.com/closedloop:0.1.0
    namespace: ml-training
    cpu: "8"
    memory: 32Gi
    gpu: 2
    node_selector: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    service_account: closedloop-trainer
    env_from_secrets: [mlflow-credentials]
  simulate:
    image: registry.example.com/closedloop:0.1.0
    namespace: simulation
    cpu: "16"
    memory: 8Gi
"""


@pytest.fixture(scope="module")
def pod_project(tmp_path_factory, project):
    from tests.conftest import scratch_project

    root = scratch_project(tmp_path_factory.mktemp("pods"))
    text = template_text(project, gates="point", incidents=False, **NO_REVIEW, **SAFE_DATA, **{
        "name: acc_longitudinal": "name: acc_pods", "name: acc_longitudinal_policy": "name: acc_pods_model",
        "window_days: 14": "window_days: 5"})
    (root / "include" / "pipelines" / "acc_pods.yaml").write_text(text + PODS)
    return root


def task_context(task, dag, results: dict, *, sealed: bool = True) -> dict:
    """The parts of a task's runtime context the operator reads (a stand-in: rendering a pod needs no
    running task, and no cluster is here to run one). The upstream results are sealed as the upstream
    tasks would have sealed them (with the deployment's key: here the local one)."""
    from closedloop.hooks.signing import signer
    from closedloop.runtime.signing import Binding

    if sealed:
        results = {t: signer().seal(v, Binding(dag.dag_id, "manual__pods", t)) for t, v in results.items()}
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id, run_id="manual__pods", try_number=1, map_index=-1,
                         xcom_pull=lambda task_ids, key="return_value": results.get(task_ids) if key ==
                         "return_value" else None)
    dag_run = SimpleNamespace(conf={}, run_type="manual", triggering_user_name="ml-engineer", run_id="manual__pods")
    return {"ti": ti, "dag": dag, "run_id": "manual__pods", "dag_run": dag_run, "params": {}}


def test_template_renders_the_pods_the_cluster_would_run(pod_project):
    from airflow.dag_processing.dagbag import DagBag

    from closedloop.operators.pod import StepPodOperator

    dag = DagBag(dag_folder=str(pod_project / "dags")).dags["acc_pods"]
    train, simulate = dag.get_task("train"), dag.get_task("simulate")
    assert isinstance(train, StepPodOperator) and isinstance(simulate, StepPodOperator)
    assert type(dag.get_task("offline_eval")).__name__ == "OfflineEvalOperator"  # the rest stay on workers
    assert type(train.retry_policy).__name__ == "TransientOnlyRetryPolicy" and train.retries == 3
    inputs = {"generate_dataset": {"digest": "raw1", "sources": ["fleet-eu"]},
              "label": {"digest": "lab1", "uri": "s3://b/lab1.parquet"}, "validate_data": {"success": True}}
    ctx = task_context(train, dag, inputs)
    pod = train.pod_operator(ctx).build_pod_request_obj(ctx, dry_run=True)  # dry run: no cluster to ask
    c = next(x for x in pod.spec.containers if x.name == "base")
    assert "airflow-xcom-sidecar" in [x.name for x in pod.spec.containers]  # the result comes back through XCom
    assert (pod.metadata.namespace, c.image) == ("ml-training", "registry.example.com/closedloop:0.1.0")
    assert c.command == ["python", "-m", "closedloop.podstep"] and c.args == ["train", "include/pipelines/acc_pods.yaml"]
    assert c.resources.requests == {"cpu": "8", "memory": "32Gi"}
    assert c.resources.limits == {"memory": "32Gi", "nvidia.com/gpu": "2"}
    assert pod.spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert pod.spec.service_account_name == "closedloop-trainer"
    assert [e.secret_ref.name for e in c.env_from] == ["mlflow-credentials"]
    assert pod.metadata.labels["closedloop/step"] == "train" and pod.metadata.labels["dag_id"] == "acc_pods"
    env = {e.name: e.value for e in c.env}
    payload = json.loads(env["CLOSEDLOOP_STEP"])
    assert payload["inputs"] == inputs
    assert payload["context"]["run_id"] == "manual__pods" and payload["context"]["pipeline"] == "acc_pods"
    assert payload["context"]["origin"] == {"closedloop.trigger": "request", "closedloop.requester": "ml-engineer"}
    assert payload["context"]["tracking_uri"] == settings.tracking_uri()
    assert not any("PASSWORD" in e.name for e in c.env)  # credentials come from the secret, not the spec
    from closedloop.errors import EvidenceError

    with pytest.raises(EvidenceError, match="the result of task 'generate_dataset' carries no seal"):
        train.pod_operator(task_context(train, dag, inputs, sealed=False))  # an edited XCom reaches no pod
    sim_ctx = task_context(simulate, dag, {"train": {"model_uri": "models:/m/1", "run_id": "r"}})
    sim = simulate.pod_operator(sim_ctx).build_pod_request_obj(sim_ctx, dry_run=True)
    sim_base = next(x for x in sim.spec.containers if x.name == "base")
    assert sim.metadata.namespace == "simulation" and sim_base.resources.limits == {"memory": "8Gi"}
    assert not sim.spec.node_selector
    assert json.loads({e.name: e.value for e in sim_base.env}["CLOSEDLOOP_STEP"])["inputs"]["train"]["run_id"] == "r"


def test_parsing_a_template_with_pods_imports_no_kubernetes(pod_project):
    """The Kubernetes provider and client cost seconds to import: only a running pod task imports them."""
    code = ("import sys; from closedloop.dagbuilder import build_dags; "
            f"dags = build_dags({str(pod_project / 'include' / 'pipelines')!r}); "
            "assert type(dags['acc_pods'].get_task('train')).__name__ == 'StepPodOperator'; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'kubernetes_asyncio') "
            "or m.startswith('airflow.providers.cncf.kubernetes.operators')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def podstep(step: str, template, payload: dict, tmp_path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    out, term = tmp_path / f"{step}.json", tmp_path / f"{step}.termination"
    out.unlink(missing_ok=True)
    term.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "closedloop.podstep", step, str(template)],
                          env={**os.environ, "CLOSEDLOOP_STEP": json.dumps(payload), "CLOSEDLOOP_XCOM_PATH": str(out),
                               "CLOSEDLOOP_TERMINATION_LOG": str(term), **env},
                          capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text()) if out.exists() else json.loads(term.read_text()) if term.exists() else {}
    return proc, result


def test_the_pods_command_runs_the_same_steps(pod_project, tmp_path):
    from airflow.sdk.exceptions import AirflowException

    from closedloop.errors import PermanentError, TransientError
    from closedloop.operators.pod import pod_failure
    from closedloop.steps.dataset import generate_dataset
    from closedloop.steps.labeling import label
    from closedloop.steps.validation import validate_data

    template = pod_project / "include" / "pipelines" / "acc_pods.yaml"
    loaded = load_spec(template)
    ctx = RunContext(pipeline="acc_pods", template_digest=loaded.digest, dag_id="acc_pods", run_id="manual__pods",
                     origin={"closedloop.trigger": "request"})
    raw = generate_dataset(loaded, ctx.for_task("generate_dataset"), interval_end=date(2026, 11, 23))
    lab = label(loaded, ctx.for_task("label"), raw=raw)
    val = validate_data(loaded, ctx.for_task("validate_data"), labelled=lab)
    from dataclasses import asdict

    payload = {"context": asdict(ctx.for_task("train")), "inputs": {"generate_dataset": raw, "label": lab,
                                                                   "validate_data": val}}
    proc, trained = podstep("train", template, payload, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(settings.tracking_uri())
    run = client.get_run(trained["run_id"])
    assert run.data.tags["closedloop.step"] == "train" and run.data.tags["closedloop.run_key"] == "acc_pods/manual__pods"
    assert run.data.tags["closedloop.dataset_version"] == lab["digest"]
    assert trained["model_uri"] == run.data.tags["closedloop.model_uri"]
    again_proc, again = podstep("train", template, payload, tmp_path)  # a retried pod: nothing new
    assert again_proc.returncode == 0 and again["run_id"] == trained["run_id"]

    sim_payload = {"context": asdict(ctx.for_task("simulate")), "inputs": {"train": trained}}
    proc, simulated = podstep("simulate", template, sim_payload, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert simulated["metrics"]["sim.collision_rate"] == 0.0 and simulated["episodes"] > 0

    # sharded: one pod per shard (the mapped task's index in the payload), the same episodes between them
    from tests.conftest import scratch_project

    sharded = scratch_project(tmp_path / "sharded") / "include" / "pipelines" / "acc_pods.yaml"
    sharded.write_text(template.read_text().replace("scenario_set: standard",
                                                    "scenario_set: standard\n  shards: {count: 2}"))
    parts = []
    for i in range(2):
        proc, part = podstep("simulate", sharded, {**sim_payload, "shard": [i, 2]}, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        parts.append(part)
    assert [p["shard"] for p in parts] == ["1/2", "2/2"] and sum(p["episodes"] for p in parts) == simulated["episodes"]
    assert len({p["run_id"] for p in parts} | {simulated["run_id"]}) == 3  # each shard its own MLflow run
    from closedloop.dagbuilder import build_dags
    from closedloop.operators.pod import StepPodOperator, pod_arguments

    mapped = build_dags(sharded.parent)["acc_pods"].get_task("simulate")
    assert mapped.operator_class is StepPodOperator or mapped.operator_class.__name__ == "StepPodOperator"
    assert pod_arguments(load_spec(sharded), load_spec(sharded).spec.kubernetes.simulate, "simulate", 1)["name"] \
        == "acc-pods-simulate-1"

    # a step that fails in the pod says whether to retry; the operator turns it into that verdict
    broken = {**payload, "inputs": {**payload["inputs"], "label": {**lab, "digest": "0" * 64}},
              "context": asdict(ctx.for_key("acc_pods/manual__pods2").for_task("train"))}
    proc, note = podstep("train", template, broken, tmp_path)
    assert proc.returncode != 0 and note["closedloop_error"]["transient"] is False
    failure = AirflowException(f"Pod acc-pods-train-x returned a failure.\n{json.dumps(note)}")
    assert isinstance(pod_failure(failure), PermanentError) and "failed its integrity check" in str(pod_failure(failure))
    proc, note = podstep("train", template, {**broken, "context": {**broken["context"],
                         "tracking_uri": "http://127.0.0.1:9"}}, tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                         MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    assert proc.returncode != 0 and note["closedloop_error"]["transient"] is True
    assert isinstance(pod_failure(AirflowException(f"Pod p returned a failure.\n{json.dumps(note)}")), TransientError)
    evicted = AirflowException("Pod acc-pods-train-x returned a failure.\nremote_pod: reason Evicted")
    assert isinstance(pod_failure(evicted), TransientError)  # no verdict: the pod died under us

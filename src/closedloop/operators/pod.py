"""``train`` and ``simulate`` as Kubernetes pods (template section ``kubernetes:``).

:class:`StepPodOperator` is Airflow's KubernetesPodOperator with the step's pod from the template
(image, namespace, CPU/memory, GPUs, node selector, tolerations, service account, secrets). On the
worker it resolves what a local step would (the run's identity and lineage, MLflow, the inputs from
XCom) and hands it to ``python -m closedloop.podstep`` in the pod, which runs the same step code;
the result comes back through the pod's XCom sidecar. Idempotency, the step cache (a step found by
``generate_dataset``'s cache plan starts no pod at all), retries for transient errors only and
alerts stay as for local steps.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowException

from closedloop.operators.base import ClosedLoopStepOperator, run_context

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.spec import LoadedSpec, PodSpec

log = logging.getLogger(__name__)

INPUTS = {"train": ("generate_dataset", "label", "validate_data"), "simulate": ("train",)}


def pod_arguments(loaded: LoadedSpec, pod: PodSpec, step: str) -> dict[str, Any]:
    """KubernetesPodOperator arguments for ``step`` from the template's pod spec."""
    from kubernetes.client import models as k8s

    requests = {k: v for k, v in {"cpu": pod.cpu, "memory": pod.memory}.items() if v}
    limits = {k: v for k, v in {"memory": pod.memory, pod.gpu_resource: str(pod.gpu) if pod.gpu else None}.items()
              if v}
    return {
        "name": f"{loaded.spec.name}-{step}".replace("_", "-"),
        "namespace": pod.namespace,
        "image": pod.image,
        "cmds": ["python", "-m", "closedloop.podstep"],
        "arguments": [step, f"include/pipelines/{loaded.path.name}"],
        "kubernetes_conn_id": pod.kubernetes_conn_id,
        "container_resources": k8s.V1ResourceRequirements(requests=requests or None, limits=limits or None),
        "node_selector": dict(pod.node_selector) or None,
        "tolerations": [k8s.V1Toleration(**t) for t in pod.tolerations] or None,
        "service_account_name": pod.service_account,
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s)) for s in pod.env_from_secrets]
        or None,
        "labels": {"app.kubernetes.io/part-of": "closedloop", "closedloop/pipeline": loaded.spec.name,
                   "closedloop/step": step},
        "startup_timeout_seconds": pod.startup_timeout_seconds,
        "do_xcom_push": True,
        "reattach_on_restart": True,  # a retried task finds its pod again instead of starting a second one
        "on_finish_action": "delete_succeeded_pod",
        "get_logs": True,
    }


class StepPodOperator(KubernetesPodOperator):
    """Run pipeline step ``step`` (``train`` or ``simulate``) in a Kubernetes pod.

    :param loaded: the validated pipeline template. :param step: ``train`` or ``simulate``.
    :param mlflow_conn_id: Airflow connection naming the MLflow tracking server.
    """

    def __init__(self, *, loaded: LoadedSpec, step: str, mlflow_conn_id: str = "mlflow_default", **kwargs: Any):
        from closedloop.retry import TransientOnlyRetryPolicy

        pod = getattr(loaded.spec.kubernetes, step)
        kwargs.setdefault("retry_policy", TransientOnlyRetryPolicy())
        super().__init__(**pod_arguments(loaded, pod, step), **kwargs)
        self.loaded = loaded
        self.step = step
        self.mlflow_conn_id = mlflow_conn_id

    def step_payload(self, context: Context) -> dict:
        """What the pod needs: the run's identity and lineage (as a local step would have it) and the inputs."""
        from dataclasses import asdict

        ctx = run_context(self.loaded, self.mlflow_conn_id, context)
        inputs = {task_id: context["ti"].xcom_pull(task_ids=task_id) for task_id in INPUTS[self.step]}
        return {"context": {**asdict(ctx), "data_root": ctx.data_root}, "inputs": inputs}

    def prepare(self, context: Context) -> None:
        from kubernetes.client import models as k8s

        payload = json.dumps(self.step_payload(context), default=str)
        self.env_vars = [e for e in (self.env_vars or []) if e.name != "CLOSEDLOOP_STEP"] + [
            k8s.V1EnvVar(name="CLOSEDLOOP_STEP", value=payload),
            k8s.V1EnvVar(name="GX_ANALYTICS_ENABLED", value="False")]

    def execute(self, context: Context) -> Any:
        planned = ClosedLoopStepOperator.planned(self, context)  # found by generate_dataset: no pod at all
        if planned is not None:
            return planned
        self.prepare(context)
        try:
            return super().execute(context)
        except AirflowException as exc:
            raise pod_failure(exc) from exc

    def execute_complete(self, context: Context, event: dict, **kwargs: Any) -> Any:
        try:
            return super().execute_complete(context, event, **kwargs)
        except AirflowException as exc:
            raise pod_failure(exc) from exc


def pod_failure(exc: AirflowException) -> Exception:
    """Turn the KubernetesPodOperator's failure into our verdict: the step's own (written by
    ``closedloop.podstep`` to the termination log, which Kubernetes puts in the failure message), or
    — a pod that died without one (evicted, OOM-killed, node lost, image pull) — transient."""
    from closedloop.errors import PermanentError, TransientError

    text = str(exc)
    start = text.find('{"closedloop_error"')
    if start >= 0:
        try:
            note = json.JSONDecoder().raw_decode(text[start:])[0]["closedloop_error"]
        except (ValueError, KeyError):
            note = None
        if note:
            kind = TransientError if note.get("transient") else PermanentError
            return kind(f"{note.get('error_class')} in the pod: {note.get('message')}")
    return TransientError(f"the step's pod failed without a verdict of its own (evicted, killed, not scheduled?): "
                          f"{text.splitlines()[0][:500]}")

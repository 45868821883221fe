"""``train`` and ``simulate`` as Kubernetes pods (template section ``kubernetes:``).

:class:`StepPodOperator` runs Airflow's KubernetesPodOperator with the step's pod from the template
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

from airflow.sdk.exceptions import AirflowException

from closedloop.operators.base import ClosedLoopStepOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.spec import LoadedSpec, PodSpec

log = logging.getLogger(__name__)



def pod_arguments(loaded: LoadedSpec, pod: PodSpec, step: str, shard: int | None = None) -> dict[str, Any]:
    """KubernetesPodOperator arguments for ``step`` (its shard ``shard``) from the template's pod spec."""
    from kubernetes.client import models as k8s

    requests = {k: v for k, v in {"cpu": pod.cpu, "memory": pod.memory}.items() if v}
    limits = {k: v for k, v in {"memory": pod.memory, pod.gpu_resource: str(pod.gpu) if pod.gpu else None}.items()
              if v}
    return {
        "name": f"{loaded.spec.name}-{step}{'' if shard is None else f'-{shard}'}".replace("_", "-"),
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
                   "closedloop/step": step, **({} if shard is None else {"closedloop/shard": str(shard)})},
        "startup_timeout_seconds": pod.startup_timeout_seconds,
        "do_xcom_push": True,
        "reattach_on_restart": True,  # a retried task finds its pod again instead of starting a second one
        "on_finish_action": "delete_succeeded_pod",
        "get_logs": True,
    }


class StepPodOperator(ClosedLoopStepOperator):
    """Run pipeline step ``step`` (``train`` or ``simulate``) in a Kubernetes pod.

    A closedloop step operator (retry policy, alerts, fault drills, the cache plan) that, when it
    runs, builds Airflow's KubernetesPodOperator for the step and runs it: the Kubernetes provider
    and client are imported then, never while the DAG file is parsed (they cost seconds).

    :param step: ``train`` or ``simulate``.
    """

    ui_color = "#e3ecfa"

    def __init__(self, *, step: str, shard: int | None = None, shards: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.shard = shard
        self.shards = shards

    def step_payload(self, context: Context) -> dict:
        """What the pod needs: the run's identity and lineage (as a local step would have it) and the inputs."""
        from dataclasses import asdict

        ctx = self.run_context(context)
        from closedloop import pipeline

        inputs = {task_id: self.upstream(context, task_id) for task_id in pipeline.step(self.step).reads}
        shard = {} if self.shard is None else {"shard": [int(self.shard), len(self.shards or ())]}
        return {"context": asdict(ctx), "inputs": inputs, **shard}

    def pod_operator(self, context: Context):
        """The KubernetesPodOperator that runs this step for this task instance."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        payload = json.dumps(self.step_payload(context), default=str)
        return KubernetesPodOperator(
            task_id=self.task_id, **pod_arguments(self.loaded, getattr(self.loaded.spec.kubernetes, self.step),
                                                  self.step, shard=self.shard),
            env_vars=[k8s.V1EnvVar(name="CLOSEDLOOP_STEP", value=payload),
                      k8s.V1EnvVar(name="GX_ANALYTICS_ENABLED", value="False")])

    def execute(self, context: Context) -> Any:
        return self.finish(context, self.guarded(context, lambda: self.planned(context) or self._run_pod(context)))

    def _run_pod(self, context: Context) -> Any:
        pod = self.pod_operator(context)
        try:
            return pod.execute(context)
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

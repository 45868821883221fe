"""The base of every closedloop operator: build the run context, call a step, map its errors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from closedloop import pipeline, vocab

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.runtime.context import RunContext
    from closedloop.spec import LoadedSpec

log = logging.getLogger(__name__)

#: the first line a step's task logs once Airflow handed it over and its DAG file is parsed
WORK_STARTS = "closedloop step %s: work starts"


class ClosedLoopStepOperator(BaseOperator):
    """Run one pipeline step of a template for the current DAG run.

    Subclasses implement :meth:`run_step`; inputs from upstream steps come from XCom (small
    JSON only). Failures go through :class:`~closedloop.retry.TransientOnlyRetryPolicy`
    (Airflow 3.3's retry policy): transient errors are retried with the task's exponential
    backoff, permanent ones — :class:`~closedloop.errors.PermanentError`, bugs — fail at once.

    :param loaded: the validated pipeline template this task belongs to.
    :param mlflow_conn_id: Airflow connection naming the MLflow tracking server (optional:
        without it, ``MLFLOW_TRACKING_URI`` or the local store).
    """

    ui_color = "#e8f1fb"

    def __init__(self, *, loaded: LoadedSpec, mlflow_conn_id: str = "mlflow_default", **kwargs: Any) -> None:
        if kwargs.get("retry_policy") is None:
            from closedloop.retry import TransientOnlyRetryPolicy

            kwargs["retry_policy"] = TransientOnlyRetryPolicy()
        if "outlets" not in kwargs and kwargs.get("task_id"):
            kwargs["outlets"] = step_assets(loaded, kwargs["task_id"])
        super().__init__(**kwargs)
        self.loaded = loaded
        self.mlflow_conn_id = mlflow_conn_id

    def run_context(self, context: Context) -> RunContext:
        return run_context(self.loaded, self.mlflow_conn_id, context)

    def upstream(self, context: Context, task_id: str, **kwargs: Any) -> dict:
        """The result of ``task_id`` in this run, believed only with its seal (:func:`read`: only what the
        step's row ``reads``)."""
        value = read(context, self.task_id, task_id, **kwargs)
        self.seen[task_id if kwargs.get("map_index") is None else f"{task_id}[{kwargs['map_index']}]"] = value
        return value

    def simulation(self, context: Context) -> dict:
        """The run's simulation result: ``merge_simulation``'s when ``simulate`` is sharded."""
        merged, alone = pipeline.SIMULATION_RESULT
        return self.upstream(context, merged if self.loaded.spec.simulation.shards else alone)

    def finish(self, context: Context, out: Any) -> Any:
        """Seal a step's result where it is born (what XCom then holds; consumers check the seal)."""
        if not isinstance(out, dict):
            return out
        self.seen[self.task_id] = out
        sealed = seal(context, out)
        for asset in self.outlets or ():  # the hand-off: an asset event per snapshot / alias, digests in extra
            extra = asset_extra(asset.uri, out)
            if extra:
                context["outlet_events"][asset].extra = extra
        return sealed

    @property
    def seen(self) -> dict[str, dict]:
        """Results this task read and made (task id → result): what OpenLineage reports, read from
        memory because the provider asks in a forked process that cannot reach XCom."""
        if "_seen" not in self.__dict__:
            self.__dict__["_seen"] = {}
        return self.__dict__["_seen"]

    def execute(self, context: Context) -> Any:
        log.info(WORK_STARTS, self.task_id)  # benchmarks/orchestration_overhead.py: task start → this line

        def body():
            if self.task_id in FIRST_TASKS:
                refuse_unreviewable(self.loaded, context)
            return self.planned(context) or self.run_step(self.run_context(context), context)

        return self.finish(context, self.guarded(context, body))

    def planned(self, context: Context) -> dict | None:
        """This step's result if ``generate_dataset`` already found it in the step cache
        (:func:`closedloop.runtime.plan.plan_ahead`): returned without importing MLflow."""
        from closedloop import pipeline
        from closedloop.runtime.cache import PLAN_KEY

        if self.task_id not in pipeline.PLANNED:
            return None
        plan = pull_sealed(context, "generate_dataset", key=PLAN_KEY, required=False)
        result = plan.get(self.task_id) if isinstance(plan, dict) else None
        if result is not None:
            log.info("cache hit for %s (key %s), found ahead by generate_dataset: reusing the result of MLflow run %s "
                     "(pipeline run %s); its hit is recorded in MLflow run %s; nothing recomputed", self.task_id,
                     result["cache"]["key"], result["cache"]["source_run_id"], result["cache"]["source_run_key"],
                     result.get("run_id", "-"))
        return result

    @staticmethod
    def guarded(context: Context, fn, *, start: bool = True, end: bool = True) -> Any:
        """Call ``fn``; on failure record the error's class, cause and whether it is transient
        in XCom (key ``error``: alerts, summaries and the UI show it without digging in logs;
        gate and validation reports travel with it), then re-raise it for the retry policy.

        ``start``/``end``: fault-drill injection points around the step (:mod:`closedloop.runtime.faults`).
        """
        from airflow.sdk.exceptions import AirflowException

        from closedloop.errors import classify
        from closedloop.runtime.faults import inject

        ti = context["ti"]
        where = {"dag_id": ti.dag_id, "task_id": ti.task_id, "try_number": int(ti.try_number or 1),
                 "map_index": None if map_index_of(ti) < 0 else map_index_of(ti)}
        try:
            if start:
                inject(**where, point="start")
            out = fn()
            if end:
                inject(**where, point="end")
            return out
        except AirflowException:  # Airflow's own control flow (skip, fail, reschedule): not ours to judge
            raise
        except Exception as exc:
            transient, reason = classify(exc)
            _push_error(context, exc, permanent=not transient)
            log.error("%s: %s", reason, exc)
            from closedloop.errors import GateFailed

            if isinstance(exc, GateFailed):  # a gate doing its job: the run says so, it did not crash
                from closedloop.hooks.airflow_api import set_run_note
                from closedloop.steps.gates import rejection_note

                set_run_note(ti.dag_id, ti.run_id, rejection_note(exc.report))
            raise

    def run_step(self, ctx: RunContext, context: Context) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_openlineage_facets_on_complete(self, task_instance):
        """Inputs and outputs for Airflow's OpenLineage provider, when it is installed."""
        from closedloop.openlineage import operator_lineage

        return operator_lineage(self, task_instance)


class StepOperator(ClosedLoopStepOperator):
    """A step that is only a function of what it reads (:data:`closedloop.pipeline.GENERIC`): its row's
    ``function(loaded, ctx, inputs)`` runs in the step's MLflow run of this pipeline run (found again on a
    retry: a finished one returns its recorded result), with the sealed results its row ``reads``."""

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.runtime import tracking
        from closedloop.runtime.context import resolve

        row = pipeline.step(pipeline.row_id(self.task_id))
        present = set(self.dag.task_ids) if self.has_dag() else set(row.reads)
        inputs = {r: self.upstream(context, r) for r in row.reads if r in present}
        run = tracking.step_run(self.loaded, ctx, row.id)
        done = tracking.finished_result(run)
        if done is not None:
            log.info("%s already finished in MLflow run %s: returning its recorded result", row.id, run.info.run_id)
            return done
        try:
            out = resolve(row.function)(self.loaded, ctx, inputs)
        except Exception:
            tracking.fail(ctx, run.info.run_id)
            raise
        if not isinstance(out, dict):
            raise TypeError(f"step function {row.function} returned {type(out).__name__}, not a dict (its result)")
        return tracking.finish(ctx, run.info.run_id, {**out, "run_id": run.info.run_id})


class TemplateErrorOperator(BaseOperator):
    """The one task of a pipeline held back by its template's error: fails with that error (no retry).

    :param message: the template error (file, field, expected, found).
    """

    ui_color = "#fde2e2"

    def __init__(self, *, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("retries", 0)
        super().__init__(**kwargs)
        self.message = message

    def execute(self, context: Context) -> None:
        raise AirflowFailException(f"held back by a template error; nothing ran:\n{self.message}")


def step_assets(loaded: LoadedSpec, task_id: str) -> list:
    """The Airflow assets a step makes (the step table's ``lineage_out``): the raw and labelled
    snapshots (``closedloop://data/<pipeline>/raw|labelled``) and the model's ``candidate`` and
    ``production`` (``closedloop://models/<model>/candidate|production``), so Airflow's asset graph
    shows data → model across DAGs and a deployment DAG can be scheduled on a promotion."""
    from airflow.sdk import Asset

    from closedloop import pipeline

    if task_id not in pipeline.BY_ID:
        return []
    spec = loaded.spec
    uris = {"raw": f"closedloop://data/{spec.name}/raw", "labelled": f"closedloop://data/{spec.name}/labelled",
            "registered": f"closedloop://models/{spec.model.name}/candidate",
            "production": f"closedloop://models/{spec.model.name}/production"}
    return [Asset(name=uris[k], uri=uris[k], group="closedloop") for k in pipeline.step(task_id).lineage_out
            if k in uris]


def asset_extra(uri: str, out: dict) -> dict | None:
    """What an asset event of ``uri`` carries: the snapshot's digest and URI, or the model version
    with its signed release record (a consumer verifies it with the published public key before it
    deploys: anyone with role ``op`` can post an asset event)."""
    if uri.startswith("closedloop://data/"):
        return {k: out.get(k) for k in ("digest", "uri", "rows", "label_policy") if out.get(k) is not None}
    if uri.endswith("/candidate"):
        return {"model": out.get("model"), "version": str(out.get("version")),
                "artifact_digest": out.get("artifact_digest"), "release_record": out}
    if uri.endswith("/production"):  # ``changed`` False: a retried promote found it already done
        return {"model": out.get("model"), "version": str(out.get("version")), "previous": out.get("previous"),
                "changed": bool(out.get("changed")), "approved_by": out.get("approved_by"),
                "release_record": out.get("release_record"), "dossier": out.get("dossier")}
    return None


#: the tasks that start a run: what Airflow's trigger form cannot refuse, they refuse before any compute
FIRST_TASKS = ("generate_dataset", "admit_incident")


def refuse_unreviewable(loaded: LoadedSpec, context: Context) -> None:
    """A request whose reviewer set would be empty fails its run's first task (no compute, no retry)."""
    from closedloop.steps.governance import check_reviewers

    check_reviewers(loaded.spec, getattr(context["dag_run"], "triggering_user_name", None) or None)


def seal(context: Context, value: dict, key: str = "return_value") -> dict:
    """``value`` sealed for this task instance (and XCom ``key``) with the deployment's key."""
    from closedloop.hooks.signing import signer
    from closedloop.runtime.signing import Binding

    ti = context["ti"]
    return signer().seal(value, Binding(ti.dag_id, ti.run_id, ti.task_id, _mapped(key, map_index_of(ti))))


def map_index_of(ti) -> int:
    """A task instance's map index (a shard of ``simulate``); -1 for an unmapped one."""
    value = getattr(ti, "map_index", None)
    return -1 if value is None else int(value)


def _mapped(key: str, map_index: int | None) -> str:
    """The XCom key a seal binds to: a mapped task instance's (one per shard) names its map index,
    so one shard's sealed result cannot stand in for another's."""
    return key if map_index is None or int(map_index) < 0 else f"{key}[{int(map_index)}]"


def pull_sealed(context: Context, task_id: str, key: str = "return_value", *, required: bool = True,
                map_index: int | None = None) -> dict | None:
    """Task ``task_id``'s XCom ``key`` in this run, once its seal proves the pipeline wrote it there.

    XCom is editable by any user with role ``user`` (``PATCH …/xcomEntries``): an unsealed value,
    one changed after sealing, or one sealed for another run or task raises
    :class:`~closedloop.errors.EvidenceError` (permanent: no retry). ``required=False``: None when
    the task pushed nothing.
    """
    from closedloop.hooks.signing import verifier
    from closedloop.runtime.signing import Binding

    ti = context["ti"]
    if map_index is None:
        value = ti.xcom_pull(task_ids=task_id, key=key)
    else:
        value = ti.xcom_pull(task_ids=task_id, key=key, map_indexes=map_index)
    if value is None and not required:
        return None
    where = task_id if map_index is None else f"{task_id}[{map_index}]"
    if not isinstance(value, dict):
        raise AirflowFailException(f"expected the result of upstream task {where!r} in XCom, got {value!r}")
    what = f"the result of task {where!r}" + ("" if key == "return_value" else f" (XCom {key!r})")
    return verifier().unseal(value, Binding(ti.dag_id, ti.run_id, task_id, _mapped(key, map_index)),
                                    what=what)


def run_context(loaded: LoadedSpec, mlflow_conn_id: str, context: Context) -> RunContext:
    """The step context of the current task instance, with MLflow resolved through the hook."""
    import os

    from closedloop.hooks.mlflow import MLflowHook
    from closedloop.runtime.context import RunContext

    hook = MLflowHook(mlflow_conn_id)
    os.environ.update(hook.credentials_env())  # MLflow's client reads credentials from the environment
    ti = context["ti"]
    return RunContext(pipeline=loaded.spec.name, template_digest=loaded.digest,
                      dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
                      try_number=int(ti.try_number or 1), tracking_uri=hook.tracking_uri(),
                      origin=origin_of(loaded, context), use_cache=uses_cache(context),
                      map_index=map_index_of(ti))


def uses_cache(context: Context) -> bool:
    """False when the run's conf says ``closedloop_cache: false`` (or ``closedloop rerun --no-cache``)."""
    conf = getattr(context["dag_run"], "conf", None) or {}
    rerun = rerun_of(context) or {}
    return conf.get(vocab.CONF_CACHE, True) is not False and not rerun.get("no_cache")


RUN_TYPES = {"scheduled": "schedule", "backfill": "backfill", "manual": "request", "asset_triggered": "asset"}


def read(context: Context, reader: str, source: str, **kwargs: Any) -> Any:
    """What task ``reader`` may read of this run: the sealed result of ``source`` (:func:`pull_sealed`), if
    ``reader``'s row in :data:`closedloop.pipeline.STEPS` lists it in ``reads`` — a step sees exactly the
    inputs its row declares (what a pod is handed, what OpenLineage reports); anything else is a bug."""
    from closedloop.errors import PermanentError

    if not pipeline.may_read(reader, source):
        raise PermanentError(f"step {reader!r} reads the result of {source!r}, which its row in "
                             f"closedloop.pipeline.STEPS does not list in 'reads' "
                             f"({', '.join(pipeline.step(pipeline.row_id(reader)).reads) or 'none'}): add it there")
    return pull_sealed(context, source, **kwargs)


def admission(loaded: LoadedSpec, context: Context) -> dict | None:
    """The ``admit_incident`` result of an incident run (None in other DAGs)."""
    spec = loaded.spec
    ti = context["ti"]
    if spec.incidents is None or ti.dag_id != spec.incident_dag_id or ti.task_id == "admit_incident":
        return None
    value = pull_sealed(context, "admit_incident", required=False)
    return value if isinstance(value, dict) and value.get("incidents") else None


def rerun_of(context: Context) -> dict | None:
    """``closedloop rerun``'s instructions in the run's conf (None for other runs), checked: every step asks
    (its lineage names the original), so the run's first step refuses a malformed one before any compute.

    :raises PermanentError: naming what is wrong (e.g. a snapshot named by a URI instead of its digest).
    """
    from closedloop.errors import PermanentError
    from closedloop.spec.request import parse_rerun

    conf = getattr(context["dag_run"], "conf", None) or {}
    if conf.get(vocab.CONF_RERUN) is None:
        return None
    try:
        return parse_rerun(conf[vocab.CONF_RERUN])
    except ValueError as exc:
        raise PermanentError(str(exc)) from None


def origin_of(loaded: LoadedSpec, context: Context) -> dict[str, str]:
    """Lineage tags naming what started this run."""
    rerun = rerun_of(context)
    extra = {vocab.RERUN_OF: str(rerun["of"])} if rerun else {}
    admitted = admission(loaded, context)
    if admitted is not None:
        from closedloop.steps.incidents import origin_tags

        return {**origin_tags(admitted["incidents"]), **extra}
    if rerun:
        user = getattr(context["dag_run"], "triggering_user_name", None)
        return {vocab.TRIGGER: "rerun", **extra, **({vocab.REQUESTER: str(user)} if user else {})}
    dag_run = context["dag_run"]
    run_type = getattr(dag_run.run_type, "value", dag_run.run_type)
    tags = {vocab.TRIGGER: RUN_TYPES.get(str(run_type), str(run_type))}
    user = getattr(dag_run, "triggering_user_name", None)
    if user:
        tags[vocab.REQUESTER] = str(user)
    recalled = (getattr(dag_run, "conf", None) or {}).get(vocab.CONF_RECALL)
    if isinstance(recalled, dict) and recalled.get("id"):
        tags[vocab.RETRAIN_FOR] = str(recalled["id"])[:40]
    return tags


def requesters(loaded: LoadedSpec, context: Context) -> list[str]:
    """The people behind this run, who may not review it: the Airflow user who triggered it, the opener of
    the recall it retrains for and, in an incident run, the users who posted its incidents (from Airflow's
    audit log; watchers are no one)."""
    people = {getattr(context["dag_run"], "triggering_user_name", None)}
    recalled = (getattr(context["dag_run"], "conf", None) or {}).get(vocab.CONF_RECALL)
    if isinstance(recalled, dict) and recalled.get("opened_by"):  # a recall's retrain: its opener asked for it
        people.add(str(recalled["opened_by"]))
    admitted = admission(loaded, context)
    if admitted is not None:
        people |= {i.get("posted_by") for i in admitted["incidents"]}
    return sorted(p for p in people if p and not str(p).startswith("system:"))


def request_of(loaded: LoadedSpec, context: Context) -> tuple[dict, str | None]:
    """The run's model update request and requester: an incident run's comes from its incident,
    any other run's from its params (the trigger form, REST ``conf``, or the schedule's default)."""
    from closedloop.spec.request import FIELDS

    admitted = admission(loaded, context)
    if admitted is not None:
        first = admitted["incidents"][0]
        posted = first.get("posted_by") or "unknown"
        return admitted["request"], (f"incident {first['id']} (posted by {posted}; reported by "
                                     f"{first.get('reported_by') or 'fleet'})")
    user = getattr(context["dag_run"], "triggering_user_name", None) or None
    return {k: context["params"].get(k) for k in FIELDS}, user


def _push_error(context: Context, exc: Exception, *, permanent: bool) -> None:
    error = {"error_class": type(exc).__name__, "message": str(exc), "permanent": permanent}
    for attr in ("report",):
        if getattr(exc, attr, None) is not None:
            error[attr] = getattr(exc, attr)
    try:
        context["ti"].xcom_push(key="error", value=error)
    except Exception:  # never hide the real error behind a bookkeeping one
        log.warning("could not record the error in XCom", exc_info=True)


class DeploymentActionOperator(BaseOperator):
    """A governed action the deployment takes for the person who triggered the run (registry moves, recalls):
    retried only for transient errors, its error recorded like a step's, its result sealed. Subclasses define
    ``act(context)``.

    :param specs: the templates it acts for (trusted: templates are reviewed code).
    """

    def __init__(self, *, specs: list[LoadedSpec], **kwargs: Any) -> None:
        from closedloop.retry import TransientOnlyRetryPolicy

        kwargs.setdefault("retry_policy", TransientOnlyRetryPolicy())
        super().__init__(**kwargs)
        self.specs = specs

    def execute(self, context: Context) -> Any:
        out = ClosedLoopStepOperator.guarded(context, lambda: self.act(context))
        return seal(context, out)

    def act(self, context: Context) -> dict:
        raise NotImplementedError

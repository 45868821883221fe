"""THE step table: one row per step of the closed loop.

The DAG builder (operators, edges, retries), ``describe`` and the DAG docs, the local run's
order, the cacheable set and the cache plan, pod inputs and OpenLineage all read this table;
adding a step is one row here (plus its operator and step function). Nothing is imported here:
the DAG processor reads it at parse time.

Columns:

- ``id``: the task id.
- ``operator``: ``module:Class`` of the Airflow operator (imported when a DAG is built); a step that needs
  no Airflow behaviour of its own names :data:`GENERIC` and its ``function``.
- ``function``: for :data:`GENERIC` rows, ``module:function`` of the step function, called as
  ``function(loaded, ctx, inputs)`` with the sealed results its row ``reads`` (``inputs``: step id →
  result); it returns the step's result (a small JSON dict). The operator gives it its MLflow run (one per
  pipeline run, found again on a retry), records the result and seals it.
- ``upstream``: the steps it runs after (the DAG's edges).
- ``reads``: the steps whose results it reads (a pod is handed these; OpenLineage's inputs).
- ``cacheable``: found in the step cache when its inputs are identical; ``plan`` names the
  ``module:function`` that computes its cache key and tags from the results found so far
  (``generate_dataset``'s cache hit follows the chain through the later steps).
- ``code`` / ``entry_point``: the step module and the template field naming its entry point: with
  the library versions (and a pod's image) they are the step's code identity in its cache key
  (:mod:`closedloop.runtime.identity`).
- ``retry``: ``transient`` (retried with backoff on transient errors only), ``decision`` (a human
  decision: asked once; recording it is retried on transient errors, and a retry records the answer
  already given instead of asking again) or ``never``.
- ``when``: the template section the step needs (``hil``, ``approval``, ``incidents``, ``shards``:
  ``simulation.shards``), else always.
- ``lineage_in`` / ``lineage_out``: what the step consumes and makes, by kind (``sources``,
  ``raw``, ``labelled``, ``model``, ``scenarios``, ``registered``, ``production``).
- ``crash_points``: the step's fault-drill points in order — after each side effect — and what a retry
  after a crash there does (:func:`closedloop.runtime.faults.matrix`, the README's crash-point table
  and the reliability tests read them).
- ``fan_out``: how one row becomes several tasks: ``quorum`` (one task per required approval, one after
  the other: ``approval``, ``approval_2`` …) or ``shards`` (one mapped task instance per simulation
  shard, when the template has ``simulation.shards``); else one task.
- ``doc``: one line for ``describe`` and the DAG's docs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    id: str
    operator: str
    doc: str
    upstream: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    cacheable: bool = False
    plan: str | None = None
    code: str | None = None
    entry_point: str | None = None
    retry: str = "transient"
    when: str | None = None
    pod: bool = False
    lineage_in: tuple[str, ...] = ()
    lineage_out: tuple[str, ...] = ()
    crash_points: tuple[tuple[str, str], ...] = ()
    fan_out: str | None = None
    function: str | None = None


OPS = "closedloop.operators"
STEPS_PKG = "closedloop.steps"
GENERIC = f"{OPS}.base:StepOperator"
"""The operator of a step that is only a function of what it reads (its row's ``function``)."""
GENERIC_CRASH_POINTS = (
    ("run_created", "carries on in the same MLflow run"),
    ("before_finish", "calls the function again on the same inputs and finishes the same run"),
    ("end", "returns the recorded result"),
)
"""What a retry of a :data:`GENERIC` step does after a crash at each of its points."""

STEPS: tuple[Step, ...] = (
    Step("admit_incident", f"{OPS}.incidents:AdmitIncidentOperator", when="incidents", retry="never",
         doc="admit the run's incidents (malformed ones fail it), debounce repeats, say what to mine more of"),
    Step("generate_dataset", f"{OPS}.data:GenerateDatasetOperator", upstream=("admit_incident",), cacheable=True,
         reads=("admit_incident",), code=f"{STEPS_PKG}.dataset", entry_point="dataset.generator",
         lineage_in=("sources",), lineage_out=("raw",),
         crash_points=(
             ("run_created", "finds its MLflow run by the run's tags and carries on in it"),
             ("snapshot_written", "writes the same bytes under the same sha256 name: the file is checked, not doubled"),
             ("before_finish", "the same: one run, one snapshot"),
             ("end", "the run is FINISHED: returns its recorded result"),
         ),
         doc="build the raw fleet-log snapshot for the run's data window (Parquet, content-addressed)"),
    Step("label", f"{OPS}.data:LabelOperator", upstream=("generate_dataset",), reads=("generate_dataset",),
         cacheable=True, plan=f"{STEPS_PKG}.labeling:plan", code=f"{STEPS_PKG}.labeling",
         entry_point="label_policy.entry_point", lineage_in=("raw",), lineage_out=("labelled",),
         crash_points=(
             ("run_created", "carries on in the same MLflow run"),
             ("snapshot_written", "the labelled snapshot is already there under its sha256: checked, not doubled"),
             ("before_finish", "the same"),
             ("end", "returns the recorded result"),
         ),
         doc="apply the label policy; write the labelled snapshot"),
    Step("validate_data", f"{OPS}.data:ValidateDataOperator", upstream=("label",), reads=("label",), cacheable=True,
         plan=f"{STEPS_PKG}.validation:plan", code=f"{STEPS_PKG}.validation", lineage_in=("labelled",),
         crash_points=(
             ("run_created", "carries on in the same MLflow run"),
             ("before_finish", "validates again (no side effect) and finishes the same run"),
             ("end", "returns the recorded result"),
         ),
         doc="check the labelled snapshot with the Great Expectations suite; stop on failure"),
    Step("train", f"{OPS}.model:TrainOperator", upstream=("validate_data",),
         reads=("generate_dataset", "label", "validate_data"), cacheable=True, plan=f"{STEPS_PKG}.training:plan",
         code=f"{STEPS_PKG}.training", entry_point="training.entry_point",
         pod=True, lineage_in=("labelled",), lineage_out=("model",),
         crash_points=(
             ("run_created", "carries on in the same MLflow run"),
             ("before_checkpoint", "finds the model the dead try logged (its logged model, READY) and tags it: no second model"),
             ("model_logged", "the checkpoint tag names the model: reused, not trained again"),
             ("before_finish", "the same"),
             ("end", "returns the recorded result"),
         ),
         doc="fit the trainer; log params, dataset input and model to MLflow"),
    Step("offline_eval", f"{OPS}.model:OfflineEvalOperator", upstream=("train", "label"), reads=("label", "train"),
         cacheable=True, plan=f"{STEPS_PKG}.evaluation:plan", code=f"{STEPS_PKG}.evaluation",
         lineage_in=("labelled", "model"),
         crash_points=(
             ("run_created", "carries on in the same MLflow run"),
             ("before_finish", "logs the same metrics again in the same run"),
             ("end", "returns the recorded result"),
         ),
         doc="metrics on held-out episodes of the same snapshot, overall and per group"),
    Step("simulate", f"{OPS}.simulation:SimulateOperator", upstream=("offline_eval",), reads=("train",),
         cacheable=True, plan=f"{STEPS_PKG}.simulation:plan", code=f"{STEPS_PKG}.simulation",
         entry_point="simulation.entry_point", pod=True, lineage_in=("model", "scenarios"),
         crash_points=(
             ("run_created", "carries on in the same MLflow run"),
             ("job_launched", "attaches to the running (or finished) job of this run: no second job"),
             ("before_finish", "collects the same job's result into the same run"),
             ("end", "returns the recorded result"),
         ),
         fan_out="shards", doc="closed-loop simulation as a separate job, awaited in the triggerer (no worker slot)"),
    Step("merge_simulation", f"{OPS}.simulation:MergeSimulationOperator", upstream=("simulate",),
         reads=("train", "simulate"), when="shards", code=f"{STEPS_PKG}.simulation", entry_point="simulation.summarize",
         lineage_in=("scenarios",),
         crash_points=(
             ("run_created", "carries on in the same MLflow run"),
             ("before_finish", "merges the same shards' episodes again into the same run"),
             ("end", "returns the recorded result"),
         ),
         doc="merge the simulation shards' episodes (catalog order) into the run's simulation metrics"),
    Step("await_hil", f"{OPS}.governance:HilResultsOperator", upstream=("simulate", "merge_simulation"), when="hil",
         retry="decision",
         doc="wait (no worker slot) for the hardware-in-the-loop rig's results; none in time fails the run"),
    Step("release_gate", f"{OPS}.model:ReleaseGateOperator", upstream=("simulate", "merge_simulation", "await_hil"),
         reads=("offline_eval", "simulate", "merge_simulation", "await_hil", "train"), lineage_in=("model",),
         crash_points=(
             ("run_created", "carries on in the same MLflow run"),
             ("before_finish", "judges the same metrics again"),
             ("end", "returns the recorded result"),
         ),
         doc="compare metrics with the gate thresholds; stop (no retry) if any fails"),
    Step("register_candidate", f"{OPS}.model:RegisterCandidateOperator", upstream=("release_gate",),
         reads=("train", "label", "release_gate"), lineage_in=("model",), lineage_out=("registered",),
         crash_points=(
             ("version_registered", "finds the version this run registered (its tags and source) and describes it: no second version"),
             ("version_described", "the same version"),
             ("record_sealed", "seals the same record again"),
             ("alias_moved", "candidate already points at it"),
             ("end", "the same"),
         ),
         doc="register one model version per run, seal its release record, set alias 'candidate'"),
    Step("approval", f"{OPS}.governance:ReviewOperator", upstream=("register_candidate",), reads=("register_candidate", "release_gate"),
         when="approval", retry="decision",
         crash_points=(
             ("decision_received", "the retry reads the reviewer's answer to the earlier try from Airflow and records it: never asked again, one audit entry"),
         ),
         fan_out="quorum", doc="wait (no worker slot) for an approver's decision in Airflow; timeout = rejection"),
    Step("dossier", f"{OPS}.governance:DossierOperator", upstream=("register_candidate", "approval"),
         reads=("generate_dataset", "label", "validate_data", "train", "offline_eval", "simulate", "merge_simulation",
                "await_hil", "release_gate", "register_candidate", "approval"), lineage_in=("registered",),
         crash_points=(
             ("run_created", "carries on in the same MLflow run"),
             ("bundle_written", "assembles and writes the same bundle again: the same bytes, the same digest"),
             ("before_finish", "the same bundle; names it on the version"),
             ("end", "returns the recorded result"),
         ),
         doc="assemble, sign and write the release dossier (JSON + HTML + evidence; verifiable offline)"),
    Step("promote", f"{OPS}.governance:PromoteOperator", upstream=("dossier",),
         reads=("register_candidate", "approval", "dossier"), when="approval", lineage_in=("registered",),
         lineage_out=("production",),
         crash_points=(
             ("promotion_recorded", "finds its own sealed promotion record (same version, same run) and moves the aliases: no second record"),
             ("previous_moved", "the same record; moves production"),
             ("production_moved", "production already points at it: nothing changes, and the record was written before the move"),
             ("end", "the same"),
         ),
         doc="verify the sealed release record and approvals for this exact version; move alias 'production'"),
)

BY_ID: dict[str, Step]
ORDER: tuple[str, ...]
CACHEABLE: tuple[str, ...]
"""Steps the step cache may answer, in order; the first one's hit plans the others (:mod:`closedloop.runtime.plan`)."""
PLANNED: tuple[str, ...]
"""Cacheable steps whose result the first one's cache hit may find ahead of time."""
RETRYABLE: tuple[str, ...]
POD_STEPS: tuple[str, ...]
SIMULATION_RESULT = ("merge_simulation", "simulate")
"""Where a run's simulation metrics are: the merge of the shards when ``simulate`` is sharded, else ``simulate``."""


def _index(steps: tuple[Step, ...]) -> None:
    """The table and what is derived from it, as module attributes (read them as ``pipeline.X``)."""
    global STEPS, BY_ID, ORDER, CACHEABLE, PLANNED, RETRYABLE, POD_STEPS
    ids = [s.id for s in steps]
    if len(set(ids)) != len(ids):
        raise ValueError(f"step ids must be unique: {ids}")
    for s in steps:
        unknown = [u for u in (*s.upstream, *s.reads) if u not in ids]
        if unknown:
            raise ValueError(f"step {s.id!r} names steps the table does not have: {unknown}")
        if s.operator == GENERIC and not s.function:
            raise ValueError(f"step {s.id!r} uses the generic operator: its row needs a 'function'")
    STEPS = tuple(steps)
    BY_ID = {s.id: s for s in STEPS}
    ORDER = tuple(ids)
    CACHEABLE = tuple(s.id for s in STEPS if s.cacheable)
    PLANNED = CACHEABLE[1:]
    RETRYABLE = tuple(s.id for s in STEPS if s.retry == "transient" and s.id != "admit_incident")
    POD_STEPS = tuple(s.id for s in STEPS if s.pod)


_index(STEPS)


def with_row(row: Step, *, before: str | None = None):
    """A context manager in which the table has one more row (before ``before``, else last): how a test
    shows that a new step is one row and one function. The table is restored on exit."""
    from contextlib import contextmanager

    @contextmanager
    def _cm():
        saved = STEPS
        at = ORDER.index(before) if before else len(saved)
        _index((*saved[:at], row, *saved[at:]))
        try:
            yield BY_ID[row.id]
        finally:
            _index(saved)

    return _cm()


RUN_CONTEXT: tuple[str, ...] = ("admit_incident",)
"""Results every step may read besides its ``reads``: what started the run (an incident run's admission)."""


def step(step_id: str) -> Step:
    return BY_ID[step_id]


def row_id(task_id: str) -> str:
    """The row a task belongs to: ``approval_2`` (the second approval of a quorum) is a task of ``approval``."""
    base, _, n = task_id.rpartition("_")
    return base if n.isdigit() and base in BY_ID else task_id


def may_read(reader: str, source: str) -> bool:
    """Whether task ``reader`` may read the result of task ``source``: its row's ``reads``, its own row's
    tasks (a quorum's earlier approvals, its own earlier try), and :data:`RUN_CONTEXT`."""
    mine, theirs = row_id(reader), row_id(source)
    return mine == theirs or theirs in RUN_CONTEXT or theirs in BY_ID[mine].reads


def steps_of(*, hil: bool, approval: bool, incidents: bool = False, shards: bool = False) -> tuple[Step, ...]:
    """The steps of one DAG: the conditional ones only where the template has their section."""
    present = {"hil": hil, "approval": approval, "incidents": incidents, "shards": shards}
    return tuple(s for s in STEPS if s.when is None or present[s.when])

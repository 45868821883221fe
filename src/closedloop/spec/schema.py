"""Pipeline templates: the typed, validated schema and the loader.

A template is one YAML file in ``include/pipelines/``; it becomes one :class:`PipelineSpec`.
Every error names the file and the field path, says what was expected and what was found,
and, where it can, how to fix it. The schema here is the single source of truth: validation,
``closedloop pipelines describe`` and each DAG's ``doc_md`` all derive from it.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from closedloop import pipeline, vocab
from closedloop.errors import SpecError

NAME_RE = r"^[a-z][a-z0-9_]{1,62}$"
SOURCE_RE = r"^[A-Za-z0-9_.:/@+-]{1,200}$"
"""A fleet-log source name: no wildcards, commas, quotes or spaces (it is searched for in MLflow)."""
VERSION_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster; parse time is sacred


class _Loader(_BASE_LOADER):
    """YAML that refuses a key written twice in one mapping (YAML would keep the last one silently:
    a second ``adaptive:`` or ``max:`` added below the first would quietly replace it)."""


def _unique_mapping(loader, node, deep=False):
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (list, dict)) and key in seen and key_node.tag != "tag:yaml.org,2002:merge":
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                f"{key_node.start_mark.line + 1}): keep one", key_node.start_mark)
        seen.setdefault(key, key_node.start_mark.line)
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
_LOADER = _Loader
ENTRY_POINT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
Scalar = str | int | float | bool


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_entry_point(value: str) -> str:
    if not ENTRY_POINT_RE.match(value):
        raise ValueError(f"expected an entry point 'package.module:function', e.g. "
                         f"'closedloop.driving.policy:train_policy', got {value!r}")
    module = value.split(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ValueError(f"module {module!r} of entry point {value!r} cannot be found; "
                         "is the package that provides it installed?")
    return value


EntryPoint = Annotated[str, Field(description="an importable 'package.module:function'")]


class ModelSpec(_Part):
    """The registered model this pipeline produces."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{1,99}$",
                      description="MLflow registered model name")
    description: str = Field(default="",
                             description="the registered model's description heading (the model card follows)")


class DatasetSpec(_Part):
    """Which fleet logs make the training snapshot."""

    generator: EntryPoint = "closedloop.driving.logs:synthesize_drive_logs"
    sources: list[Annotated[str, Field(pattern=SOURCE_RE)]] = Field(
        min_length=1, description="fleet log sources, e.g. regions (letters, digits and _ . : / @ + -)")
    window_days: int = Field(ge=1, le=366, description="days of logs up to the run's data interval end")
    scenarios: list[str] = Field(min_length=1, description="scenario-type filter")
    params: dict[str, Scalar] = Field(default_factory=dict, description="extra generator arguments")
    sampling: dict[str, float] = Field(default_factory=dict, description="share of each scenario type's logs "
                                       "to sample (default 1.0); passed to the generator as 'focus'")
    seed: int = Field(default=0,
                      description="random seed of the generator (the same seed and window give the same snapshot)")

    _ep = field_validator("generator")(lambda cls, v: _check_entry_point(v))

    @model_validator(mode="after")
    def _sampling_keys(self) -> DatasetSpec:
        unknown = sorted(set(self.sampling) - set(self.scenarios))
        if unknown:
            raise ValueError(f"sampling names scenario types {unknown} that are not in scenarios {self.scenarios}")
        negative = sorted(k for k, v in self.sampling.items() if v < 0)
        if negative:
            raise ValueError(f"sampling rates must be >= 0; got negative rates for {negative}")
        return self

    @field_validator("sources", "scenarios")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dupes = sorted({x for x in v if v.count(x) > 1})
        if dupes:
            raise ValueError(f"expected unique values, got duplicates {dupes}")
        return v


class LabelPolicySpec(_Part):
    """How labels are made; name and version are recorded on every run and model."""

    name: str = Field(pattern=NAME_RE, description="label policy name, recorded on every run and version")
    version: str = Field(pattern=VERSION_RE, description="its version; a new version misses the label cache")
    entry_point: EntryPoint = "closedloop.driving.labels:expert_acceleration"
    params: dict[str, Scalar] = Field(default_factory=dict,
                                      description="extra arguments of the label policy's entry point")

    _ep = field_validator("entry_point")(lambda cls, v: _check_entry_point(v))

    @field_validator("version", mode="before")
    @classmethod
    def _version_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class ValidationSpec(_Part):
    """The Great Expectations suite a labelled snapshot must pass."""

    suite: str = Field(pattern=r"^[A-Za-z0-9_.-]+$",
                       description="file name (without .json) under include/expectations/")


class TrainingSpec(_Part):
    """How the model is trained on the labelled snapshot."""

    entry_point: EntryPoint = "closedloop.driving.policy:train_policy"
    hyperparameters: dict[str, Scalar] = Field(default_factory=dict,
                                               description="given to the training entry point and logged as "
                                                           "MLflow params")
    test_fraction: float = Field(default=0.2, gt=0.0, lt=0.9,
                                 description="share of episodes held out for offline evaluation (split by episode)")
    target: str = Field(default="target_accel", description="label column the model predicts")

    _ep = field_validator("entry_point")(lambda cls, v: _check_entry_point(v))


OfflineMetric = Literal["mae", "rmse", "max_abs_error", "bias"]


class EvaluationSpec(_Part):
    """Offline evaluation on the held-out episodes."""

    metrics: list[OfflineMetric] = Field(default_factory=lambda: ["mae", "rmse"], min_length=1,
                                       description="offline metrics computed on the held-out episodes")
    group_by: str = Field(default="scenario", description="column whose values get per-group metrics")


class ShardsSpec(_Part):
    """How ``simulate`` is split: ``by: scenario_type`` (one shard per scenario type of the scenario
    set) or ``count: N`` (the catalog's episodes in N contiguous slices)."""

    by: Literal["scenario_type", "episodes"] = Field(default="episodes",
                                                     description="scenario_type: one shard per scenario type; "
                                                                 "episodes: count shards of contiguous episodes")
    count: int | None = Field(default=None, ge=1, le=256, description="number of shards (by: episodes)")

    @model_validator(mode="after")
    def _count(self) -> ShardsSpec:
        if self.by == "episodes" and self.count is None:
            raise ValueError("shards by episodes need 'count: N' (1 to 256), e.g. shards: {count: 4}")
        if self.by == "scenario_type" and self.count is not None:
            raise ValueError("shards by scenario_type are one per scenario type: remove 'count', or use "
                             "'by: episodes' with it")
        return self


class AdaptiveSpec(_Part):
    """An adaptive simulation budget: simulate further rounds of the catalog (the same scenarios,
    fresh seeds) until every ``sim.*`` rate gate with ``confidence`` is decided — its bound on the
    pass side, or the other bound past it — or the next round would pass ``max_episodes``."""

    max_episodes: int = Field(ge=1, le=10_000_000, description="the most episodes simulated in all rounds "
                              "(whole rounds of the catalog, the first included)")


class SimulationSpec(_Part):
    """Closed-loop simulation of the trained model on the scenario set (and the regression catalog)."""

    entry_point: EntryPoint = "closedloop.driving.simulator:run_catalog"
    scenario_set: str = Field(pattern=r"^[A-Za-z0-9_.-]+$",
                              description="file name (without .yaml) under include/scenarios/")
    timeout_minutes: int = Field(default=60, ge=1, le=24 * 60,
                                 description="a simulation job running longer fails the task")
    dead_after_seconds: float = Field(default=60, ge=3, le=3600, description="a job silent this long (no "
                                      "heartbeat in its job folder, seen from any host) is declared dead")
    defer_after_seconds: float = Field(default=30, ge=0, le=3600, description="wait for the job in the task "
                                       "this long; only a longer job defers to the triggerer, freeing the worker "
                                       "slot (0: always defer)")
    shards: ShardsSpec | None = Field(default=None, description="fan simulate out over shards (Airflow dynamic "
                                      "task mapping), merged by merge_simulation; none: one job")
    summarize: EntryPoint = Field(default="closedloop.driving.simulator:summarize", description="aggregation of "
                                  "per-episode records into metrics (the merge of shards uses the same one)")
    adaptive: AdaptiveSpec | None = Field(default=None, description="keep simulating more seeds until the "
                                          "confidence gates decide or max_episodes is spent (with shards, every "
                                          "round fans out over them); none: the catalog once")

    _ep = field_validator("entry_point", "summarize")(lambda cls, v: _check_entry_point(v))


class GateSpec(_Part):
    """One automatic release gate: a metric and a bound (``min``, ``max``) and/or no regression
    against the current ``production`` version beyond ``max_regression``."""

    metric: str = Field(pattern=r"^(offline|sim|hil|shift)\.[a-z0-9_.]+$",
                        description="'offline.<metric>', 'sim.<metric>', 'hil.<metric>' or 'shift.<feature>.psi|ks' "
                                    "(distribution shift from production's training data), e.g. "
                                    "sim.hard_braking.collision_rate, shift.ego_speed.psi")
    min: float | None = Field(default=None, description="the metric must be at least this")
    max: float | None = Field(default=None, description="the metric must be at most this")
    max_regression: float | None = Field(default=None, ge=0,
                                         description="allowed worsening vs production (absolute)")
    higher_is_better: bool = Field(default=False, description="direction, for max_regression")
    confidence: float | None = Field(default=None, ge=0.5, lt=1.0, description="judge a rate by its confidence "
                                     "bound at this level, not its point estimate: the upper bound must be <= max "
                                     "(the lower bound >= min); needs the counts behind the rate (e.g. "
                                     "sim.collisions and sim.episodes for sim.collision_rate)")
    method: Literal["clopper_pearson", "wilson"] = Field(default="clopper_pearson", description="confidence "
                                                         "interval of a rate gate with 'confidence'")
    description: str = Field(default="", description="why the gate exists (shown in the gate report and the dossier)")

    @model_validator(mode="after")
    def _bounds(self) -> GateSpec:
        if self.min is None and self.max is None and self.max_regression is None:
            raise ValueError(f"gate on {self.metric!r} needs a bound: expected 'min:', 'max:' and/or "
                             "'max_regression:', got none")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"gate on {self.metric!r} can never pass: min {self.min} > max {self.max}")
        if self.confidence is not None:
            if not self.metric.endswith("_rate"):
                raise ValueError(f"gate on {self.metric!r}: 'confidence' applies to a rate (a metric named "
                                 "'<prefix>.<event>_rate' with '<prefix>.<event>s' and '<prefix>.episodes' beside it)")
            if self.max == 0.0:
                raise ValueError(f"gate on {self.metric!r} can never pass: with 'confidence' the upper bound of a "
                                 "rate is above 0 however many episodes pass; give a max above 0 (e.g. 0.01)")
        return self

    def describe(self) -> str:
        parts = [f">= {self.min:g}" if self.min is not None else "", f"<= {self.max:g}" if self.max is not None else "",
                 (f"no worse than production by > {self.max_regression:g} "
                  f"({'higher' if self.higher_is_better else 'lower'} is better)")
                 if self.max_regression is not None else ""]
        bound = (f" (its {self.confidence:.0%} {self.method.replace('_', '-').title()} bound)"
                 if self.confidence is not None else "")
        return f"{self.metric}{bound} " + " and ".join(p for p in parts if p)


class HilSpec(_Part):
    """Hardware-in-the-loop results an external rig reports through Airflow's REST API."""

    reporter: str = Field(min_length=1, description="Airflow user the rig authenticates as")
    timeout_minutes: float = Field(default=240, gt=0, description="no report by then fails the run")


class ApprovalSpec(_Part):
    """Human review between ``register_candidate`` and ``promote``; without it a pipeline only
    produces candidates and never touches ``production``."""

    approvers: list[str] = Field(min_length=1, description="Airflow user names allowed to approve")
    timeout_hours: float = Field(default=72, gt=0, description="no decision by then counts as a rejection")
    required: int = Field(default=1, ge=1, le=5, description="distinct approvals needed (2 = the two-person rule)")
    valid_hours: float | None = Field(default=None, gt=0, description="an approval promotes only within this many "
                                      "hours of the decision (default: timeout_hours)")
    rollback: list[str] = Field(default_factory=list, description="Airflow users who may roll production back "
                                "besides the approvers")
    alias_poll_seconds: float = Field(default=30, ge=1, le=3600, description="how often the alias watcher "
                                      "compares production/candidate with the sealed records")

    @model_validator(mode="after")
    def _enough_approvers(self) -> ApprovalSpec:
        if len(set(self.approvers)) < self.required:
            raise ValueError(f"required: {self.required} distinct approvals need at least {self.required} approvers, "
                             f"got {sorted(set(self.approvers))}")
        return self

    @property
    def valid_hours_or_default(self) -> float:
        return self.valid_hours if self.valid_hours is not None else self.timeout_hours


class RecallSpec(_Part):
    """Who may open a recall that touches this pipeline's models, and what a recall may take out of
    its data (``closedloop recall open``)."""

    openers: list[str] = Field(default_factory=list, description="Airflow users who may open a recall touching "
                               "this pipeline (default: the approvers)")
    may_exclude: list[str] | None = Field(default=None, description="sources a recall may take out of the data "
                                          "for its retrain (default: every source of dataset.sources)")
    retrain: bool = Field(default=True, description="a recall starts a retrain of this pipeline without the "
                          "recalled input (an update request that goes through every gate and review)")


Severity = Literal["low", "medium", "high", "critical"]


ALWAYS_OFFLINE = (f"{vocab.OFFLINE}leaked_episodes",)
"""Offline metrics every evaluation computes, whatever ``evaluation.metrics`` lists: the train/test
independence check (:data:`closedloop.steps.evaluation.LEAK_METRIC`)."""


class OddSpec(_Part):
    """The intended function and operational design domain the release dossier argues for (UL 4600,
    ISO 21448): what the model is for, and where it is meant to work."""

    intended_function: str = Field(min_length=10, description="what the model does in the vehicle")
    regions: list[str] = Field(default_factory=list, description="where it is released (e.g. EU motorways)")
    speed_kph: tuple[float, float] | None = Field(default=None, description="[min, max] ego speed in km/h")
    conditions: list[str] = Field(default_factory=list, description="weather, light, road conditions in scope")
    scenario_types: list[str] = Field(default_factory=list,
                                      description="scenario types in scope; the dossier names those the "
                                                  "simulation catalog does not cover")

    @model_validator(mode="after")
    def _speeds(self) -> OddSpec:
        if self.speed_kph is not None and not 0 <= self.speed_kph[0] < self.speed_kph[1]:
            raise ValueError(f"odd.speed_kph must be [min, max] with 0 <= min < max, got {list(self.speed_kph)}")
        return self


class KpiRuleSpec(_Part):
    """A production KPI bound: crossing it raises an incident (once per degradation)."""

    metric: str = Field(pattern=r"^[A-Za-z0-9_.\-/ ]{1,250}$",
                        description="metric that online monitoring logs for the production version")
    min: float | None = Field(default=None, description="an incident is raised when the KPI falls below this")
    max: float | None = Field(default=None, description="an incident is raised when the KPI rises above this")
    scenario_type: str = Field(description="scenario type the incident retrain mines more of")
    severity: Severity = Field(default="high", description="severity of the incident a breach raises")

    @model_validator(mode="after")
    def _bound(self) -> KpiRuleSpec:
        if self.min is None and self.max is None:
            raise ValueError(f"KPI rule on {self.metric!r} needs 'min:' and/or 'max:'")
        return self

    def breached(self, value: float) -> bool:
        return (self.min is not None and value < self.min) or (self.max is not None and value > self.max)

    def describe(self) -> str:
        bounds = [f">= {self.min:g}" if self.min is not None else "", f"<= {self.max:g}" if self.max is not None else ""]
        return f"{self.metric} " + " and ".join(b for b in bounds if b)


class IncidentsSpec(_Part):
    """Event-driven retraining: incidents for this model start a high-priority run of the
    ``<name>_incident`` DAG, which mines more logs of the incident's scenario type."""

    scenario_types: list[str] = Field(default_factory=list, description="incident scenario types this model "
                                      "answers (default: dataset.scenarios)")
    focus: float = Field(default=10.0, gt=0, le=1000, description="sampling multiplier for the incident's "
                         "scenario type in the incident run's dataset")
    debounce_minutes: float = Field(default=30, ge=0, le=7 * 24 * 60, description="a second incident of the "
                                    "same scenario type within this time joins the first run instead of starting one")
    priority_weight: int = Field(default=100, ge=1, le=10_000,
                                 description="Airflow priority weight of the incident DAG's tasks (absolute)")
    regression_repeats: int = Field(default=3, ge=1, le=1000, description="episodes of the regression scenario "
                                    "each admitted incident adds to the model's catalog (seeds seed..seed+N-1)")
    pool: str = Field(default="closedloop_incident", pattern=r"^[A-Za-z0-9_.-]{1,256}$",
                      description="Airflow pool of the incident DAG's tasks (keeps periodic runs from blocking them)")
    inbox: bool = Field(default=True, description="watch the incident inbox folder ($CLOSEDLOOP_HOME/incidents/inbox)")
    inbox_max_bytes: int = Field(default=1_000_000, ge=1_000, le=100_000_000, description="a bigger inbox file is "
                                 "set aside unread (rejected/)")
    queue: dict[str, Any] | None = Field(default=None, description="arguments of Airflow's MessageQueueTrigger "
                                         "(common messaging provider) for production, e.g. {scheme: kafka, "
                                         "topics: [incidents]}; each message body is one incident (JSON)")
    reporters: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@-]{1,100}$")]] = Field(
        default_factory=list, description="Airflow users who may report incidents of this model through the "
        "plugin (POST /closedloop/api/incidents, `closedloop incident report`): any role, viewer is enough")
    kpi_poll_seconds: float = Field(default=60, ge=1, le=86_400,
                                    description="how often the KPI watcher reads production's KPIs")
    kpis: list[KpiRuleSpec] = Field(default_factory=list, description="production KPI bounds that raise incidents")


CACHEABLE_STEPS = pipeline.CACHEABLE
"""Steps whose result the step cache may reuse. Gates, registration, review and promotion always run:
they judge and record this run."""
RETRYABLE_STEPS = pipeline.RETRYABLE


class StepPolicySpec(_Part):
    """Per-step overrides of ``reliability``."""

    retries: int | None = Field(default=None, ge=0, le=20,
                                description="retries of this step (default: reliability.retries)")
    cache: bool | None = Field(default=None,
                               description="step cache on or off for this step (default: reliability.cache)")


class ReliabilitySpec(_Part):
    """Retries (transient errors only; permanent ones fail at once) and the step cache."""

    retries: int = Field(default=2, ge=0, le=20, description="retries of a transient error (connection, MLflow "
                         "5xx/429, timeout, resource exhaustion); permanent errors are never retried")
    retry_delay_seconds: float = Field(default=20, ge=0, le=86_400, description="first retry delay; doubles "
                                       "each try (exponential backoff)")
    max_retry_delay_seconds: float = Field(default=600, ge=0, le=7 * 86_400,
                                           description="the longest wait between retries (backoff doubles up to it)")
    cache: bool = Field(default=True, description="reuse the result of an earlier finished step with "
                        "identical inputs (content-addressed step cache)")
    cache_ttl_days: float | None = Field(default=30, gt=0, le=3650, description="a cached result older "
                                         "than this is not reused (null: no expiry)")
    steps: dict[str, StepPolicySpec] = Field(default_factory=dict, description="per-step overrides, e.g. "
                                             "{train: {retries: 4, cache: false}}")

    @model_validator(mode="after")
    def _known_steps(self) -> ReliabilitySpec:
        for step, policy in self.steps.items():
            if step not in RETRYABLE_STEPS:
                close = difflib.get_close_matches(step, RETRYABLE_STEPS, n=1)
                raise ValueError(f"reliability.steps names unknown step {step!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; expected one of {list(RETRYABLE_STEPS)}")
            if policy.cache and step not in CACHEABLE_STEPS:
                raise ValueError(f"reliability.steps.{step}.cache: {step} always runs (it judges or records this "
                                 f"run); cacheable steps are {list(CACHEABLE_STEPS)}")
        if self.max_retry_delay_seconds < self.retry_delay_seconds:
            raise ValueError(f"max_retry_delay_seconds {self.max_retry_delay_seconds:g} is below "
                             f"retry_delay_seconds {self.retry_delay_seconds:g}")
        return self

    def retries_of(self, step: str) -> int:
        policy = self.steps.get(step)
        return policy.retries if policy is not None and policy.retries is not None else self.retries

    def caches(self, step: str) -> bool:
        if step not in CACHEABLE_STEPS:
            return False
        policy = self.steps.get(step)
        return policy.cache if policy is not None and policy.cache is not None else self.cache


EMAIL_RE = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"


class AlertSpec(_Part):
    """Where a task that failed for good is reported. ``local``: the log and
    ``$CLOSEDLOOP_HOME/alerts.jsonl``; ``webhook``: a chat webhook (Slack, Mattermost, Teams, …)
    whose URL is the ``host`` of an Airflow connection; ``email``: through Airflow's SMTP provider
    and its connection. Secrets stay in the connections, never here."""

    kind: Literal["local", "webhook", "email"] = Field(description="local: the log and .closedloop/alerts.jsonl; "
                                                                   "webhook: a chat webhook; email: Airflow's SMTP")
    conn_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,250}$",
                                description="Airflow connection (webhook: its host is the URL; email: SMTP)")
    to: list[Annotated[str, Field(pattern=EMAIL_RE)]] = Field(default_factory=list,
                                                              description="e-mail recipients")

    @model_validator(mode="after")
    def _needs(self) -> AlertSpec:
        if self.kind == "webhook" and not self.conn_id:
            raise ValueError("an alert of kind 'webhook' needs conn_id: the Airflow connection whose host is the "
                             "webhook URL (the URL is a secret: it never goes in a template)")
        if self.kind == "email" and not self.to:
            raise ValueError("an alert of kind 'email' needs 'to:' (a list of addresses)")
        if self.kind != "email" and self.to:
            raise ValueError(f"'to:' only applies to alerts of kind 'email', not {self.kind!r}")
        return self


class PodSpec(_Part):
    """Run a step as a Kubernetes pod (Airflow's KubernetesPodOperator) instead of on a worker: the
    image holds this package and the project's ``include/``; the step code inside is the same."""

    image: str = Field(min_length=1, description="container image with airflow-closedloop and include/")
    namespace: str = Field(default="default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                           description="Kubernetes namespace of the pod")
    kubernetes_conn_id: str = Field(default="kubernetes_default", description="Airflow connection to the cluster")
    cpu: str | None = Field(default=None, pattern=r"^[0-9.]+m?$", description="CPU request, e.g. '8' or '500m'")
    memory: str | None = Field(default=None, pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$",
                               description="memory request and limit, e.g. 32Gi")
    gpu: int = Field(default=0, ge=0, le=64, description="GPUs (limit of gpu_resource)")
    gpu_resource: str = Field(default="nvidia.com/gpu", description="extended resource name of a GPU")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node labels the pod must run on")
    tolerations: list[dict[str, str]] = Field(default_factory=list,
                                              description="e.g. [{key: nvidia.com/gpu, operator: Exists, "
                                                          "effect: NoSchedule}]")
    service_account: str | None = Field(default=None, description="Kubernetes service account of the pod")
    env_from_secrets: list[str] = Field(default_factory=list, description="Kubernetes secrets whose keys become "
                                        "environment variables (e.g. MLFLOW_TRACKING_USERNAME / PASSWORD)")
    startup_timeout_seconds: int = Field(default=600, ge=10, le=86_400,
                                         description="a pod not started by then fails the try (retried)")


class KubernetesSpec(_Part):
    """Steps that run as Kubernetes pods."""

    train: PodSpec | None = None
    simulate: PodSpec | None = None

    @model_validator(mode="after")
    def _provider(self) -> KubernetesSpec:
        if (self.train or self.simulate) and importlib.util.find_spec("airflow.providers.cncf.kubernetes") is None:
            raise ValueError("running steps as pods needs Airflow's Kubernetes provider: pip install "
                             "'airflow-closedloop[kubernetes]' (apache-airflow-providers-cncf-kubernetes)")
        return self


class PipelineSpec(_Part):
    """One pipeline template, validated."""

    name: str = Field(pattern=NAME_RE, description="pipeline name; also the DAG id")
    description: str = Field(min_length=10, description="purpose: why this pipeline exists")
    owner: str = Field(min_length=1, description="team or person answerable for the pipeline (the DAG's owner)")
    schedule: str | None = Field(default=None, description="cron expression, or null for no schedule")
    start_date: date | None = Field(default=None, description="first interval the schedule knows; needed "
                                    "for catchup. Without it, unpausing waits for the next cron tick")
    catchup: bool = Field(default=False, description="run the intervals missed since start_date (Airflow's catchup)")
    tags: list[str] = Field(default_factory=list, description="Airflow tags of the DAGs")
    model: ModelSpec
    dataset: DatasetSpec
    label_policy: LabelPolicySpec
    validation: ValidationSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    simulation: SimulationSpec
    gates: list[GateSpec] = Field(min_length=1)
    hil: HilSpec | None = None
    odd: OddSpec | None = Field(default=None, description="intended function and operational design domain "
                                "(the release dossier's scope)")
    approval: ApprovalSpec | None = None
    recall: RecallSpec | None = Field(default=None, description="recalls of a bad source, label policy or code "
                                      "version (default: the approvers open them; every source may be excluded)")
    incidents: IncidentsSpec | None = None
    reliability: ReliabilitySpec = Field(default_factory=ReliabilitySpec)
    kubernetes: KubernetesSpec | None = Field(default=None, description="steps (train, simulate) that run as "
                                              "Kubernetes pods")
    alerts: list[AlertSpec] = Field(default_factory=lambda: [AlertSpec(kind="local")], min_length=1,
                                    description="where failures are reported (default: the log and the local "
                                    "alert record)")

    @property
    def incident_dag_id(self) -> str:
        return f"{self.name}_incident"

    def incident_scenarios(self) -> list[str]:
        if self.incidents is None:
            return []
        return list(self.incidents.scenario_types or self.dataset.scenarios)

    @model_validator(mode="after")
    def _incident_scenarios(self) -> PipelineSpec:
        if self.incidents is None:
            return self
        unknown = sorted(set(self.incidents.scenario_types) - set(self.dataset.scenarios))
        if unknown:
            raise ValueError(f"incidents.scenario_types {unknown} are not in dataset.scenarios "
                             f"{self.dataset.scenarios}: the retrain could not mine them")
        allowed = self.incident_scenarios()
        for i, rule in enumerate(self.incidents.kpis):
            if rule.scenario_type not in allowed:
                raise ValueError(f"incidents.kpis[{i}].scenario_type {rule.scenario_type!r} is not one of the "
                                 f"incident scenario types {allowed}")
        if self.incidents.queue is not None and "scheme" not in self.incidents.queue:
            raise ValueError("incidents.queue needs 'scheme:' (e.g. kafka, sqs, redis+pubsub) and the arguments of "
                             "that queue's trigger")
        if self.incidents.queue is not None and importlib.util.find_spec("airflow.providers.common.messaging") is None:
            raise ValueError("incidents.queue needs Airflow's common messaging provider: pip install "
                             "apache-airflow-providers-common-messaging (and the provider of your queue)")
        return self

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None or v.startswith("@"):
            if v not in (None, "@hourly", "@daily", "@weekly", "@monthly", "@yearly"):
                raise ValueError(f"expected a cron expression or one of @hourly/@daily/@weekly/@monthly/@yearly, got {v!r}")
            return v
        from croniter import croniter  # light, pure Python; Airflow depends on it

        if not croniter.is_valid(v):
            raise ValueError(f"expected a cron expression like '0 3 * * 1' (minute hour day month weekday), got {v!r}")
        return v

    @model_validator(mode="after")
    def _recall_sources(self) -> PipelineSpec:
        if self.recall is not None and self.recall.may_exclude is not None:
            unknown = sorted(set(self.recall.may_exclude) - set(self.dataset.sources))
            if unknown:
                raise ValueError(f"recall.may_exclude {unknown} are not in dataset.sources {self.dataset.sources}")
        return self

    def recall_openers(self) -> list[str]:
        """Who may open a recall touching this pipeline: ``recall.openers``, else the approvers."""
        if self.recall is not None and self.recall.openers:
            return list(self.recall.openers)
        return list(self.approval.approvers) if self.approval is not None else []

    @model_validator(mode="after")
    def _catchup_needs_start(self) -> PipelineSpec:
        if self.catchup and self.start_date is None:
            raise ValueError("catchup: true needs start_date (the first interval to catch up from), e.g. "
                             "start_date: 2026-01-01")
        return self

    @model_validator(mode="after")
    def _gate_metrics(self) -> PipelineSpec:
        for i, gate in enumerate(self.gates):
            if gate.metric.startswith(vocab.HIL) and self.hil is None:
                raise ValueError(f"gates[{i}].metric {gate.metric!r} needs hardware-in-the-loop results: add a "
                                 "'hil:' section (reporter, timeout_minutes)")
            if gate.metric.startswith(vocab.OFFLINE):
                leaf = gate.metric.rsplit(".", 1)[-1]
                if leaf not in self.evaluation.metrics and gate.metric not in ALWAYS_OFFLINE:
                    raise ValueError(f"gates[{i}].metric {gate.metric!r} uses offline metric {leaf!r}, "
                                     f"which evaluation.metrics does not compute ({self.evaluation.metrics})")
        if self.simulation.adaptive is not None and not self.adaptive_gates():
            raise ValueError("simulation.adaptive stops when the confidence gates are decided, and no gate judges a "
                             "'sim.*' rate with 'confidence': add one (e.g. {metric: sim.collision_rate, max: 0.01, "
                             "confidence: 0.95}) or remove 'adaptive'")
        return self

    def adaptive_gates(self) -> list[GateSpec]:
        """The gates an adaptive simulation budget waits for: ``sim.*`` rates judged with ``confidence``."""
        return [g for g in self.gates if g.metric.startswith(vocab.SIM) and g.confidence is not None]

    def digest(self) -> str:
        """The template hash: sha256 of the validated content (comments and key order don't count)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec plus where it came from."""

    spec: PipelineSpec
    path: Path
    include_dir: Path
    digest: str = field(default="")

    @property
    def suite_path(self) -> Path:
        return self.include_dir / "expectations" / f"{self.spec.validation.suite}.json"

    @property
    def scenario_path(self) -> Path:
        return self.include_dir / "scenarios" / f"{self.spec.simulation.scenario_set}.yaml"


def _fields_of(model: type[BaseModel], loc: tuple) -> list[str]:
    """The allowed field names at ``loc`` (for 'did you mean' hints)."""
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        if info is None:
            return []
        ann = info.annotation
        inner = getattr(ann, "__args__", (ann,))
        nxt = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return []
        model = nxt
    return list(model.model_fields)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe_error(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
    where = _loc(loc)
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        allowed = _fields_of(PipelineSpec, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; allowed: {', '.join(allowed)}" if allowed else "")
        return f"{where}: unknown field{hint}"
    if kind == "missing":
        return f"{where}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return f"{where}: {msg}"
    shown = json.dumps(got, default=str) if not isinstance(got, dict) else "a mapping"
    return f"{where}: {msg[0].lower() + msg[1:]}; got {shown}"


def parse_spec(data: Any, *, source: str) -> PipelineSpec:
    """Validate already-parsed YAML; raise :class:`SpecError` naming ``source`` and each field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of template fields at the top level, "
                        f"got {type(data).__name__}", path=source)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = [_describe_error(e) for e in exc.errors()]
        text = f"{source}: invalid pipeline template ({len(problems)} problem{'s' * (len(problems) > 1)}):\n" + \
            "\n".join(f"  - {p}" for p in problems)
        raise SpecError(text, path=source, problems=problems) from None


def load_spec(path: str | Path, include_dir: str | Path | None = None) -> LoadedSpec:
    """Read, validate and cross-check one template file."""
    path = Path(path)
    include_dir = Path(include_dir) if include_dir else path.resolve().parent.parent
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{source}: cannot read template: {exc.strerror}", path=source) from None
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{source}: not valid YAML{at}: {getattr(exc, 'problem', exc)}", path=source) from None
    spec = parse_spec(data, source=source)
    loaded = LoadedSpec(spec=spec, path=path, include_dir=include_dir, digest=spec.digest())
    problems = []
    if not loaded.suite_path.is_file():
        problems.append(f"validation.suite: expectation suite {spec.validation.suite!r} not found; "
                        f"expected a file {loaded.suite_path} ({_available(loaded.suite_path)})")
    if not loaded.scenario_path.is_file():
        problems.append(f"simulation.scenario_set: scenario set {spec.simulation.scenario_set!r} not found; "
                        f"expected a file {loaded.scenario_path} ({_available(loaded.scenario_path)})")
    else:
        problems += sim_gate_problems(spec, loaded.scenario_path)
    if problems:
        raise SpecError(f"{source}: invalid pipeline template:\n" + "\n".join(f"  - {p}" for p in problems),
                        path=source, problems=problems)
    return loaded


@functools.lru_cache(maxsize=64)
def _scenario_types(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    """The scenario types of a scenario set, read once per version of the file (many templates share one)."""
    data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_LOADER) or {}
    return frozenset(str(s.get("type")) for s in data.get("scenarios") or [] if isinstance(s, dict) and s.get("type"))


SIM_GROUPS = ("safety_critical", "regression")
"""Groups every simulation reports beside the scenario set's types (``sim.<group>.<metric>``)."""


def sim_gate_problems(spec: PipelineSpec, scenario_path: Path) -> list[str]:
    """Gates on ``sim.<group>.<metric>`` whose group the scenario set cannot produce (a scenario type
    it does not have, a typo), with a did-you-mean: caught here, before any compute, instead of at
    ``release_gate`` after dataset, training and simulation have run."""
    try:
        stat = scenario_path.stat()
        types = _scenario_types(str(scenario_path), stat.st_mtime_ns, stat.st_size)
    except (OSError, yaml.YAMLError, AttributeError):
        return []  # the simulation step says what is wrong with the scenario set itself
    groups = sorted(types | set(SIM_GROUPS))
    problems = []
    for i, gate in enumerate(spec.gates):
        parts = gate.metric.split(".")
        if parts[0] != "sim" or len(parts) < 3 or parts[1] in groups:
            continue
        close = difflib.get_close_matches(parts[1], groups, n=1)
        problems.append(f"gates[{i}].metric: {gate.metric!r}: scenario set {spec.simulation.scenario_set!r} has no "
                        f"scenario type {parts[1]!r}" + (f"; did you mean {'.'.join(['sim', close[0], *parts[2:]])!r}?"
                                                         if close else "")
                        + f" (groups: {', '.join(groups)})")
    return problems


def _available(expected: Path) -> str:
    names = sorted(p.stem for p in expected.parent.glob(f"*{expected.suffix}"))
    return "available: " + ", ".join(names) if names else f"no {expected.suffix} files there"


def claimed_name(path: str | None) -> tuple[str | None, bool]:
    """The pipeline name a broken template claims (and whether it has ``incidents:``), read leniently:
    what its held-back DAGs are called. None when not even that can be read."""
    if not path:
        return None, False
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None, False
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError:  # broken YAML: the top-level lines still say what it is
        found = re.search(r"^name:\s*['\"]?([a-z][a-z0-9_]{0,99})['\"]?\s*(#.*)?$", text, re.MULTILINE)
        data = {"name": found.group(1) if found else None,
                "incidents": True if re.search(r"^incidents:", text, re.MULTILINE) else None}
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,99}", name):
        return None, False
    return name, data.get("incidents") is not None


def template_problems(pipelines_dir: str | Path, errors: list[SpecError] | None = None) -> list[dict[str, Any]]:
    """The folder's broken templates, as health shows them: file, the pipeline (DAG id) each holds back
    (None when its name cannot be read) and the error. ``errors``: what :func:`load_all` already found."""
    if errors is None:
        _, errors = load_all(pipelines_dir)
    return [{"file": e.path, "pipeline": claimed_name(e.path)[0], "error": str(e)} for e in errors]


def template_files(pipelines_dir: str | Path) -> list[Path]:
    """Template files in a folder, sorted; files starting with '_' or '.' are ignored."""
    folder = Path(pipelines_dir)
    return sorted(p for p in folder.glob("*.y*ml")
                  if p.suffix in (".yaml", ".yml") and not p.name.startswith(("_", ".")))


def load_all(pipelines_dir: str | Path) -> tuple[list[LoadedSpec], list[SpecError]]:
    """Load every template; one bad file never hides the others. Duplicate names are errors."""
    specs: list[LoadedSpec] = []
    errors: list[SpecError] = []
    seen: dict[str, Path] = {}
    models: dict[str, Path] = {}
    for path in template_files(pipelines_dir):
        try:
            loaded = load_spec(path)
        except SpecError as exc:
            errors.append(exc)
            continue
        name, model = loaded.spec.name, loaded.spec.model.name
        if name in seen:
            errors.append(SpecError(f"{path}: name: pipeline name {name!r} is already used by {seen[name]}; "
                                    "each template needs its own name", path=str(path)))
            continue
        if model in models:
            errors.append(SpecError(f"{path}: model.name: registered model {model!r} is already produced by "
                                    f"{models[model]}; two pipelines writing one model would overwrite each "
                                    "other's candidate", path=str(path)))
            continue
        seen[name], models[model] = path, path
        specs.append(loaded)
    return specs, errors

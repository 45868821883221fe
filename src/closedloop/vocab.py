"""Every shared name: registry aliases, MLflow tag names, run-conf keys, XCom keys.

MLflow tags are how records find each other (a step's run by run key and step, a version's
lineage, the cache); changing a value here orphans what earlier runs recorded.
"""

from __future__ import annotations

# -- registry aliases -----------------------------------------------------------------------------
CANDIDATE = "candidate"
PRODUCTION = "production"
PREVIOUS = "previous-production"

# -- MLflow tags: identity and lineage of every run and model version ------------------------------
NAMESPACE = "closedloop."  # every tag of ours starts with it

# -- metric prefixes: where a metric comes from (a gate names it with its prefix) ------------------
OFFLINE = "offline."  # held-out evaluation (offline_eval)
SIM = "sim."  # closed-loop simulation (simulate / merge_simulation)
HIL = "hil."  # hardware-in-the-loop results (await_hil)
SHIFT = "shift."  # distribution shift from production's training data (release_gate)
ONLINE = "online."  # the production version's KPIs from the fleet (the KPI watcher)


def experiment_name(pipeline: str) -> str:
    """The MLflow experiment of a pipeline's runs."""
    return f"closedloop/{pipeline}"


PIPELINE = "closedloop.pipeline"
TEMPLATE = "closedloop.template"
TEMPLATE_HASH = "closedloop.template_hash"
LABEL_POLICY = "closedloop.label_policy"
CODE_VERSION = "closedloop.code_version"
CODE_DIGEST = "closedloop.code_digest"
GIT_COMMIT = "closedloop.git_commit"
RUN_KEY = "closedloop.run_key"
STEP = "closedloop.step"
RESULT = "closedloop.result"
TRIGGER = "closedloop.trigger"
REQUESTER = "closedloop.requester"
RERUN_OF = "closedloop.rerun_of"
RERUNS = "closedloop.reruns"
AIRFLOW_DAG_ID = "airflow.dag_id"
AIRFLOW_RUN_ID = "airflow.run_id"
AIRFLOW_TASK_ID = "airflow.task_id"
AIRFLOW_TRY_NUMBER = "airflow.try_number"

# -- MLflow tags: data and model --------------------------------------------------------------------
DATASET_VERSION = "closedloop.dataset_version"
RAW_DATASET_VERSION = "closedloop.raw_dataset_version"
DATASET_SOURCES = "closedloop.dataset.sources"
DATASET_WINDOW = "closedloop.dataset.window"
DATASET_MONTHS = "closedloop.dataset.months"  # ",2026-10,2026-11,": the months the window touches (recall search)
DATASET_MANIFEST = "closedloop.dataset.manifest"
MODEL_URI = "closedloop.model_uri"
MODEL_VERSION = "closedloop.model_version"
TRAINING_RUN_ID = "closedloop.training_run_id"
GATE_RUN_ID = "closedloop.gate_run_id"
GATES = "closedloop.gates"
COMPARED_TO_PRODUCTION = "closedloop.compared_to_production"

DATASET_INPUT_SHA256 = "closedloop.sha256"  # a dataset input's tag: the snapshot's full sha256
MONITORED_MODEL = "closedloop.model"  # a monitoring run's model (online KPIs)
MONITORING_SOURCE = "closedloop.source"
SHARDS = "closedloop.shards"

# -- Airflow's audit log: events the deployment writes --------------------------------------------------
AUDIT_INCIDENT_REPORT = "closedloop.incident.report"

# -- MLflow tags: the step cache ---------------------------------------------------------------------
CACHE = "closedloop.cache"
CACHE_KEY = "closedloop.cache_key"
CACHE_SOURCE_RUN_ID = "closedloop.cache.source_run_id"
CACHE_SOURCE_RUN_KEY = "closedloop.cache.source_run_key"
SHARD = "closedloop.simulation.shard"
REGRESSION_CATALOG = "closedloop.simulation.regression_catalog"

# -- MLflow tags: requests, incidents, governance ----------------------------------------------------
REQUEST_PREFIX = "closedloop.request."
INCIDENT_PREFIX = "closedloop.incident."
REVIEW_PREFIX = "closedloop.review."
REVIEW_OPENED_PREFIX = "closedloop.review.opened."  # + approval task id: the sealed record of what a review showed
REVIEW_DECISION = REVIEW_PREFIX + "decision"
REVIEW_REVIEWER = REVIEW_PREFIX + "reviewer"
REVIEW_AT = REVIEW_PREFIX + "at"
REVIEW_COMMENT = REVIEW_PREFIX + "comment"
REVIEW_RUN_ID = REVIEW_PREFIX + "run_id"
REQUEST_REQUESTER = REQUEST_PREFIX + "requester"
REQUEST_PURPOSE = REQUEST_PREFIX + "purpose"
AUDIT_PREFIX = "closedloop.audit."
RELEASE_RECORD = "closedloop.release_record"
APPROVAL_PREFIX = "closedloop.approval."
PROMOTION = "closedloop.promotion.production"
DOSSIER = "closedloop.dossier"  # on a model version: {"uri", "digest"} of its release dossier
PUBLIC_KEY = "closedloop.signing.public_key"
HOLD_PREFIX = "closedloop.hold."  # on a model version: + a recall's id → that recall's sealed hold

# -- recalls (one MLflow run per recall in RECALL_EXPERIMENT; closedloop.steps.recall) -----------------
RECALL_EXPERIMENT = "closedloop/recalls"
RECALL_ID = "closedloop.recall.id"
RECALL_STATE = "closedloop.recall.state"  # open | closed (a convenience: the sealed close record decides)
RECALL_CLOSED = "closedloop.recall.closed"  # the sealed close record
RECALL_KIND = "closedloop.recall.kind"  # source | label_policy | code_digest | snapshot
RECALL_RETRAIN_PREFIX = "closedloop.recall.retrain."  # + pipeline → the retrain's Airflow run id
RECALL_AFFECTED = "closedloop.recall.affected_versions"
RECALL_PARAM = "recall"
RETRAIN_FOR = "closedloop.retrain_for"  # on a pipeline run: the recall whose retrain it is  # the run's param: the sealed opening record (MLflow never changes a param)
DATASET_EXCLUDED = "closedloop.dataset.excluded"  # JSON: the (source, window) a recall took out of the data

# -- run conf keys (REST ``conf``, ``closedloop rerun``) ----------------------------------------------
CONF_RERUN = "closedloop_rerun"
CONF_CACHE = "closedloop_cache"
CONF_INCIDENT = "incident"
CONF_RECALL = "closedloop_recall"  # a recall's retrain: the recall's id

# -- asset event fields the deployment writes (an event posted through Airflow's REST API also carries
#    Airflow's own ``from_rest_api`` mark, and is then not believed to come from the deployment) --------------
EVENT_FROM_CLOSEDLOOP = "from_closedloop"
EVENT_POSTED_BY = "posted_by"

# -- XCom keys ---------------------------------------------------------------------------------------
XCOM_ERROR = "error"
XCOM_CACHE_PLAN = "cache_plan"
XCOM_REVIEW_OPENED = "review_opened"

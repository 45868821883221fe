"""The first task of an incident run: admit the incidents that started it, or stand down."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSkipException

from closedloop import vocab
from closedloop.operators.base import ClosedLoopStepOperator

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context

    from closedloop.runtime.context import RunContext

log = logging.getLogger(__name__)


class AdmitIncidentOperator(ClosedLoopStepOperator):
    """Validate the run's incident events and debounce repeats (``admit_incident``).

    - No valid incident among the events (unknown model, missing scenario type, bad severity...):
      the task fails at once (no retry) naming every problem; nothing downstream runs.
    - Every incident repeats one admitted less than ``incidents.debounce_minutes`` earlier for
      the same scenario type: the run stands down (its tasks are skipped) and the log and XCom
      name the run it joins.
    - Otherwise the run goes on, mining more logs of the admitted incidents' scenario types.

    Admissions are kept in Airflow's asset state store of the incident asset; one admission at
    a time (``max_active_tis_per_dag=1``), so two runs never both admit the same problem.

    :param asset: the model's incident asset (also this task's inlet).
    """

    ui_color = "#fde8e8"

    def __init__(self, *, asset: Asset, **kwargs: Any) -> None:
        kwargs.setdefault("inlets", [asset])
        kwargs.setdefault("max_active_tis_per_dag", 1)
        kwargs.setdefault("retries", 0)
        super().__init__(**kwargs)
        self.asset = asset

    def events(self, context: Context) -> list[dict]:
        """The run's incident events, each with who posted it (``posted_by``): the Airflow user for a
        REST post (from Airflow's audit log) or a manual run, ``system:<watcher>`` for a watcher's event,
        None when nobody can tell. The payload's own ``reported_by`` is a claim, not an identity."""
        from closedloop.hooks.airflow_api import poster_of, service_api

        api = None
        found = []
        for e in context["triggering_asset_events"].get(self.asset, []):
            extra = dict(e.extra or {})
            if extra.get("from_trigger"):
                poster = "system:watcher"
            elif extra.get(vocab.EVENT_FROM_CLOSEDLOOP) and not extra.get("from_rest_api"):
                poster = str(extra.get(vocab.EVENT_POSTED_BY) or "") or None  # the plugin, from the login
            elif extra.get("from_rest_api"):
                api = api or service_api()
                poster = poster_of(api, extra, e.timestamp) if api is not None else None
            else:
                poster = None
            found.append({"extra": extra, "timestamp": e.timestamp, "posted_by": poster})
        conf = getattr(context["dag_run"], "conf", None) or {}
        if not found and "incident" in conf:  # a manual run: `airflow dags trigger ... --conf '{"incident": {...}}'`
            found = [{"extra": conf["incident"], "timestamp": context["dag_run"].run_after,
                      "posted_by": getattr(context["dag_run"], "triggering_user_name", None)}]
        return found

    def run_step(self, ctx: RunContext, context: Context) -> dict:
        from closedloop.steps.incidents import STATE_PREFIX, admit, incident_request

        spec = self.loaded.spec
        state = context["asset_state_store"][self.asset]
        last = {k: state.get(STATE_PREFIX + k) for k in spec.incident_scenarios()}
        rerun = vocab.CONF_RERUN in (getattr(context["dag_run"], "conf", None) or {})
        decision = admit(spec, self.events(context), {k: v for k, v in last.items() if v}, run_id=ctx.run_id,
                         rerun=rerun)
        for reason in decision["rejected"]:
            log.warning("ignored a malformed incident event: %s", reason)
        for kind, admission in decision.pop("state").items():
            state.set(STATE_PREFIX + kind, admission)
        if not decision["admitted"]:
            joined = ", ".join(f"{i} → run {r}" for i, r in decision["merged_into"].items())
            from closedloop.operators.base import seal

            context["ti"].xcom_push(key="return_value", value=seal(context, decision))
            raise AirflowSkipException(f"debounced: every incident of this run repeats one admitted less than "
                                       f"{spec.incidents.debounce_minutes:g} min earlier ({joined}); no second run")
        from closedloop.steps import regression

        for i in decision["incidents"]:  # every admitted incident: a permanent regression scenario of its model
            entry = regression.add(ctx.data_root, spec.model.name, i, repeats=spec.incidents.regression_repeats,
                                   dag_id=ctx.dag_id, run_id=ctx.run_id)
            log.info("regression scenario %s of %s %s", entry["scenario"]["id"], spec.model.name,
                     "added" if entry["added"] else "already in the catalog")
        from closedloop.steps.governance import check_reviewers

        check_reviewers(spec, [p for i in decision["incidents"] for p in [i.get("posted_by")]
                               if p and not p.startswith("system:")])
        decision["request"] = incident_request(spec, decision["incidents"])
        for i in decision["incidents"]:
            log.info("admitted incident %s: %s in %s (%s), logs %s", i["id"], i["kind"], i["scenario_type"],
                     i["severity"], i["log_refs"] or "-")
        for inc, run in decision["merged_into"].items():
            log.info("incident %s joins run %s (debounced)", inc, run)
        return decision

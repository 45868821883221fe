"""Human documentation of a pipeline, derived from its template: CLI ``describe`` and DAG ``doc_md``."""

from __future__ import annotations

from closedloop import pipeline
from closedloop.spec import CACHEABLE_STEPS, LoadedSpec


def _schedule(expr: str | None) -> str:
    if expr is None:
        return "none (runs start by trigger only)"
    try:
        from cron_descriptor import get_description

        return f"`{expr}` ({get_description(expr)}, UTC)"
    except Exception:  # cron_descriptor cannot word every expression
        return f"`{expr}` (UTC)"


def describe(loaded: LoadedSpec) -> str:
    """Markdown: purpose, schedule, inputs, outputs, dependencies, gates, tasks."""
    s = loaded.spec
    ds, lp = s.dataset, s.label_policy
    gates = "\n".join(f"- `{g.describe()}`" + (f": {g.description}" if g.description else "") for g in s.gates)
    sh, budget = s.simulation.shards, s.simulation.adaptive
    parts = []
    if budget:
        parts.append("with an adaptive budget: further rounds of the catalog with fresh seeds until the confidence "
                     f"gates on {', '.join(f'`{g.metric}`' for g in s.adaptive_gates())} are decided, at most "
                     f"{budget.max_episodes:,} episodes")
    if sh:
        parts.append(f"in shards ({'one per scenario type' if sh.by == 'scenario_type' else f'{sh.count} slices of the catalog'}; "
                     "Airflow dynamic task mapping)" + (", every round fanned out over them" if budget else "")
                     + ", each a separate job awaited in the triggerer")
    simulate = ("closed-loop simulation " + "; ".join(parts)) if parts else ""
    docs = {"simulate": simulate,
            "await_hil": f"wait for hardware-in-the-loop results reported by `{s.hil.reporter}` (timeout "
                         f"{s.hil.timeout_minutes:g} min)" if s.hil else ""}
    all_tasks = [(t.id, docs.get(t.id) or t.doc)
                 for t in pipeline.steps_of(hil=s.hil is not None, approval=s.approval is not None,
                                            shards=s.simulation.shards is not None)]
    tasks = "\n".join(f"{i}. `{t}`: {d}" for i, (t, d) in enumerate(all_tasks, 1))
    review = (f"Approvers: {', '.join(s.approval.approvers)} (never the requester); "
              + (f"{s.approval.required} distinct approvals needed; " if s.approval.required > 1 else "")
              + f"no decision within {s.approval.timeout_hours:g} h counts as a rejection; an approval promotes "
              f"within {s.approval.valid_hours_or_default:g} h, and only if production has not moved since the "
              "review opened." if s.approval
              else "No human review: this pipeline produces candidates only and never promotes.")
    params = ", ".join(f"{k}={v}" for k, v in ds.params.items())
    sampling = ", ".join(f"{k} x{v:g}" for k, v in ds.sampling.items())
    return f"""# Pipeline `{s.name}`

{s.description.strip()}

| | |
|---|---|
| owner | {s.owner} |
| schedule | {_schedule(s.schedule)}; catchup {'on' if s.catchup else 'off'} |
| incidents | {_incidents_row(s)} |
| template | `{loaded.path.name}` (hash `{loaded.digest}`) |
| tags | {', '.join(s.tags) or '-'} |

## Inputs
- **Fleet logs** from {', '.join(f'`{x}`' for x in ds.sources)}: the {ds.window_days} days before the run's data
  interval end; scenario types {', '.join(f'`{x}`' for x in ds.scenarios)}{f'; {params}' if params else ''}{f'; sampling {sampling}' if sampling else ''}.
- **Label policy** `{lp.ref}` (`{lp.entry_point}`).
- **Expectation suite** `{s.validation.suite}` and **scenario set** `{s.simulation.scenario_set}`.

## Outputs
- Raw and labelled **dataset snapshots** (Parquet, named by content digest) under the data root.
- MLflow experiment `closedloop/{s.name}`: one parent run per pipeline run, a child run per step
  (`generate_dataset` … `release_gate`), all tagged with the lineage and the step's cache key.
- Registered model **`{s.model.name}`**: one version per successful run, alias `candidate`;
  after approval, alias `production` (the version it replaces keeps `previous-production`).

## Dependencies
- Code: dataset `{ds.generator}`, trainer `{s.training.entry_point}`, simulator `{s.simulation.entry_point}`.
- Files: `include/expectations/{s.validation.suite}.json`, `include/scenarios/{s.simulation.scenario_set}.yaml`.
- Services: MLflow (connection `mlflow_default` or `MLFLOW_TRACKING_URI`), the data root
  (`CLOSEDLOOP_DATA_ROOT`), a triggerer for `simulate`.

{_incidents_section(s)}{_reliability_section(s)}## Release gates
{gates}

## Review
{review}

## Tasks
{tasks}
"""


def _incidents_row(s) -> str:
    if s.incidents is None:
        return "none (no incident DAG)"
    return f"DAG `{s.incident_dag_id}` on asset `closedloop://incidents/{s.model.name}`"


def _incidents_section(s) -> str:
    inc = s.incidents
    if inc is None:
        return ""
    channels = ["the REST API (`POST /api/v2/assets/events`)", "`closedloop incident report`"]
    if inc.inbox:
        channels.append("JSON files in the incident inbox (`$CLOSEDLOOP_INCIDENT_INBOX`)")
    if inc.queue:
        channels.append(f"the message queue ({inc.queue.get('scheme')}) through Airflow's common messaging provider")
    kpis = "\n".join(f"  - `{r.describe()}` → {r.severity} incident in `{r.scenario_type}`" for r in inc.kpis)
    return f"""## Incidents
Incidents about `{s.model.name}` in {', '.join(f'`{t}`' for t in s.incident_scenarios())} start DAG
`{s.incident_dag_id}`: it admits the incident (malformed ones fail admission, repeats of the same scenario
type within {inc.debounce_minutes:g} min join the first run), then runs the same loop on a dataset with
{inc.focus:g}x the usual share of the incident's scenario type. Its tasks run in pool `{inc.pool}` at priority
{inc.priority_weight}, so periodic runs never hold them up. Channels: {', '.join(channels)}.
""" + (f"""- Production KPIs (polled every {inc.kpi_poll_seconds:g} s from online monitoring in MLflow) raise an
  incident once per degradation:
{kpis}
""" if inc.kpis else "") + "\n"


def _reliability_section(s) -> str:
    r = s.reliability
    overrides = []
    for step, p in r.steps.items():
        parts = ([f"{p.retries} retries"] if p.retries is not None else []) + \
                ([f"cache {'on' if p.cache else 'off'}"] if p.cache is not None else [])
        overrides.append(f"`{step}` {', '.join(parts)}")
    cached = [step for step in CACHEABLE_STEPS if r.caches(step)]
    cache = (f"{', '.join(f'`{c}`' for c in cached)} reuse the result of an earlier finished step with identical "
             "inputs (run conf `closedloop_cache: false` or `closedloop rerun --no-cache` bypasses it)"
             if cached else "off")
    alerts = ", ".join({"local": "the log and the local alert record",
                        "webhook": f"chat webhook (connection `{a.conn_id}`)",
                        "email": f"e-mail to {', '.join(a.to)}"}[a.kind] for a in s.alerts)
    return f"""## Failures, retries and the step cache
Transient errors (connection, MLflow 5xx/429, timeouts, resource exhaustion) are retried {r.retries} times,
{r.retry_delay_seconds:g} s after the first failure and twice as long each time (at most {r.max_retry_delay_seconds:g} s);
permanent ones (template or data errors, failed gates, bugs) fail the task at once. Every step can be
retried or cleared safely: it finds what it already made instead of making it twice.
{"Overrides: " + "; ".join(overrides) + "." + chr(10) if overrides else ""}Step cache: {cache}.
A task that fails for good alerts: {alerts}.

"""

"""``closedloop_recall``: open, close or re-start the retrains of a recall for the person who asks, and
close the recalls that are done whenever a governed model's ``production`` moves.

A person asks through Airflow (``closedloop recall open|close|retrain``, the trigger form, REST) with their
own login; the run records who (``triggering_user_name``), and only the templates' recall openers (the
approvers unless ``recall.openers`` says otherwise) of every pipeline the recall touches may open it. The
task acts with the deployment's MLflow identity and signing key (:mod:`closedloop.steps.recall`), and
starts each affected pipeline's retrain as a model update request through the deployment's Airflow
account, which the pipeline then judges like any other (every gate, every review).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from closedloop.operators.base import DeploymentActionOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from closedloop.spec import LoadedSpec

log = logging.getLogger(__name__)

RECALL_DAG_ID = "closedloop_recall"
ACTIONS = ("open", "close", "retrain")
MAX_LISTED = 100
"""The most affected versions the task's result lists (the recall's ``affected.json`` has them all)."""


def deployment_openers() -> set[str]:
    """Who may open any recall, whatever the templates say: ``$CLOSEDLOOP_RECALL_OPENERS`` (comma list)."""
    import os

    return {p.strip() for p in os.environ.get("CLOSEDLOOP_RECALL_OPENERS", "").split(",") if p.strip()}


def check_opener(specs: list[LoadedSpec], actor: str, pipelines: set[str], query, *, what: str = "open") -> None:
    """Refuse ``actor`` unless a recall opener of every pipeline the recall touches (or of the deployment); a
    recall that touches nothing yet needs an opener of a pipeline that reads the recalled input."""
    from closedloop.errors import ApprovalError

    if actor in deployment_openers():
        return
    by_name = {s.spec.name: s.spec for s in specs}
    if pipelines:
        denied = sorted(p for p in pipelines if p in by_name and actor not in by_name[p].recall_openers())
        if denied:
            raise ApprovalError(f"{actor!r} may not {what} a recall touching {', '.join(denied)}: allowed are "
                                + "; ".join(f"{p}: {', '.join(by_name[p].recall_openers()) or 'nobody'}"
                                            for p in denied)
                                + " (recall.openers, default the approvers; $CLOSEDLOOP_RECALL_OPENERS for all)")
        return
    readers = [s for s in by_name.values() if query.kind != "source" or query.value in s.dataset.sources]
    if not any(actor in s.recall_openers() for s in readers or by_name.values()):
        raise ApprovalError(f"{actor!r} may not {what} a recall of {query.describe()}: no pipeline that reads it "
                            "names them as a recall opener")


def retrain_request(loaded: LoadedSpec, recall: dict) -> tuple[dict | None, str]:
    """The update request that retrains ``loaded``'s pipeline without the recalled input, and why; None with
    the reason when it cannot be retrained yet (the template still names the recalled input)."""
    from closedloop import vocab
    from closedloop.runtime import identity
    from closedloop.steps.recall import Query

    spec = loaded.spec
    q = Query.of(recall["query"])
    if spec.recall is not None and not spec.recall.retrain:
        return None, f"{spec.name}: recall.retrain is false in {loaded.path.name}: retrain it by hand"
    change, how = ["data"], f"without {q.describe()}"
    if q.kind == "source":
        allowed = spec.recall.may_exclude if spec.recall and spec.recall.may_exclude is not None \
            else spec.dataset.sources
        if q.value not in allowed:
            return None, (f"{spec.name}: {loaded.path.name} does not let a recall take {q.value} out of its data "
                          "(recall.may_exclude): retrain it by hand")
    elif q.kind == "label_policy":
        if spec.label_policy.ref == q.value:
            return None, (f"{spec.name}: {loaded.path.name} still names the recalled label policy {q.value}; name a "
                          f"fixed one, then `closedloop recall retrain {recall['id']}`")
        change, how = ["label_policy"], f"with label policy {spec.label_policy.ref} instead of {q.value}"
    elif q.kind == "code_digest":
        now = str(identity.of_step(loaded, "train")["digest"]).removeprefix("sha256:")
        if now.startswith(q.value):
            return None, (f"{spec.name}: the deployed training code is still the recalled version {q.value}; deploy "
                          f"the fix, then `closedloop recall retrain {recall['id']}`")
        change, how = ["code"], f"with code {now[:12]} instead of {q.value}"
    reason = str(recall.get("reason") or "")
    conf = {
        "purpose": f"Recall {recall['id']}: retrain {spec.name} {how} ({reason})"[:2000],
        "change": change,
        "expected_impact": (f"The release gates pass on data {how}; production leaves the versions recall "
                            f"{recall['id']} holds once this version is approved and promoted.")[:2000],
        "scope": "every scenario the recalled input touched", "ticket": recall["id"],
        vocab.CONF_RECALL: {"id": recall["id"], "opened_by": recall.get("opened_by")},
    }
    return conf, how


class RecallOperator(DeploymentActionOperator):
    """Open, close or re-start the retrains of a recall for the person who triggered the run; on a
    ``production`` asset event, close the recalls that are done.

    :param specs: every template (trusted: templates are reviewed code).
    """

    ui_color = "#fde8e8"

    def client(self):
        import os

        from closedloop.hooks.mlflow import MLflowHook
        from closedloop.runtime.tracking import mlflow_client

        hook = MLflowHook("mlflow_default")
        os.environ.update(hook.credentials_env())
        return mlflow_client(hook.tracking_uri())

    def act(self, context: Context) -> dict:
        from closedloop.errors import ApprovalError
        from closedloop.hooks.signing import signer, verifier
        from closedloop.steps import recall

        dag_run = context["dag_run"]
        c, key, ring = self.client(), signer(), verifier()
        if str(getattr(dag_run.run_type, "value", dag_run.run_type)) == "asset_triggered":
            closed = recall.sweep(c, signer=key, verifier=ring)
            log.info("production moved: %s", f"closed {', '.join(closed)}" if closed else "no recall is done yet")
            return {"action": "sweep", "closed": closed}
        params = context["params"]
        actor = getattr(dag_run, "triggering_user_name", None)
        if not actor:
            raise ApprovalError("a recall is a person's: trigger closedloop_recall through Airflow (closedloop recall "
                                "open|close|retrain) so the run records who asked")
        action = str(params.get("action") or "")
        if action not in ACTIONS:
            raise recall.RecallError(f"action: expected one of {list(ACTIONS)}, got {action!r}")
        reason = str(params.get("reason") or "").strip()
        if action == "open":
            query = recall.query_of(**{k: (str(params.get(k) or "").strip() or None) for k in
                                       ("source", "window", "label_policy", "code_digest", "snapshot")})
            rows = recall.affected(c, query, ring)
            check_opener(self.specs, actor, {r["pipeline"] for r in rows if r["pipeline"]}, query)
            ti = context["ti"]
            out = recall.open_recall(c, query, reason=reason, by=actor, signer=key, verifier=ring, rows=rows,
                                     request=f"{ti.dag_id}/{ti.run_id}")
            log.info("recall %s (%s) %s by %s: %d version(s) held", out["id"], query.describe(),
                     "opened" if out["new"] else "was open already; opened again", actor, len(rows))
            for r in rows[:MAX_LISTED]:
                log.info("  held %s version %s%s: %s", r["model"], r["version"],
                         f" [{', '.join(r['live'])}]" if r["live"] else "", r["how"])
            return self.report(c, out, ring, retrains=self.retrain(c, out, rows))
        r = recall.get(c, str(params.get("recall") or "").strip(), ring)
        rows = recall.affected(c, recall.Query.of(r["query"]), ring)
        check_opener(self.specs, actor, {x["pipeline"] for x in rows if x["pipeline"]},
                     recall.Query.of(r["query"]), what=action)
        if action == "retrain":
            return self.report(c, {**r, "affected": rows, "new": False}, ring, retrains=self.retrain(c, r, rows))
        out = recall.close_recall(c, r["id"], by=actor, reason=reason, signer=key, verifier=ring)
        log.info("recall %s closed by %s: %s", r["id"], actor, (out["closed"] or {}).get("reason"))
        return self.report(c, {**out, "affected": rows, "new": False}, ring, retrains=[])

    def report(self, c, out: dict, ring, *, retrains: list[dict]) -> dict:
        from closedloop.steps import recall

        rows = out["affected"]
        return {"action": "recall", "id": out["id"], "query": recall.Query.of(out["query"]).describe(),
                "state": out["state"], "new": out.get("new", False), "opened_by": out.get("opened_by"),
                "reason": out.get("reason"), "closed": out.get("closed"),
                "totals": {"model_versions": len(rows), "pipelines": len({r["pipeline"] for r in rows})},
                "affected": rows[:MAX_LISTED],
                "proposals": [recall.proposal(c, m, ring) for m in sorted({r["model"] for r in rows})]
                if out["state"] == "open" else [],
                "retrains": retrains}

    def retrain(self, c, rec: dict, rows: list[dict]) -> list[dict]:
        """Start (once per pipeline and recall) each affected pipeline's retrain through the deployment's
        Airflow account; a pipeline whose retrain already started is listed with its run."""
        from closedloop import vocab
        from closedloop.hooks.airflow_api import service_api

        tag = vocab.RECALL_RETRAIN_PREFIX
        run = c.get_run(rec["mlflow_run_id"])
        started = {k.removeprefix(tag): v for k, v in run.data.tags.items() if k.startswith(tag)}
        by_name = {s.spec.name: s for s in self.specs}
        api = None
        out = []
        for name in sorted({r["pipeline"] for r in rows if r["pipeline"]}):
            loaded = by_name.get(name)
            if loaded is None:
                out.append({"pipeline": name, "run_id": None, "why": f"{name}: no template defines it now"})
                continue
            if name in started:
                out.append({"pipeline": name, "dag_id": name, "run_id": started[name], "why": "started earlier"})
                continue
            conf, how = retrain_request(loaded, rec)
            if conf is None:
                out.append({"pipeline": name, "run_id": None, "why": how})
                continue
            api = api or service_api()
            if api is None:
                out.append({"pipeline": name, "run_id": None, "why": "not started: the deployment has no Airflow API "
                            "account (connection closedloop_airflow_api); closedloop recall retrain once it has"})
                continue
            status, data = api.call("POST", f"/dags/{name}/dagRuns", {
                "logical_date": None, "conf": conf, "note": f"recall {rec['id']}: retrain {how}"})
            if status != 200:
                out.append({"pipeline": name, "run_id": None,
                            "why": f"Airflow refused the retrain (HTTP {status}): {(data or {}).get('detail')}"})
                continue
            c.set_tag(rec["mlflow_run_id"], tag + name, data["dag_run_id"])
            log.info("recall %s: retrain of %s started (%s): %s", rec["id"], name, data["dag_run_id"], how)
            out.append({"pipeline": name, "dag_id": name, "run_id": data["dag_run_id"], "why": how})
        return out

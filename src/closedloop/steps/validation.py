"""Step ``validate_data``: run the template's Great Expectations suite on the labelled snapshot."""

from __future__ import annotations

import json

from closedloop import vocab
from closedloop.errors import DataValidationError
from closedloop.runtime.context import RunContext
from closedloop.runtime.storage import read_snapshot
from closedloop.spec import LoadedSpec


def load_suite(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


DOCS_SITE = "closedloop"
DOCS_ARTIFACTS = "validation/data_docs"
"""Where a validation's Great Expectations Data Docs go on the step's MLflow run (with ``validation/result.json``,
Great Expectations' own validation result)."""
DOCS_SKIPPED = ("static/fonts", "static/images/glossary_scroller.gif",
                "static/images/validation_failed_unexpected_values.gif", "static/images/iterative-dev-loop.png")
"""Parts of a Data Docs site no validation page shows (fonts and the empty site's tutorial pictures: 4 MB)."""


def validate_frame(frame, suite: dict, docs_dir=None, run_name: str | None = None) -> tuple[dict, dict]:
    """Validate a DataFrame against a suite given as GX JSON: a compact report and Great Expectations' own
    validation result (JSON); with ``docs_dir``, its Data Docs site (the validation page and the suite) is built
    there by a checkpoint's ``UpdateDataDocsAction``; ``run_name`` names the validation in them (the Airflow run)."""
    import re

    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(site_name=DOCS_SITE, site_config={
            "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)}})
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE]))
    source = context.data_sources.add_pandas("closedloop")
    batches = source.add_dataframe_asset(name="snapshot").add_batch_definition_whole_dataframe("all")
    expectations = context.suites.add(gx.ExpectationSuite(name=suite["name"], expectations=suite["expectations"]))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite["name"], data=batches, suite=expectations))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="validate_data", validation_definitions=[definition], actions=actions,
        result_format={"result_format": "SUMMARY"}))
    named = RunIdentifier(run_name=re.sub(r"[^A-Za-z0-9_.+-]+", "_", run_name)) if run_name else None
    result = next(iter(checkpoint.run(batch_parameters={"dataframe": frame}, run_id=named).run_results.values()))
    checks = []
    for r in result.results:
        cfg = r.expectation_config
        res = r.result or {}
        checks.append({
            "expectation": cfg.type,
            "column": cfg.kwargs.get("column"),
            "success": bool(r.success),
            "unexpected_count": res.get("unexpected_count"),
            "unexpected_percent": round(res["unexpected_percent"], 3) if res.get("unexpected_percent") is not None else None,
            "observed_value": res.get("observed_value"),
            "partial_unexpected": [str(v) for v in (res.get("partial_unexpected_list") or [])[:5]],
        })
    failed = [c for c in checks if not c["success"]]
    report = {"suite": suite["name"], "success": not failed, "evaluated": len(checks), "failed": len(failed),
              "checks": checks}
    return report, result.to_json_dict()


def publish(client, run, docs_dir, gx_result: dict) -> dict:
    """Put the validation result and its Data Docs on the step's MLflow run; what the report links to:
    ``{"run_id", "result", "page", "index"}`` (artifact paths on that run; ``page`` is the validation's own)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    docs_dir = Path(docs_dir)
    for skipped in DOCS_SKIPPED:
        target = docs_dir / skipped
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    pages = sorted((docs_dir / "validations").rglob("*.html"))
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        result_file.write_text(json.dumps(gx_result, indent=1, sort_keys=True, default=str))
        client.log_artifact(run.info.run_id, str(result_file), "validation")
    client.log_artifacts(run.info.run_id, str(docs_dir), DOCS_ARTIFACTS)
    return {"run_id": run.info.run_id, "result": "validation/result.json", "index": f"{DOCS_ARTIFACTS}/index.html",
            "page": f"{DOCS_ARTIFACTS}/{pages[0].relative_to(docs_dir)}" if pages else None,
            "artifact_uri": run.info.artifact_uri}


def format_failures(report: dict) -> str:
    lines = []
    for c in report["checks"]:
        if c["success"]:
            continue
        detail = (f"{c['unexpected_count']} unexpected ({c['unexpected_percent']}%), e.g. {c['partial_unexpected']}"
                  if c["unexpected_count"] is not None else f"observed {c['observed_value']}")
        lines.append(f"  - {c['expectation']}({c['column'] or ''}): {detail}")
    return "\n".join(lines)


def validate_data(loaded: LoadedSpec, ctx: RunContext, *, labelled: dict) -> dict:
    """Raise :class:`DataValidationError` (permanent) with the failing expectations, or return the report.
    Cached by the labelled digest and the suite's content (a failure is never cached)."""
    from closedloop.runtime.cache import run_cached

    suite = load_suite(loaded.suite_path)
    key = validation_key(loaded, labelled, suite)

    def compute(run) -> dict:
        import tempfile

        from closedloop.runtime.tracking import client

        frame = read_snapshot(labelled["uri"], labelled["digest"])
        with tempfile.TemporaryDirectory() as docs:
            report, gx_result = validate_frame(frame, suite, docs_dir=docs, run_name=f"{ctx.dag_id}/{ctx.run_id}")
            report["data_docs"] = publish(client(ctx), run, docs, gx_result)  # a failed check too: people open it
        report["digest"] = labelled["digest"]
        if not report["success"]:
            raise DataValidationError(
                f"snapshot {labelled['digest']} failed {report['failed']} of {report['evaluated']} expectations "
                f"of suite {report['suite']!r}:\n{format_failures(report)}\nGreat Expectations Data Docs: "
                f"{report['data_docs']['page']} on MLflow run {run.info.run_id}", report=report)
        report["checks"] = [c for c in report["checks"] if not c["success"]]  # keep XCom small
        return report

    return run_cached(loaded, ctx, "validate_data", key, compute,
                      tags={vocab.DATASET_VERSION: labelled["digest"]})


def plan(loaded: LoadedSpec, ctx, results: dict):
    """The step table's cache-plan entry of ``validate_data``."""
    labelled = results["label"]
    return validation_key(loaded, labelled), {vocab.DATASET_VERSION: labelled["digest"]}, None


def validation_key(loaded: LoadedSpec, labelled: dict, suite: dict | None = None) -> str:
    """Cache key of ``validate_data``: the labelled snapshot and the suite's content."""
    import hashlib

    from closedloop.runtime.cache import key_of

    suite = suite if suite is not None else load_suite(loaded.suite_path)
    suite_digest = hashlib.sha256(json.dumps(suite, sort_keys=True).encode()).hexdigest()[:16]
    return key_of(loaded, "validate_data", dataset=labelled["digest"], suite=suite_digest, upstream=labelled.get("cache_key"))

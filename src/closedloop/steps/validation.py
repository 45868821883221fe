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


def validate_frame(frame, suite: dict) -> dict:
    """Validate a DataFrame against a suite given as GX JSON; return a compact report."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("closedloop")
    asset = source.add_dataframe_asset(name="snapshot")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(gx.ExpectationSuite(name=suite["name"], expectations=suite["expectations"]))
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
    return {"suite": suite["name"], "success": not failed, "evaluated": len(checks),
            "failed": len(failed), "checks": checks}


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
        frame = read_snapshot(labelled["uri"], labelled["digest"])
        report = validate_frame(frame, suite)
        report["digest"] = labelled["digest"]
        if not report["success"]:
            raise DataValidationError(
                f"snapshot {labelled['digest']} failed {report['failed']} of {report['evaluated']} expectations "
                f"of suite {report['suite']!r}:\n{format_failures(report)}", report=report)
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

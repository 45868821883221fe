"""A pipeline step inside a Kubernetes pod: ``python -m closedloop.podstep STEP TEMPLATE``.

:class:`~closedloop.operators.pod.StepPodOperator` starts it with the step's inputs and the run's
identity in ``CLOSEDLOOP_STEP`` (JSON: ``{"context": RunContext fields, "inputs": {task: result}}``).
It calls the same step function a worker would (``train`` or ``simulate``), writes the result where
the KubernetesPodOperator's XCom sidecar reads it, and on failure writes to the termination log
whether the error is transient (``{"closedloop_error": {..., "transient": true}}``) so the worker's
retry policy decides as it would for a local step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from closedloop import pipeline

XCOM_PATH = "/airflow/xcom/return.json"
TERMINATION_LOG = "/dev/termination-log"
STEPS = pipeline.POD_STEPS


def run(step: str, template: str, payload: dict) -> dict:
    from closedloop.runtime.context import RunContext
    from closedloop.spec import load_spec

    loaded = load_spec(template)
    ctx = RunContext(**payload["context"])
    inputs = payload["inputs"]
    if step == "train":
        from closedloop.steps.training import train

        return train(loaded, ctx, labelled=inputs["label"], validation=inputs.get("validate_data"),
                     raw=inputs.get("generate_dataset"))
    from closedloop.steps.simulation import Shard, simulate_inline

    shard = Shard(*payload["shard"]) if payload.get("shard") else None
    return simulate_inline(loaded, ctx, trained=inputs["train"], shard=shard)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in STEPS:
        print(f"usage: python -m closedloop.podstep {{{'|'.join(STEPS)}}} TEMPLATE  (inputs in $CLOSEDLOOP_STEP)",
              file=sys.stderr)
        return 2
    step, template = argv
    try:
        out = run(step, template, json.loads(os.environ["CLOSEDLOOP_STEP"]))
    except Exception as exc:
        from closedloop.errors import classify

        transient, reason = classify(exc)
        note = {"closedloop_error": {"error_class": type(exc).__name__, "message": str(exc)[:2000],
                                     "transient": transient, "reason": reason}}
        try:
            Path(os.environ.get("CLOSEDLOOP_TERMINATION_LOG", TERMINATION_LOG)).write_text(json.dumps(note))
        except OSError:
            pass
        raise
    path = Path(os.environ.get("CLOSEDLOOP_XCOM_PATH", XCOM_PATH))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

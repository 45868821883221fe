"""Step ``label``: apply the template's label policy to a raw snapshot."""

from __future__ import annotations

from closedloop.spec import LoadedSpec
from closedloop.steps.context import RunContext, resolve
from closedloop.steps.storage import read_snapshot, write_snapshot


def label(loaded: LoadedSpec, ctx: RunContext, *, raw: dict) -> dict:
    """Label the raw snapshot; the labelled snapshot is content-addressed like the raw one.

    :param raw: the output of ``generate_dataset``.
    :return: ``{uri, digest, rows, label_policy, raw_digest}``.
    """
    policy = loaded.spec.label_policy
    frame = read_snapshot(raw["uri"], raw["digest"])
    labelled = resolve(policy.entry_point)(frame, version=policy.version, **policy.params)
    ref = write_snapshot(labelled, root=ctx.data_root, pipeline=loaded.spec.name, kind="labelled")
    return {**ref, "label_policy": policy.ref, "raw_digest": raw["digest"]}

"""Step ``label``: apply the template's label policy to a raw snapshot."""

from __future__ import annotations

from closedloop import vocab
from closedloop.runtime.context import RunContext, resolve
from closedloop.runtime.storage import read_snapshot, write_snapshot
from closedloop.spec import LoadedSpec


def label(loaded: LoadedSpec, ctx: RunContext, *, raw: dict) -> dict:
    """Label the raw snapshot; the labelled snapshot is content-addressed like the raw one.
    Cached by the raw digest and the label policy (name, version, entry point, parameters).

    :param raw: the output of ``generate_dataset``.
    :return: ``{uri, digest, rows, label_policy, raw_digest, cache_key}``.
    """
    from closedloop.runtime.cache import run_cached, snapshot_exists

    policy = loaded.spec.label_policy
    key = label_key(loaded, ctx, raw)

    def compute(run) -> dict:
        frame = read_snapshot(raw["uri"], raw["digest"])
        labelled = resolve(policy.entry_point)(frame, version=policy.version, **policy.params)
        ref = write_snapshot(labelled, root=ctx.data_root, pipeline=loaded.spec.name, kind="labelled")
        from closedloop.runtime.faults import strike

        strike(ctx, "snapshot_written")
        return {**ref, "label_policy": policy.ref, "raw_digest": raw["digest"]}

    return run_cached(loaded, ctx, "label", key, compute, valid=snapshot_exists, tags=label_tags(raw))


def label_key(loaded: LoadedSpec, ctx: RunContext, raw: dict) -> str:
    """Cache key of ``label``: the raw snapshot, the whole label policy, where snapshots live."""
    from closedloop.runtime.cache import key_of

    return key_of(loaded, "label", raw_digest=raw["digest"], label_policy=loaded.spec.label_policy.model_dump(mode="json"),
                  upstream=raw.get("cache_key"), root=ctx.data_root)


def plan(loaded: LoadedSpec, ctx: RunContext, results: dict):
    """The step table's cache-plan entry: key, tags and check of ``label`` from the results so far."""
    from closedloop.runtime.cache import snapshot_exists

    raw = results["generate_dataset"]
    return label_key(loaded, ctx, raw), label_tags(raw), snapshot_exists


def label_tags(raw: dict) -> dict[str, str]:
    return {vocab.RAW_DATASET_VERSION: raw["digest"]}

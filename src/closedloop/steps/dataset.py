"""Step ``generate_dataset``: the raw fleet-log snapshot for a data window."""

from __future__ import annotations

from datetime import date, timedelta

from closedloop.runtime.context import RunContext, resolve
from closedloop.runtime.storage import write_snapshot
from closedloop.spec import LoadedSpec


def data_window(spec_window_days: int, interval_end: date) -> tuple[date, date]:
    """The ``window_days`` days ending at (excluding) the run's data interval end."""
    return interval_end - timedelta(days=spec_window_days), interval_end


def dataset_key(loaded: LoadedSpec, ctx: RunContext, *, window_start: str, window_end: str,
                focus: dict | None) -> str:
    """Cache key of ``generate_dataset``: the dataset section, the window, the sampling and where
    snapshots live."""
    from closedloop.runtime.cache import key_of

    return key_of(loaded, "generate_dataset", pipeline=loaded.spec.name, dataset=loaded.spec.dataset.model_dump(mode="json"),
                  window=[window_start, window_end], focus=focus or {}, root=ctx.data_root)


def generate_dataset(loaded: LoadedSpec, ctx: RunContext, *, interval_end: date,
                     focus: dict[str, float] | None = None, pinned: dict | None = None) -> dict:
    """Generate the raw snapshot of the template's sources for the run's window — or reuse it:
    done earlier in this run, cached from an earlier run with the same inputs, or ``pinned``.

    :param interval_end: the run's data interval end; the window is the ``window_days``
        before it, so reruns and backfills of the same interval get the same data.
    :param focus: sampling multiplier per scenario type (the template's ``sampling``, raised
        for an incident's scenario type); given to the generator as ``focus``.
    :param pinned: an earlier run's raw snapshot to read back instead (``closedloop rerun``).
    :return: ``{uri, digest, rows, sources, window_start, window_end, scenarios, cache_key}``.
    """
    from closedloop.runtime.cache import run_cached, snapshot_exists

    ds = loaded.spec.dataset
    if pinned is not None:
        check_pin(pinned, root=ctx.data_root, pipeline=loaded.spec.name)  # before any lookup or read
        key = dataset_key(loaded, ctx, window_start=pinned["window_start"], window_end=pinned["window_end"],
                          focus=pinned.get("focus"))
        out = run_cached(loaded, ctx, "generate_dataset", key, lambda run: pinned_snapshot(pinned, root=ctx.data_root, pipeline=loaded.spec.name),
                         valid=lambda hit: hit["digest"] == pinned["digest"] and snapshot_exists(hit))
        return {**out, "pinned": True}  # a cache hit is the same snapshot, checked
    start, end = data_window(ds.window_days, interval_end)
    focus = dict(ds.sampling) if focus is None else focus
    key = dataset_key(loaded, ctx, window_start=start.isoformat(), window_end=end.isoformat(), focus=focus)
    return run_cached(loaded, ctx, "generate_dataset", key,
                      lambda run: _generate(loaded, ctx, start, end, focus), valid=snapshot_exists)


def _generate(loaded: LoadedSpec, ctx: RunContext, start: date, end: date, focus: dict[str, float]) -> dict:
    ds = loaded.spec.dataset
    generator = resolve(ds.generator)
    extra = {"focus": focus} if focus else {}
    frame = generator(sources=list(ds.sources), window_start=start, window_end=end,
                      scenarios=list(ds.scenarios), seed=ds.seed, **ds.params, **extra)
    ref = write_snapshot(frame, root=ctx.data_root, pipeline=loaded.spec.name, kind="raw")
    from closedloop.runtime.faults import strike

    strike(ctx, "snapshot_written")
    counts = frame["scenario"].value_counts().to_dict() if "scenario" in frame else {}
    return {**ref, "sources": list(ds.sources), "scenarios": list(ds.scenarios),
            "window_start": start.isoformat(), "window_end": end.isoformat(), "focus": focus,
            "rows_per_scenario": {str(k): int(v) for k, v in sorted(counts.items())}}


def check_pin(raw: dict, *, root: str, pipeline: str) -> None:
    """A pinned snapshot must be this pipeline's raw snapshot under the data root, named by its sha256.

    The schema Airflow checks at trigger time says the same (:func:`closedloop.spec.request.rerun_schema`);
    here it is checked again where the file is read, with symlinks resolved for a local root.

    :raises PermanentError: naming what is out of bounds.
    """
    import os

    from closedloop.errors import PermanentError
    from closedloop.runtime.storage import DIGEST_RE, snapshot_uri

    digest, uri = str(raw.get("digest") or ""), str(raw.get("uri") or "")
    if not DIGEST_RE.match(digest):
        raise PermanentError(f"pinned snapshot digest {digest!r} is not a sha256 (64 hex digits)")
    expected = snapshot_uri(root, pipeline, "raw", digest)
    if uri != expected:
        raise PermanentError(f"pinned snapshot {uri!r} is outside this pipeline's data root: a rerun reads only "
                             f"{expected}")
    if "://" not in root or root.startswith("file://"):
        real_root = os.path.realpath(root.removeprefix("file://"))
        real = os.path.realpath(expected.removeprefix("file://"))
        if not real.startswith(real_root + os.sep):
            raise PermanentError(f"pinned snapshot {uri} resolves to {real}, outside the data root {real_root}")


def pinned_snapshot(raw: dict, *, root: str, pipeline: str) -> dict:
    """An earlier run's raw snapshot, checked against its digest (``closedloop rerun``).

    :raises PermanentError: when the snapshot is out of bounds, gone, or its content changed.
    """
    from closedloop.errors import PermanentError
    from closedloop.runtime.storage import read_snapshot

    check_pin(raw, root=root, pipeline=pipeline)
    try:
        frame = read_snapshot(raw["uri"], raw["digest"])
    except FileNotFoundError:
        raise PermanentError(f"pinned snapshot {raw['digest']} is gone from {raw['uri']}; rerun with --fresh-data "
                             "to build a new one (it will not be the same data)") from None
    return {**raw, "rows": int(len(frame)), "created": False, "pinned": True}

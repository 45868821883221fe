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
                focus: dict | None, exclude: list[dict] | None = None) -> str:
    """Cache key of ``generate_dataset``: the dataset section, the window, the sampling, what recalls
    take out and where snapshots live."""
    from closedloop.runtime.cache import key_of

    extra = {"exclude": [{k: e.get(k) for k in ("source", "window")} for e in exclude]} if exclude else {}
    return key_of(loaded, "generate_dataset", pipeline=loaded.spec.name, dataset=loaded.spec.dataset.model_dump(mode="json"),
                  window=[window_start, window_end], focus=focus or {}, root=ctx.data_root, **extra)


def relevant(exclude: list[dict] | None, start: date, end: date) -> list[dict]:
    """The recalled (source, days) that fall in the window [start, end): the rest changes nothing."""
    out = []
    for e in exclude or []:
        w = e.get("window")
        if w is None or (w[0] < end.isoformat() and start.isoformat() <= w[1]):
            out.append(e)
    return out


def generate_dataset(loaded: LoadedSpec, ctx: RunContext, *, interval_end: date,
                     focus: dict[str, float] | None = None, pinned: dict | None = None,
                     exclude: list[dict] | None = None) -> dict:
    """Generate the raw snapshot of the template's sources for the run's window — or reuse it:
    done earlier in this run, cached from an earlier run with the same inputs, or ``pinned``.

    :param interval_end: the run's data interval end; the window is the ``window_days``
        before it, so reruns and backfills of the same interval get the same data.
    :param focus: sampling multiplier per scenario type (the template's ``sampling``, raised
        for an incident's scenario type); given to the generator as ``focus``.
    :param pinned: an earlier run's raw snapshot to read back instead (``closedloop rerun``).
    :param exclude: what recalls take out of the data: ``[{source, window: [first, last] | None, recall}]``
        (:func:`closedloop.steps.recall.exclusions`); listed in the result as ``excluded``.
    :return: ``{uri, digest, rows, sources, window_start, window_end, scenarios, excluded, cache_key}``.
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
    exclude = relevant(exclude, start, end)
    key = dataset_key(loaded, ctx, window_start=start.isoformat(), window_end=end.isoformat(), focus=focus,
                      exclude=exclude)
    return run_cached(loaded, ctx, "generate_dataset", key,
                      lambda run: _generate(loaded, ctx, start, end, focus, exclude), valid=snapshot_exists)


def _generate(loaded: LoadedSpec, ctx: RunContext, start: date, end: date, focus: dict[str, float],
              exclude: list[dict] | None = None) -> dict:
    from closedloop.errors import PermanentError

    ds = loaded.spec.dataset
    generator = resolve(ds.generator)
    extra = {"focus": focus} if focus else {}
    whole = {e["source"] for e in exclude or [] if e.get("window") is None}
    sources = [s for s in ds.sources if s not in whole]
    if not sources:
        raise PermanentError(f"recalls {sorted({e['recall'] for e in exclude or []})} take every source of "
                             f"{loaded.spec.name} ({', '.join(ds.sources)}) out of its data: nothing left to train on")
    frame = generator(sources=sources, window_start=start, window_end=end,
                      scenarios=list(ds.scenarios), seed=ds.seed, **ds.params, **extra)
    dropped = 0
    for e in exclude or []:
        if e.get("window") is None or "source" not in frame or "log_date" not in frame:
            continue
        import pandas as pd

        days = pd.to_datetime(frame["log_date"])
        bad = (frame["source"] == e["source"]) & (days >= pd.Timestamp(e["window"][0])) \
            & (days <= pd.Timestamp(e["window"][1]))
        dropped += int(bad.sum())
        frame = frame[~bad].reset_index(drop=True)
    if len(frame) == 0:
        raise PermanentError(f"recalls {sorted({e['recall'] for e in exclude or []})} leave no rows in "
                             f"{loaded.spec.name}'s window {start}..{end}")
    ref = write_snapshot(frame, root=ctx.data_root, pipeline=loaded.spec.name, kind="raw")
    from closedloop.runtime.faults import strike

    strike(ctx, "snapshot_written")
    counts = frame["scenario"].value_counts().to_dict() if "scenario" in frame else {}
    return {**ref, "sources": sources, "scenarios": list(ds.scenarios),
            "window_start": start.isoformat(), "window_end": end.isoformat(), "focus": focus,
            "excluded": [{**e, "rows": dropped if e.get("window") else None} for e in exclude or []],
            "rows_per_scenario": {str(k): int(v) for k, v in sorted(counts.items())}}


def check_pin(raw: dict, *, root: str, pipeline: str) -> str:
    """Where a pinned snapshot is: this pipeline's raw snapshot under the data root, named by its sha256 —
    a rerun names the digest, never the file (:class:`closedloop.spec.request.RerunPin`); checked again here
    where the file is read, with symlinks resolved for a local root.

    :raises PermanentError: naming what is out of bounds.
    """
    import os

    from closedloop.errors import PermanentError
    from closedloop.runtime.storage import DIGEST_RE, snapshot_uri

    digest = str(raw.get("digest") or "")
    if not DIGEST_RE.match(digest):
        raise PermanentError(f"pinned snapshot digest {digest!r} is not a sha256 (64 hex digits)")
    expected = snapshot_uri(root, pipeline, "raw", digest)
    if raw.get("uri") not in (None, expected):
        raise PermanentError(f"pinned snapshot {raw['uri']!r} is outside this pipeline's data root: a rerun reads "
                             f"only {expected}")
    if "://" not in root or root.startswith("file://"):
        real_root = os.path.realpath(root.removeprefix("file://"))
        real = os.path.realpath(expected.removeprefix("file://"))
        if not real.startswith(real_root + os.sep):
            raise PermanentError(f"pinned snapshot {expected} resolves to {real}, outside the data root {real_root}")
    return expected


def pinned_snapshot(raw: dict, *, root: str, pipeline: str) -> dict:
    """An earlier run's raw snapshot, checked against its digest (``closedloop rerun``).

    :raises PermanentError: when the snapshot is out of bounds, gone, or its content changed.
    """
    from closedloop.errors import PermanentError
    from closedloop.runtime.storage import read_snapshot

    uri = check_pin(raw, root=root, pipeline=pipeline)
    try:
        frame = read_snapshot(uri, raw["digest"])
    except FileNotFoundError:
        raise PermanentError(f"pinned snapshot {raw['digest']} is gone from {uri}; rerun with --fresh-data "
                             "to build a new one (it will not be the same data)") from None
    return {**raw, "uri": uri, "rows": int(len(frame)), "created": False, "pinned": True}

"""The scenario catalog format every simulator entry point reads (``include/scenarios/*.yaml``,
plus the regression scenarios of :mod:`closedloop.steps.regression`).

A catalog is ``{"duration_s": …, "scenarios": [entry, …]}``; an entry has ``id``, ``type``, ``seed``,
``repeats``, optional ``params``, ``safety_critical``, ``incident`` (a regression scenario) and
``first`` (a slice of a larger entry: a shard's part, or a further round of an adaptive budget).
"""

from __future__ import annotations


def expand_catalog(catalog: dict) -> list[dict]:
    """One entry per simulated episode.

    Episode ``i`` of an entry is ``<id>#<i>`` with seed ``seed + i``; an entry with ``first: k``
    numbers its episodes from ``k``, so a slice simulates exactly the episodes it has in the whole
    catalog. ``incident`` marks a regression scenario (built from that incident)."""
    episodes = []
    for entry in catalog["scenarios"]:
        first = int(entry.get("first", 0))
        for i in range(first, first + int(entry.get("repeats", 1))):
            episodes.append({
                "id": f"{entry['id']}#{i}", "type": entry["type"], "seed": int(entry.get("seed", 0)) + i,
                "params": dict(entry.get("params") or {}),
                "safety_critical": bool(entry.get("safety_critical", False)),
                "incident": entry.get("incident"),
            })
    return episodes


def next_round(catalog: dict, round_index: int) -> dict:
    """Round ``round_index`` (0 is the catalog itself) of the same scenarios with fresh seeds: each
    entry's episodes continue where the previous round's ended (ids ``<id>#<i>`` and seeds
    ``seed + i`` never repeat), so every round is as reproducible as the first."""
    return {**catalog, "scenarios": [
        {**e, "first": int(e.get("first", 0)) + round_index * int(e.get("repeats", 1))} for e in catalog["scenarios"]]}

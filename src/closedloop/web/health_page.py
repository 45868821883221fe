"""The pipeline health page: server-rendered HTML with inline SVG charts (no script, no CDN).

The page is ``templates/health.html`` (Jinja, autoescaped); this module computes what it shows:
cards, and the geometry of the charts.
"""

from __future__ import annotations

from typing import Any

KIND_CSS = {"success": "ok", "rejected": "rejected", "failed": "bad", "other": "other"}


def _shown(value: Any) -> str:
    return "-" if value is None else str(value)


def runs_chart(p: dict, days: list[str]) -> dict:
    """Stacked bars per day: succeeded (green), failed (red), other (grey)."""
    width, height, pad = max(240, 26 * len(days)), 120, 18
    top = max([sum(d.values()) for d in p["per_day"].values()] + [1])
    bars, labels = [], []
    for i, day in enumerate(days):
        counts, y = p["per_day"][day], height - pad
        for kind in ("success", "rejected", "failed", "other"):
            h = (height - 2 * pad) * counts[kind] / top
            if h:
                y -= h
                bars.append({"css": KIND_CSS[kind], "x": 8 + 26 * i, "y": f"{y:.1f}", "h": f"{h:.1f}", "day": day,
                             "kind": kind, "count": counts[kind]})
        if i % max(2, len(days) // 8) == 0:  # a label is wider than a bar
            labels.append({"x": 8 + 26 * i, "y": height - 4, "text": day[5:]})
    return {"width": width, "height": height, "bars": bars, "labels": labels}


def wait_chart(h: dict) -> dict:
    """Horizontal bars: median queue wait and lead time to candidate per pipeline."""
    rows = [(n, p["queue_wait_s"]["median"] or 0, p["lead_time_to_candidate_s"]["median"] or 0)
            for n, p in h["pipelines"].items()]
    top = max([max(q, lt) for _, q, lt in rows] + [1])
    bars, y = [], 4
    for name, q, lt in rows:
        for label, value in (("queue wait", q), ("lead time", lt)):
            w = 300 * value / top
            bars.append({"name": name, "label": label, "y": y, "w": f"{w:.1f}", "tx": f"{176 + w:.1f}",
                         "value": f"{value:g}"})
            y += 18
    return {"height": y + 4, "bars": bars}


def cache_bars(cache: dict) -> list[dict]:
    """One bar per step: how often the step cache answered it in the window."""
    steps = cache.get("hits_by_step") or {}
    top = max(steps.values()) if steps else 1
    return [{"step": step, "n": n, "y": 4 + 18 * i, "w": f"{240 * n / top:.1f}", "tx": f"{126 + 240 * n / top:.1f}"}
            for i, (step, n) in enumerate(steps.items())]


def _rejections(p: dict) -> str:
    n, rate = p.get("gate_rejections") or 0, p.get("gate_rejection_rate")
    if not n:
        return "0"
    top = ", ".join(f"{m} {k}" for m, k in list((p.get("rejected_by") or {}).items())[:3])
    return f"{n} ({rate:.0%}): {top}" if rate is not None else str(n)


def view(h: dict[str, Any], days: int) -> dict[str, Any]:
    """What the page shows, from the health figures (:mod:`closedloop.records.health`)."""
    sections = []
    for name, p in h["pipelines"].items():
        v = (h.get("versions") or {}).get(name, {})
        fr = f"{p['failure_rate']:.0%}" if p["failure_rate"] is not None else "-"
        cache = (h.get("cache") or {}).get(name) or {}
        hits = f"{cache['hits']} of {cache['hits'] + cache['misses']}" if cache else None
        cards = [{"key": k, "label": label, "value": _shown(val)} for k, label, val in (
            ("runs", "runs", p["runs"]), ("failure_rate", "failure rate (errors)", fr),
            ("gate_rejections", "rejected by a gate", _rejections(p)),
            ("queue_wait", "median queue wait (s)", p["queue_wait_s"]["median"]),
            ("lead_time", "trigger → candidate (s)", p["lead_time_to_candidate_s"]["median"]),
            ("incident_to_production", "incident → production (s)", p["incident_to_production_s"]["median"]),
            ("retries", "retries", p["retries"]), ("cache_hits", "step cache hits", hits),
            ("pending_approvals", "pending approvals", p["pending_approvals"]),
            ("production", "production version", v.get("production")),
            ("candidate", "candidate version", v.get("candidate")))]
        sections.append({"name": name, "dags": ", ".join(p["dags"]), "cards": cards,
                         "problems": v.get("registry_problems") or [], "runs": runs_chart(p, h["days"]),
                         "cache_bars": cache_bars(cache)})
    return {"sections": sections, "days": days, "day_options": (1, 7, 30, 90), "since": h["since"][:16],
            "until": h["until"][:16], "wait": wait_chart(h), "template_errors": h.get("template_errors") or [],
            "recalls": h.get("recalls") or []}


def render(h: dict[str, Any], days: int) -> str:
    from closedloop.runtime.pages import render as render_page

    return render_page("health.html", **view(h, days))

"""The pipeline health page: server-rendered HTML with inline SVG charts (no script, no CDN)."""

from __future__ import annotations

import html
from typing import Any

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5rem;color:#1f2937} h1{font-size:1.3rem}
h2{font-size:1.1rem;margin:1.6rem 0 .4rem} table{border-collapse:collapse} td,th{border:1px solid #d1d5db;
padding:.25rem .6rem;text-align:left} .ok{fill:#16a34a} .bad{fill:#dc2626} .other{fill:#9ca3af}
.bar{fill:#2563eb} .card{display:inline-block;border:1px solid #d1d5db;border-radius:6px;padding:.5rem .8rem;
margin:.2rem .4rem .2rem 0} .card b{display:block;font-size:1.2rem} svg text{font-size:10px;fill:#374151}
.alarm{border-color:#dc2626;background:#fee2e2;color:#991b1b} .alarm li{margin:.2rem 0}"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def runs_chart(name: str, p: dict, days: list[str]) -> str:
    """Stacked bars per day: succeeded (green), failed (red), other (grey)."""
    width, height, pad = max(240, 26 * len(days)), 120, 18
    top = max([sum(d.values()) for d in p["per_day"].values()] + [1])
    bars = []
    for i, day in enumerate(days):
        counts, y = p["per_day"][day], height - pad
        for kind in ("success", "failed", "other"):
            h = (height - 2 * pad) * counts[kind] / top
            if h:
                y -= h
                bars.append(f'<rect class="{ {"success": "ok", "failed": "bad", "other": "other"}[kind]}" '
                            f'x="{8 + 26 * i}" y="{y:.1f}" width="18" height="{h:.1f}" data-day="{day}" '
                            f'data-kind="{kind}" data-count="{counts[kind]}"><title>{day}: {counts[kind]} '
                            f'{kind}</title></rect>')
        if i % max(2, len(days) // 8) == 0:  # a label is wider than a bar
            bars.append(f'<text x="{8 + 26 * i}" y="{height - 4}">{day[5:]}</text>')
    return (f'<svg class="runs-chart" data-pipeline="{_e(name)}" width="{width}" height="{height}" role="img" '
            f'aria-label="runs per day of {_e(name)}">{"".join(bars)}</svg>')


def wait_chart(h: dict) -> str:
    """Horizontal bars: median queue wait and lead time to candidate per pipeline."""
    rows = [(n, p["queue_wait_s"]["median"] or 0, p["lead_time_to_candidate_s"]["median"] or 0)
            for n, p in h["pipelines"].items()]
    top = max([max(q, lt) for _, q, lt in rows] + [1])
    parts, y = [], 4
    for name, q, lt in rows:
        for label, value in (("queue wait", q), ("lead time", lt)):
            w = 300 * value / top
            parts.append(f'<text x="0" y="{y + 10}">{_e(name)} {label}</text><rect class="bar" x="170" y="{y}" '
                         f'width="{w:.1f}" height="12"/><text x="{176 + w:.1f}" y="{y + 10}">{value:g} s</text>')
            y += 18
    return f'<svg class="wait-chart" width="560" height="{y + 4}" role="img">{"".join(parts)}</svg>'


def cache_chart(name: str, cache: dict) -> str:
    """One bar per step: how often the step cache answered it in the window."""
    steps = cache.get("hits_by_step") or {}
    if not steps:
        return ""
    top = max(steps.values())
    parts = []
    for i, (step, n) in enumerate(steps.items()):
        w = 240 * n / top
        parts.append(f'<text x="0" y="{14 + 18 * i}">{_e(step)}</text><rect class="bar" x="120" y="{4 + 18 * i}" '
                     f'width="{w:.1f}" height="12" data-step="{_e(step)}" data-hits="{n}"/>'
                     f'<text x="{126 + w:.1f}" y="{14 + 18 * i}">{n}</text>')
    return (f'<h3>Step cache hits</h3><svg class="cache-chart" data-pipeline="{_e(name)}" width="420" '
            f'height="{8 + 18 * len(steps)}" role="img">{"".join(parts)}</svg>')


def render(h: dict[str, Any], days: int) -> str:
    sections = []
    for name, p in h["pipelines"].items():
        v = (h.get("versions") or {}).get(name, {})
        fr = f"{p['failure_rate']:.0%}" if p["failure_rate"] is not None else "-"
        cache = (h.get("cache") or {}).get(name) or {}
        hits = f"{cache['hits']} of {cache['hits'] + cache['misses']}" if cache else None
        cards = "".join(f'<span class="card" data-figure="{k}"><b>{_e(val)}</b>{_e(label)}</span>' for k, label, val in (
            ("runs", "runs", p["runs"]), ("failure_rate", "failure rate", fr),
            ("queue_wait", "median queue wait (s)", p["queue_wait_s"]["median"]),
            ("lead_time", "trigger → candidate (s)", p["lead_time_to_candidate_s"]["median"]),
            ("incident_to_production", "incident → production (s)", p["incident_to_production_s"]["median"]),
            ("retries", "retries", p["retries"]), ("cache_hits", "step cache hits", hits),
            ("pending_approvals", "pending approvals", p["pending_approvals"]),
            ("production", "production version", v.get("production")), ("candidate", "candidate version",
                                                                          v.get("candidate"))))
        problems = v.get("registry_problems") or []
        alarm = ('<div class="card alarm" data-figure="registry"><b>Registry: unexplained alias move</b><ul>'
                 + "".join(f"<li>{_e(x)}</li>" for x in problems) + "</ul></div>") if problems else ""
        sections.append(f'<section data-pipeline="{_e(name)}"><h2>{_e(name)}</h2><p>{_e(", ".join(p["dags"]))}</p>'
                        f'{alarm}{cards}<h3>Runs per day</h3>{runs_chart(name, p, h["days"])}'
                        f'{cache_chart(name, cache)}</section>')
    options = "".join(f'<option value="{d}"{" selected" if d == days else ""}>{d} days</option>' for d in (1, 7, 30, 90))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>closedloop health</title>'
            f'<style>{STYLE}</style></head><body><h1>Pipeline health</h1>'
            f'<form method="get">window <select name="days" onchange="this.form.submit()">{options}</select></form>'
            f'<p>{_e(h["since"][:16])} .. {_e(h["until"][:16])} UTC, from Airflow\'s records and the MLflow registry.'
            f'</p>{"".join(sections) or "<p>No pipelines.</p>"}<h2>Queue wait and lead time (median)</h2>'
            f'{wait_chart(h)}</body></html>')

"""What a reviewer and a reader of the registry see: the review card and the model card.

Both are generated from the records only (the model version's tags, its training run's dataset
manifest, its gate run's metrics, report and shift report, the review tags) — never written by hand.

- The **review card** compares a candidate with the version behind ``production`` (with no
  production yet it compares with nothing and says so): offline and simulation metrics per scenario
  type with deltas and each gate's verdict, the datasets (rows per scenario and source, window,
  label policy), the distribution-shift report, the request or incident, the lineage, and charts
  (per-scenario bars, feature distributions). JSON and HTML, logged on the version's training run
  (``review/card.json``, ``review/card.html``), served by the plugin, linked from the approval.
- The **model card** is the version's description in the MLflow registry (Markdown): intended use,
  data, metrics per scenario, known limitations (what the gates and incidents found, thin evidence),
  approvals. Written at registration, rewritten at promotion and at each review decision.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from closedloop import vocab
from closedloop.runtime.pages import shown

CARD_JSON = "review/card.json"
CARD_HTML = "review/card.html"
SHIFTED_PSI = 0.25


def _artifact(client, run_id: str | None, path: str) -> Any:
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # not logged (an older run, a step that did not get there)
            return None
        return json.loads(Path(local).read_text())


def _version_record(client, model: str, version: str | None) -> dict | None:
    """What the records say about one version: tags, training manifest, gate metrics and report."""
    if version is None:
        return None
    mv = client.get_model_version(model, str(version))
    tags = dict(mv.tags)
    train = client.get_run(mv.run_id) if mv.run_id else None
    manifest = json.loads((train.data.tags.get(vocab.DATASET_MANIFEST) if train else None) or "null") or {}
    gate_id = tags.get(vocab.GATE_RUN_ID)
    gate = client.get_run(gate_id) if gate_id else None
    return {"version": str(mv.version), "aliases": list(mv.aliases), "tags": tags, "run_id": mv.run_id,
            "manifest": manifest, "metrics": dict(gate.data.metrics) if gate else {},
            "gate_run_id": gate_id, "report": _artifact(client, gate_id, "gates/report.json") or [],
            "shift": _artifact(client, gate_id, "shift/report.json"),
            "label_policy": tags.get(vocab.LABEL_POLICY), "code_digest": tags.get(vocab.CODE_DIGEST),
            "template": tags.get(vocab.TEMPLATE), "template_hash": tags.get(vocab.TEMPLATE_HASH),
            "pipeline": tags.get(vocab.PIPELINE), "dag_id": tags.get(vocab.AIRFLOW_DAG_ID),
            "run": tags.get(vocab.AIRFLOW_RUN_ID)}


def _per_scenario(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``sim.<type>.<metric>`` (and ``offline.<group>.<metric>``) → {type: {metric: value}}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split(".")
        if parts[0] in ("sim", "offline") and len(parts) == 3:
            out.setdefault(parts[1], {})[f"{parts[0]}.{parts[2]}"] = value
    return out


def review_card(client, model: str, version: str) -> dict[str, Any]:
    """The review card of ``version`` against the current ``production`` (JSON-ready)."""
    cand = _version_record(client, model, version)
    try:
        prod_version = str(client.get_model_version_by_alias(model, vocab.PRODUCTION).version)
    except Exception:
        prod_version = None
    prod = _version_record(client, model, prod_version) if prod_version not in (None, str(version)) else None
    keys = sorted(k for k in set(cand["metrics"]) | set((prod or {}).get("metrics", {}))
                  if k.split(".")[0] in ("offline", "sim", "hil", "shift"))
    metrics = []
    for k in keys:
        a, b = cand["metrics"].get(k), (prod or {}).get("metrics", {}).get(k)
        metrics.append({"metric": k, "candidate": a, "production": b,
                        "delta": round(a - b, 6) if a is not None and b is not None else None})
    scen_c, scen_p = _per_scenario(cand["metrics"]), _per_scenario((prod or {}).get("metrics", {}))
    tags = cand["tags"]
    return {
        "model": model, "version": str(version),
        "compared_with": {"version": prod["version"], "note": None} if prod else
        {"version": None, "note": ("no production version yet: nothing to compare with" if prod_version is None
                                   else "this version is production")},
        "metrics": metrics,
        "per_scenario": {t: {"candidate": scen_c.get(t, {}), "production": scen_p.get(t, {})}
                         for t in sorted(set(scen_c) | set(scen_p))},
        "gates": cand["report"],
        "datasets": {"candidate": cand["manifest"], "production": (prod or {}).get("manifest"),
                     "label_policy": {"candidate": cand["label_policy"], "production": (prod or {}).get("label_policy")}},
        "shift": cand["shift"],
        "request": {k.removeprefix(vocab.REQUEST_PREFIX): v for k, v in tags.items()
                    if k.startswith(vocab.REQUEST_PREFIX)},
        "incident": {k.removeprefix(vocab.INCIDENT_PREFIX): v for k, v in tags.items()
                     if k.startswith(vocab.INCIDENT_PREFIX)} or None,
        "lineage": {"pipeline": cand["pipeline"], "airflow_run": f"{cand['dag_id']}/{cand['run']}",
                    "training_run": cand["run_id"], "gate_run": cand["gate_run_id"],
                    "template": f"{cand['template']}@{cand['template_hash']}", "code_digest": cand["code_digest"],
                    "dataset": tags.get(vocab.DATASET_VERSION), "raw_dataset": tags.get(vocab.RAW_DATASET_VERSION)},
        "review": {k.removeprefix(vocab.REVIEW_PREFIX): v for k, v in tags.items()
                   if k.startswith(vocab.REVIEW_PREFIX)} or None,
    }


# ---------------------------------------------------------------- HTML (self-contained, no script)

HIGHER_IS_BETTER = ("min_ttc_s", "mean_time_headway_s")
"""Metric leaves where more is better (time to collision, headway); for every other one, less is."""


def higher_is_better(metric: str) -> bool:
    return metric.rsplit(".", 1)[-1] in HIGHER_IS_BETTER


def _bars(title: str, rows: list[tuple[str, float | None, float | None]], *, threshold: float | None = None,
          log: bool = False) -> dict:
    """Grouped horizontal bars (candidate blue, production grey) with the gate's threshold as a red line:
    the geometry; the template draws it. ``log``: a log scale (values spanning decades, e.g. time to
    collision: 1.8 s against a 54 s cruise), so the margin to a small threshold stays visible."""
    import math

    values = [v for _, a, b in rows for v in (a, b) if v is not None] + ([threshold] if threshold is not None else [])
    floor = min([v for v in values if v > 0] or [1.0]) / 2  # a log axis starts half-way below the smallest value

    def scale(v: float) -> float:
        return math.log10(max(v, floor) / floor) if log else v

    top = max([scale(v) for v in values] + [1e-9])
    bars = []
    for i, (label, a, b) in enumerate(rows):
        y = 20 + i * 44
        for j, (val, color, who) in enumerate(((a, "#1f77b4", "candidate"), (b, "#aaaaaa", "production"))):
            if val is not None:
                w = max(1.0, 300 * scale(val) / top)
                bars.append({"label": label, "series": who, "color": color, "value": shown(val), "y": y + j * 18,
                             "w": f"{w:.1f}", "tx": f"{155 + w:.1f}"})
    height = 22 * len(rows) * 2 + 30
    line = None if threshold is None else {"x": f"{150 + 300 * scale(threshold) / top:.1f}", "value": f"{threshold:g}",
                                           "height": height - 10}
    return {"title": title + (" (log scale)" if log else ""), "height": height, "threshold": line,
            "labels": [{"text": label, "y": 33 + i * 44} for i, (label, _, _) in enumerate(rows)], "bars": bars}


def threshold_of(leaf: str, gates: list[dict]) -> float | None:
    """The bound a gate puts on a metric of this leaf (e.g. ``min_ttc_s`` → the safety-critical minimum)."""
    for g in gates:
        if str(g.get("metric", "")).rsplit(".", 1)[-1] == leaf:
            bound = g.get("min") if g.get("min") is not None else g.get("max")
            if bound is not None:
                return float(bound)
    return None


def metric_groups(metrics: list[dict]) -> list[dict]:
    """The metrics table by scenario (``sim.<type>.…``/``offline.<type>.…``; the rest is "overall"), the
    groups with a regression first, and in each group the rows where the candidate is worse first."""
    def worse(m: dict) -> bool:
        d = m.get("delta")
        return d is not None and d != 0 and ((d < 0) if higher_is_better(m["metric"]) else (d > 0))

    groups: dict[str, list[dict]] = {}
    for m in metrics:
        parts = m["metric"].split(".")
        groups.setdefault(parts[1] if len(parts) == 3 else "overall", []).append({**m, "worse": worse(m)})
    ordered = sorted(groups.items(), key=lambda kv: (not any(r["worse"] for r in kv[1]), kv[0] != "overall", kv[0]))
    return [{"name": name, "regressed": any(r["worse"] for r in rows),
             "rows": sorted(rows, key=lambda r: (not r["worse"], r["metric"]))} for name, rows in ordered]


def _hist(name: str, f: dict) -> dict:
    """Feature distribution, production vs candidate, over production's decile bins."""
    n, bars = len(f["production"]), []
    top = max(f["production"] + f["candidate"] + [1e-9])
    for i in range(n):
        for j, (series, color) in enumerate((("production", "#aaaaaa"), ("candidate", "#1f77b4"))):
            hgt = 80 * f[series][i] / top
            bars.append({"x": 10 + i * 26 + j * 12, "y": f"{90 - hgt:.1f}", "h": f"{hgt:.1f}", "color": color,
                         "title": f"{series} {f[series][i]:.3f} in [{f['edges'][i]:g}, {f['edges'][i + 1]:g}]"})
    return {"caption": f"{name}: PSI {f['psi']:.3f}, KS {f['ks']:.3f}; mean {f['mean']['production']:g} → "
                       f"{f['mean']['candidate']:g}", "width": 20 + n * 26, "bars": bars}


def _data_line(m: dict | None) -> str:
    if not m:
        return "-"
    raw, lab = m.get("raw") or {}, m.get("labelled") or {}
    per_scen = ", ".join(f"{k}: {v}" for k, v in sorted((raw.get("rows_per_scenario") or {}).items()))
    return (f"labelled {shown(lab.get('digest'))[:16]} ({shown(lab.get('rows'))} rows), raw "
            f"{shown(raw.get('digest'))[:16]}; sources {', '.join(map(str, raw.get('sources') or []))}; window "
            f"{shown(raw.get('window_start'))}..{shown(raw.get('window_end'))}; rows per scenario {per_scen}")


def gate_row(g: dict) -> dict:
    """What the review card's gate table shows of one verdict: limit, bound with its counts, production's
    value and the delta, coloured by whether the candidate is worse."""
    from closedloop.steps.gates import limit_of, verdict_of

    verdict = verdict_of(g)
    bound = ""
    if g.get("upper") is not None:
        side = "upper" if g.get("max") is not None else "lower"
        bound = (f"{g[side] * 100:.3g} % ({g['events']:,} in {g['trials']:,}, "
                 f"{g['confidence'] * 100:g} % {side} bound)")
    delta, css = g.get("delta"), ""
    if delta is not None and delta != 0:
        higher_better = g.get("min") is not None and g.get("max") is None
        css = "better" if (delta > 0) == higher_better else "worse"
    return {"row": g, "verdict": verdict.upper(), "css": {"pass": "pass", "fail": "fail", "n/a": "na"}[verdict],
            "limit": limit_of(g) or "-", "bound": bound or "-", "delta": "-" if delta is None else f"{delta:+.4g}",
            "delta_css": css}


def render_html(card: dict[str, Any]) -> str:
    """The review card as one self-contained HTML page (``templates/review_card.html``; every value escaped)."""
    from closedloop.runtime.pages import render

    cmp = card["compared_with"]
    per = card["per_scenario"]
    shift = card.get("shift") or {}
    mix = shift.get("scenario_mix")
    ds = card["datasets"]
    return render(
        "review_card.html", card=card, shown=shown, gates=[gate_row(g) for g in card["gates"]],
        compared=f"production version {cmp['version']}" if cmp["version"] else cmp["note"],
        request=sorted((card.get("incident") or card.get("request") or {}).items()),
        charts=[_bars(f"{metric} per scenario type", [(t, per[t]["candidate"].get(metric),
                                                        per[t]["production"].get(metric))
                                                       for t in per if metric in per[t]["candidate"]],
                      threshold=threshold_of(metric.rsplit(".", 1)[-1], card["gates"]), log=metric.endswith("_s"))
                for metric in ("sim.collision_rate", "sim.min_ttc_s", "offline.rmse")],
        groups=metric_groups([m for m in card["metrics"] if not m["metric"].startswith(vocab.SHIFT)]),
        hists=[_hist(k, f) for k, f in (shift.get("features") or {}).items()],
        shift_line=(f"scenario mix PSI {mix['psi']:.3f}" if mix else
                    f"no shift report: {cmp['note'] or 'not computed'}"),
        data_candidate=f"candidate: {_data_line(ds.get('candidate'))}; label policy {shown(ds['label_policy']['candidate'])}",
        data_production=f"production: {_data_line(ds.get('production'))}; label policy "
                        f"{shown(ds['label_policy']['production'])}",
        validation=((ds.get("candidate") or {}).get("validation") or None),
        lineage=list(card["lineage"].items()))


def log_review_card(client, model: str, version: str) -> dict[str, Any]:
    """Build the review card of ``version`` and log it (JSON + HTML) on its training run."""
    card = review_card(client, model, version)
    run_id = card["lineage"]["training_run"]
    client.log_dict(run_id, card, CARD_JSON)
    client.log_text(run_id, render_html(card), CARD_HTML)
    return card


# ---------------------------------------------------------------- the model card (registry description)

def model_card(client, model: str, version: str) -> str:
    """The version's model card (Markdown, the registry description), from the records."""
    from closedloop.steps.gates import rate_bounds

    r = _version_record(client, model, version)
    tags, m = r["tags"], r["metrics"]
    raw, lab = (r["manifest"].get("raw") or {}), (r["manifest"].get("labelled") or {})
    purpose = tags.get(vocab.REQUEST_PURPOSE)
    from closedloop.runtime.pages import quoted

    who = quoted(tags.get(vocab.REQUEST_REQUESTER) or "scheduler").removeprefix("> ")
    lines = ([f"Request by {who} (quoted as written):", "", quoted(purpose), ""] if purpose else [])
    lines += [f"Release candidate from pipeline {r['pipeline']} run {r['run']}; dataset {tags.get(vocab.DATASET_VERSION)}, "
              f"label policy {r['label_policy']}, template {r['template']}@{r['template_hash']}.", ""]
    dossier = json.loads(tags[vocab.DOSSIER]) if tags.get(vocab.DOSSIER) else None
    lines += [f"# {model} version {version}", "",
              *([f"Release dossier: `{dossier.get('uri')}` ({dossier.get('digest')}); verify it offline with "
                 "`closedloop dossier verify`.", ""] if dossier else []),
              f"Aliases when this card was written: {', '.join(sorted(r['aliases'])) or 'none'}", "",
              "## Intended use", quoted(purpose) if purpose else "Release candidate of pipeline "
              f"`{r['pipeline']}`; see the template's description.", "",
              "## Data",
              f"- labelled snapshot `{lab.get('digest')}` ({lab.get('rows')} rows), label policy `{r['label_policy']}`",
              f"- raw snapshot `{raw.get('digest')}`: sources {', '.join(raw.get('sources') or []) or '-'}, window "
              f"{raw.get('window_start')}..{raw.get('window_end')}",
              "- rows per scenario: " + (", ".join(f"{k} {v}" for k, v in sorted((raw.get("rows_per_scenario") or {})
                                                                                    .items())) or "-"), "",
              "## Metrics per scenario", "| scenario | collision rate | collisions / episodes | min TTC (s) |",
              "|---|---|---|---|"]
    limits = []
    for t, vals in sorted(_per_scenario(m).items()):
        if "sim.collision_rate" not in vals:
            continue
        k, n = m.get(f"{vocab.SIM}{t}.collisions"), m.get(f"{vocab.SIM}{t}.episodes")
        lines.append(f"| {t} | {vals['sim.collision_rate']:g} | {_n(k)} / {_n(n)} | {vals.get('sim.min_ttc_s', '-')} |")
        if n:
            upper = rate_bounds(int(k or 0), int(n), 0.95)[1]
            if upper > 0.05:
                limits.append(f"- {t}: {int(k or 0)} collision(s) in {int(n)} simulated episodes: the collision rate "
                              f"could be as high as {upper:.1%} (95 % upper bound); thin evidence")
    lines += ["", "Offline: " + ", ".join(f"{k.removeprefix(vocab.OFFLINE)} {v:g}" for k, v in sorted(m.items())
                                           if k.startswith(vocab.OFFLINE) and k.count(".") == 1), ""]
    for g in r["report"]:
        if not g.get("passed"):
            limits.append(f"- gate `{g['metric']}` failed: {g.get('reason')}")
        for i in g.get("incidents", []):
            limits.append(f"- incident {i['incident']} ({i['type']}): {i['collisions']} collision(s) in "
                          f"{i['episodes']} regression episode(s)")
    for name, f in ((r["shift"] or {}).get("features") or {}).items():
        if f["psi"] > SHIFTED_PSI:
            limits.append(f"- training data shifted from production's in `{name}` (PSI {f['psi']:.2f})")
    if tags.get(vocab.INCIDENT_PREFIX + "id"):
        limits.append(f"- trained in answer to incident {tags[vocab.INCIDENT_PREFIX + 'id']} "
                      f"({tags.get(vocab.INCIDENT_PREFIX + 'scenario_type', '-')})")
    lines += ["## Known limitations", *(limits or ["- none found by the gates, incidents or the shift report"]), "",
              "## Approvals"]
    decisions = sorted((e for e in _events(tags) if str(e.get("event", "")).startswith("review.")),
                       key=lambda e: e.get("at") or "")
    for e in decisions:  # every decision of the review (approval, approval_2, … with approval.required > 1)
        lines.append(f"- {e['event'].removeprefix('review.')} by {e.get('reviewer') or '-'} at {e.get('at')}"
                     + (f": {e['comment']}" if e.get("comment") else ""))
    if not decisions and tags.get(vocab.REVIEW_DECISION):
        lines.append(f"- {tags[vocab.REVIEW_DECISION]} by {tags.get(vocab.REVIEW_REVIEWER) or '-'} at "
                     f"{tags.get(vocab.REVIEW_AT)}" + (f": {tags[vocab.REVIEW_COMMENT]}"
                                                            if tags.get(vocab.REVIEW_COMMENT) else ""))
    elif not decisions:
        lines.append("- not reviewed yet")
    lines += ["", "## Lineage", f"- pipeline `{r['pipeline']}`, Airflow run `{r['dag_id']}/{r['run']}`",
              f"- training run `{r['run_id']}`, gate run `{r['gate_run_id']}`, code `{r['code_digest']}`",
              f"- template `{r['template']}@{r['template_hash']}`", "",
              "_Generated from the registry's records by closedloop; rewritten at registration, review and promotion._"]
    return "\n".join(lines)


def _events(tags: dict[str, str]) -> list[dict]:
    """The version's audit events (``closedloop.audit.*`` tags); an unreadable one is skipped."""
    out = []
    for k, v in tags.items():
        if k.startswith(vocab.AUDIT_PREFIX):
            try:
                out.append(json.loads(v))
            except ValueError:
                continue
    return out


def _n(x) -> str:
    return "-" if x is None else f"{int(x)}"


def describe(client, model: str, version: str) -> str:
    """Write the model card as the version's description (what the MLflow UI shows for it), if it changed."""
    text = model_card(client, model, version)
    if (client.get_model_version(model, str(version)).description or "") != text:
        client.update_model_version(model, str(version), description=text)
    return text


def refresh(client, model: str, version: str) -> None:
    """Rewrite the model card and the review card after a review decision or a promotion. A card is
    for people, not evidence: a failure here is logged, never undoes what was recorded."""
    import logging

    try:
        describe(client, model, version)
        log_review_card(client, model, version)
    except Exception as exc:  # noqa: BLE001 - the decision or promotion stands; say the card is stale
        logging.getLogger(__name__).warning("model card of %s version %s not rewritten: %s", model, version, exc)

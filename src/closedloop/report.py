"""Plain-text rendering of a run summary (``closedloop run`` / ``demo`` / ``summary``)."""

from __future__ import annotations

from closedloop.steps.gates import format_report


def _headline(metrics: dict, prefix: str) -> str:
    top = {k.removeprefix(prefix): v for k, v in sorted(metrics.items()) if k.count(".") == 1 and k.startswith(prefix)}
    return ", ".join(f"{k} {v:g}" for k, v in top.items() if not k.endswith("episodes"))


def format_summary(s: dict) -> str:
    r = s["results"]
    out = [f"\npipeline {s['dag_id']}  run {s['run_id']}  -> {s['state'].upper()}"
           + (f"  ({s['wall_seconds']} s)" if s.get("wall_seconds") else ""), "", "tasks:"]
    for t in s["tasks"]:
        dur = f"{t['duration_s']:.1f} s" if t["duration_s"] is not None else ""
        out.append(f"  {t['task_id']:<20} {t['state']:<16} {dur:>8}  try {t['try_number']}")
    adm = r.get("admit_incident")
    if adm:
        from closedloop.incidents import summary as incident_summary

        if adm.get("admitted"):
            out += ["", "started by: " + "; ".join(incident_summary(i) for i in adm["incidents"])
                    + f"  (mining more {', '.join(adm['focus_types'])})"]
        else:
            out += ["", "debounced: joins run(s) " + ", ".join(sorted(set(adm.get("merged_into", {}).values())))]
    ds, lab = r.get("generate_dataset"), r.get("label")
    if ds:
        out += ["", f"dataset: raw {ds['digest']} ({ds['rows']} rows, {', '.join(ds['sources'])}, "
                    f"window {ds['window_start']}..{ds['window_end']})"]
        if ds.get("rows_per_scenario"):
            out.append("         rows per scenario: " + ", ".join(f"{k} {v}" for k, v in ds["rows_per_scenario"].items())
                       + (f"; sampling {ds['focus']}" if ds.get("focus") else ""))
    if lab:
        out.append(f"         labelled {lab['digest']} (label policy {lab['label_policy']})")
    if r.get("validate_data"):
        v = r["validate_data"]
        out.append(f"validation: suite {v['suite']}: {v['evaluated'] - v['failed']}/{v['evaluated']} expectations passed")
    runs = {k: r[k]["run_id"] for k in ("train", "offline_eval", "simulate", "release_gate") if r.get(k)}
    if runs:
        out += ["", "MLflow runs: " + ", ".join(f"{k} {v}" for k, v in runs.items())]
    if r.get("offline_eval"):
        out.append(f"offline metrics:    {_headline(r['offline_eval']['metrics'], 'offline.')}")
    if r.get("simulate"):
        out.append(f"simulation metrics: {_headline(r['simulate']['metrics'], 'sim.')}")
    gate_report = (r.get("release_gate") or {}).get("report")
    for t in s["tasks"]:
        err = t.get("error")
        if err and err.get("report") and t["task_id"] == "release_gate":
            gate_report = err["report"]
    if gate_report:
        out += ["", "release gates:", format_report(gate_report)]
    review = r.get("approval")
    if review:
        who = (review.get("responded_by_user") or {}).get("name") or "nobody (timeout)"
        out += ["", f"review: {', '.join(review.get('chosen_options') or [])} by {who}"]
    if r.get("promote"):
        p = r["promote"]
        out.append(f"promotion: {p['model']} version {p['version']} -> @production"
                   + (f" (previous-production: {p['previous']})" if p.get("previous") else ""))
    if s.get("registry"):
        g = s["registry"]
        out += ["", f"registered model: {g['model']} version {g['version']} "
                    f"aliases {', '.join('@' + a for a in g['aliases']) or '-'} ({g['tracking_uri']})"]
    failed = [t for t in s["tasks"] if t["state"] in ("failed", "upstream_failed")]
    if s["state"] != "success":
        out += ["", "why it stopped:"]
        for t in failed:
            if t.get("error"):
                out.append(f"  {t['task_id']}: {t['error']['error_class']}: {t['error']['message']}")
            elif t["state"] == "failed":
                out.append(f"  {t['task_id']}: failed (see the task log{': ' + s['log_file'] if s.get('log_file') else ''})")
        if not failed:
            out.append(f"  run state {s['state']}; tasks not finished: "
                       + ", ".join(t["task_id"] for t in s["tasks"] if t["state"] != "success"))
    return "\n".join(out)

"""All of the command's text rendering: run summaries, traces, impact, health, audit trails."""

from __future__ import annotations

from typing import Any

from closedloop import pipeline, vocab
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
        from closedloop.spec.incident import summary as incident_summary

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
    sim = next((r[k] for k in pipeline.SIMULATION_RESULT if isinstance(r.get(k), dict)), None)
    runs = {k: r[k]["run_id"] for k in ("train", "offline_eval", "merge_simulation", "simulate", "release_gate")
            if isinstance(r.get(k), dict)}
    if runs:
        out += ["", "MLflow runs: " + ", ".join(f"{k} {v}" for k, v in runs.items())]
    if r.get("offline_eval"):
        out.append(f"offline metrics:    {_headline(r['offline_eval']['metrics'], vocab.OFFLINE)}")
    if sim:
        a = sim.get("adaptive")
        out.append(f"simulation metrics: {_headline(sim['metrics'], vocab.SIM)}"
                   + (f"\n                    {sim['episodes']:,} episodes"
                      + (f" in {a['rounds']} round(s) of the catalog ({a['stopped']})" if a else "")
                      + (f", {sim['shards']} shards" if sim.get("shards") else "")))
    gate_report = (r.get("release_gate") or {}).get("report")
    for t in s["tasks"]:
        err = t.get("error")
        if err and err.get("report") and t["task_id"] == "release_gate":
            gate_report = err["report"]
    if gate_report:
        out += ["", "release gates:", format_report(gate_report)]
    reviews = [r[k] for k in sorted(r, key=lambda k: (len(k), k)) if k == "approval" or k.startswith("approval_")]
    reviews = [x for x in reviews if isinstance(x, dict)]
    out += [""] if reviews else []
    for review in reviews:  # approval, approval_2, … with approval.required > 1
        who = (review.get("responded_by_user") or {}).get("name") or "nobody (timeout)"
        out.append(f"review: {', '.join(review.get('chosen_options') or [])} by {who}")
    if isinstance(r.get("dossier"), dict) and r["dossier"].get("uri"):
        d = r["dossier"]
        out.append(f"release dossier: {d.get('verdict')}; {d['uri']} ({str(d.get('digest'))[:19]}…); check it "
                   f"offline: closedloop dossier verify {d['uri'].rsplit('/', 1)[0]} --key PUBLIC_KEY")
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
                message = t["error"]["message"]
                if t["error"].get("report"):  # the gates are listed above: their headline only
                    message = message.splitlines()[0].rstrip(":")
                out.append(f"  {t['task_id']}: {t['error']['error_class']}: {message}")
            elif t["state"] == "failed":
                out.append(f"  {t['task_id']}: failed (see the task log{': ' + s['log_file'] if s.get('log_file') else ''})")
        if not failed:
            out.append(f"  run state {s['state']}; tasks not finished: "
                       + ", ".join(t["task_id"] for t in s["tasks"] if t["state"] != "success"))
    return "\n".join(out)


def format_trace(t: dict[str, Any]) -> str:
    lines = [f"trace of {t['ref']} (newest first)"]
    mv = t.get("model_version")
    if mv:
        lines.append(f"\nmodel version   {mv['name']} v{mv['version']}  aliases: "
                     f"{', '.join('@' + a for a in mv['aliases']) or '-'}  ({mv['status']})")
        if mv["request"].get("purpose"):
            lines.append(f"  request       {mv['request'].get('purpose')}  (by {mv['request'].get('requester', '?')})")
    tr = t.get("training_run")
    if tr:
        lines.append(f"training run    {tr['run_id']}  code {tr['code_version']}"
                     + (f" (git {tr['git_commit']})" if tr.get("git_commit") else ""))
        if tr.get("cache_hit"):
            lines.append(f"  step cache    hit: model trained by MLflow run {tr['cache_hit']['source_run_id']} "
                         f"(pipeline run {tr['cache_hit']['source_run_key']}) on identical inputs")
        lines.append("  params        " + ", ".join(f"{k}={v}" for k, v in sorted(tr["params"].items())))
        if tr["metrics"]:
            lines.append("  metrics       " + ", ".join(f"{k}={v:g}" for k, v in sorted(tr["metrics"].items())))
    for d in t["datasets"]:
        extra = ""
        if d["kind"] == "raw" and d.get("sources"):
            extra = (f"  sources {', '.join(d['sources'])}, window {d.get('window_start')}..{d.get('window_end')}, "
                     f"scenarios {', '.join(d.get('scenarios') or [])}"
                     + (f", sampling {d['focus']}" if d.get("focus") else "")
                     + "".join(f"; without {e['source']} " + ("..".join(e["window"]) if e.get("window") else "(all)")
                               + f" (recall {e.get('recall')})" for e in d.get("excluded") or []))
        rows = f", {d['rows']} rows" if d.get("rows") is not None else ""
        lines.append(f"dataset {d['kind']:<8} {d['digest']}{rows}{extra}")
    v = t.get("validation")
    if v:
        lines.append(f"  validation    suite {v['suite']}: {'passed' if v['success'] else 'FAILED'} "
                     f"({v['evaluated'] - v['failed']}/{v['evaluated']})")
        docs = v.get("data_docs") or {}
        if docs.get("page"):
            lines.append(f"  data docs     {docs['artifact_uri']}/{docs['page']} (MLflow run {docs['run_id']}, "
                         f"Great Expectations' result: {docs['result']})")
    lines.append(f"label policy    {t['label_policy']}")
    tp = t["template"]
    lines.append(f"template        {tp['pipeline']} ({tp['file']}, hash {tp['hash']})")
    ar = t["airflow_run"]
    started = ar["started_by"]
    how = started["trigger"] + (f" by {started['requester']}" if started.get("requester")
                                and not started.get("incident") else "")
    if started.get("incident"):
        inc = started["incident"]
        how += f": incident {inc.get('id')} ({inc.get('kind')}, {inc.get('scenario_type')}, {inc.get('severity')})"
    if started.get("rerun_of"):
        how += f"; rerun of {started['rerun_of']}"
    if started.get("reruns"):
        how += f"; rerun as {started['reruns']}"
    if started.get("retrain_for"):
        how += f"; the retrain of recall {started['retrain_for']}"
    lines.append(f"airflow run     {ar['dag_id']} / {ar['run_id']}  started by {how}")
    for h in t.get("recalls") or []:
        lines.append(f"HELD            by recall {h['id']} ({h.get('state') or 'open'}): {h.get('query')}: {h.get('how')}"
                     + ("" if h.get("verified", True) else " [unverified: no pinned keys here]"))
    if t.get("steps"):
        lines.append("steps           " + ", ".join(
            f"{s['id']} {s['status'].lower()}" + (" (cache hit)" if s.get("cache") == "hit" else "")
            for s in t["steps"]))
    sim = t.get("simulation")
    if sim:
        lines.append(f"simulation      {sim['episodes']} episodes of {sim.get('scenario_set') or '-'}"
                     + (f" in {sim['shards']} shards" if (sim.get("shards") or 1) > 1 else "")
                     + f", regression catalog {sim.get('regression_catalog') or '-'}  (MLflow run {sim['run_id']})")
        for i in sim.get("regression") or []:
            lines.append(f"  incident {i['incident']}: {i['collisions']} collision(s) in {i['episodes']} episode(s) "
                         f"of {i['type']}")
        total, shown = (t.get("totals") or {}).get("regression", 0), len(sim.get("regression") or [])
        if shown < total:
            lines.append(f"  ({shown} of {total} regression scenarios shown, from number {t.get('offset', 0) + 1}; "
                         "--offset to page on)")
    g = t.get("gates")
    if g:
        from closedloop.steps.gates import format_report

        lines.append(f"gates           {'passed' if g['passed'] else 'FAILED'}")
        lines.extend("  " + line for line in format_report(g["report"] or []).splitlines())
    if t.get("dossier"):
        lines.append(f"dossier         {t['dossier'].get('uri')}  ({t['dossier'].get('digest')})")
    r = t.get("review")
    if r:
        lines.append(f"review          {r.get('decision')} by {r.get('reviewer') or '-'} at {r.get('at') or '-'}"
                     + (f": {r['comment']}" if r.get("comment") else ""))
    return "\n".join(lines)


def format_rerun_plan(plan: dict[str, Any]) -> str:
    """What ``closedloop rerun --dry-run`` would start."""
    conf = plan["conf"]
    lines = [f"would rerun {plan['original']} as a new run of {plan['dag_id']}",
             "  data: " + (f"the pinned snapshot {plan['pinned']}" if plan.get("pinned") else "a fresh snapshot"),
             "  step cache: " + ("off" if conf.get(vocab.CONF_CACHE) is False else "on")]
    request = {k: v for k, v in conf.items() if k not in (vocab.CONF_RERUN, vocab.CONF_CACHE)}
    for key, value in request.items():
        lines.append(f"  {key}: {', '.join(value) if isinstance(value, list) else value}")
    lines += [f"  note: {note}" for note in plan["notes"]]
    return "\n".join(lines)


def format_dossier(d: dict[str, Any]) -> str:
    folder = str(d["uri"]).rsplit("/", 1)[0]
    return "\n".join([f"release dossier of {d['model']} v{d['version']}: {d.get('verdict') or d.get('error')}",
                      f"  json     {d['uri']}  ({d['digest']})", f"  html     {d['html']}",
                      f"  verify   closedloop dossier verify {folder} --key PUBLIC_KEY   (offline)"])


def format_impact(i: dict[str, Any]) -> str:
    n = i.get("totals") or {k: len(i[k]) for k in ("snapshots", "training_runs", "model_versions")}
    lines = [f"impact of {i['query']}: {n['snapshots']} snapshots, {n['training_runs']} training runs, "
             f"{n['model_versions']} model versions, {len(i['live'])} live"]
    shown = max(len(i["snapshots"]), len(i["training_runs"]), len(i["model_versions"]))
    if shown < max(n.values()):
        lines.append(f"(listing {i.get('offset', 0) + 1}..{i.get('offset', 0) + shown} of each; --offset to page on)")
    if i["live"]:
        lines.append("\nLIVE (act here first):")
        lines.extend(f"  {v['model']} v{v['version']}  @{', @'.join(v['live'])}" for v in i["live"])
    if i["snapshots"]:
        lines.append("\nsnapshots:")
        lines.extend(f"  {s['kind']:<8} {s['digest']}  {s['pipeline']}  window {s['window'] or '-'}"
                     + (f"  {s['label_policy']}" if s["label_policy"] else "") for s in i["snapshots"])
    if i["training_runs"]:
        lines.append("\ntraining runs:")
        lines.extend(f"  {e['run_id']}  {e['dag_id']} / {e['airflow_run_id']}  ({e['status']}, {e['label_policy']})"
                     for e in i["training_runs"])
    if i["model_versions"]:
        lines.append("\nmodel versions:")
        lines.extend(f"  {v['model']} v{v['version']}" + (f"  @{', @'.join(v['aliases'])}" if v["aliases"] else "")
                     for v in i["model_versions"])
    return "\n".join(lines)


def format_health(h: dict[str, Any]) -> str:
    lines = [f"pipeline health {h['since'][:16]} .. {h['until'][:16]} (UTC)"]
    for t in h.get("template_errors") or []:
        lines.append(f"HELD BACK  {t['pipeline'] or t['file']}: template error (its DAGs run nothing until fixed)\n"
                     + "\n".join(f"    {line}" for line in t["error"].splitlines()))
    for name, p in h["pipelines"].items():
        fr = f"{p['failure_rate']:.0%}" if p["failure_rate"] is not None else "-"
        qw, lt, ip = p["queue_wait_s"], p["lead_time_to_candidate_s"], p["incident_to_production_s"]
        v = (h.get("versions") or {}).get(name, {})
        lines += [f"\n{name}  ({', '.join(p['dags'])})",
                  f"  runs {p['runs']} ({', '.join(f'{k} {n}' for k, n in p['by_state'].items()) or '-'}), "
                  f"incident runs {p['incident_runs']}, failure rate {fr} (errors), rejected by a gate "
                  f"{p.get('gate_rejections', 0)}"
                  + (f" ({', '.join(f'{m} {n}' for m, n in (p.get('rejected_by') or {}).items())})"
                     if p.get("rejected_by") else "") + f", retries {p['retries']}, "
                  f"pending approvals {p['pending_approvals']}",
                  f"  queue wait   median {qw['median']} s, p95 {qw['p95']} s ({qw['n']} tasks)",
                  f"  lead time    trigger → candidate median {lt['median']} s ({lt['n']}); "
                  f"incident → production median {ip['median']} s ({ip['n']})",
                  f"  versions     production {v.get('production') or '-'}, candidate {v.get('candidate') or '-'}"]
        lines += [f"  UNEXPLAINED  {problem}" for problem in v.get("registry_problems") or []]
        cache = (h.get("cache") or {}).get(name)
        if cache:
            rate = f"{cache['hit_rate']:.0%}" if cache["hit_rate"] is not None else "-"
            lines.append(f"  step cache   {cache['hits']} hits, {cache['misses']} misses ({rate} hit rate), "
                         f"{cache['off']} with the cache off"
                         + (f"; hits: {', '.join(f'{k} {n}' for k, n in cache['hits_by_step'].items())}"
                            if cache["hits_by_step"] else ""))
    recalls = h.get("recalls") or []
    if recalls:
        lines.append("\nrecalls:")
        lines += [f"  {r['id']}  {r['state']:<6}  {r['query']}: {r['held_versions'] if r['held_versions'] is not None else '?'}"
                  f" version(s) held, open {r['hours_open']:.1f} h (opened by {r['opened_by']}"
                  + (f", closed by {r['closed_by']}" if r.get("closed_by") else "") + ")" for r in recalls]
    return "\n".join(lines)


def format_audit(t: dict) -> str:
    from closedloop.steps.gates import format_report

    r = t["request"]
    out = [f"audit of {t['model']} version {t['version']}  (aliases: {', '.join('@' + a for a in t['aliases']) or '-'})",
           f"registered {t['created']} by Airflow run {t['run']['dag_id']}/{t['run']['run_id']}", "",
           "1. request", f"   requester: {r.get('requester', '-')}", f"   purpose:   {r.get('purpose', '-')}",
           f"   change:    {r.get('change', '-')}", f"   impact:    {r.get('expected_impact', '-')}",
           f"   scope:     {r.get('scope') or '-'}", f"   ticket:    {r.get('ticket') or '-'}", "",
           f"2. release gates: {t['gates_verdict'] or '-'}"]
    if t["gates"]:
        out.append(format_report(t["gates"]))
    rv = t["review"]
    out += ["", "3. review", f"   decision: {rv.get('decision', 'none yet')}" +
            (f" by {rv['reviewer']}" if rv.get("reviewer") else "") + (f" at {rv['at']}" if rv.get("at") else ""),
            f"   comment:  {rv.get('comment') or '-'}"]
    for a in t.get("approvals") or []:
        out.append(f"   {a['task']}: {a['decision']} by {a['responder'] or '-'} at {a['at']} "
                   f"(production then: {a['production_at_review'] or 'none'})")
    out += ["", "4. events"]
    for e in t["events"]:
        extra = ", ".join(f"{k}={v}" for k, v in sorted(e.items())
                          if k not in ("event", "at", "promotion") and v not in (None, ""))
        extra += ", sealed" if e.get("promotion") else ""
        out.append(f"   {e['at']}  {e['event']:<28} {extra}")
    if not t["events"]:
        out.append("   (none)")
    return "\n".join(out)


def format_scenarios(c: dict) -> str:
    """``closedloop scenarios list``: the regression catalog of a model."""
    entries = c["entries"]
    if not entries:
        return f"{c['model']}: no regression scenarios yet (catalog {c['version']}): no incident has been admitted"
    lines = [f"{c['model']}: regression catalog {c['version']} (sha256 {c['digest']}), {len(entries)} scenario(s); "
             "every candidate simulates them all (gate sim.regression.collision_rate)"]
    for e in entries:
        sc, inc, lin = e["scenario"], e["incident"], e["lineage"]
        params = ", ".join(f"{k}={v:g}" for k, v in sorted(sc["params"].items())) or "drawn from the type"
        lines.append(f"  {inc['id']:<20} {sc['type']:<13} {inc.get('kind') or '-'} ({inc.get('severity') or '-'}): "
                     f"{sc['repeats']} episode(s), seed {sc['seed']}, params {params}; added {lin['added_at']} by "
                     f"{lin['dag_id']} / {lin['run_id']}")
    return "\n".join(lines)

"""``closedloop recall open | close | retrain | list | show``: a bad input, everything it touched, and the
way back to a clean production."""

from __future__ import annotations

import json
import sys

from closedloop.cli.common import arg_json, arg_login


def _ask(args, conf: dict, note: str) -> int:
    from closedloop.cli.governance import _api, dag_action
    from closedloop.operators.recall import RECALL_DAG_ID
    from closedloop.records.airflow_api import AirflowAPIError

    try:
        code, out = dag_action(_api(args), RECALL_DAG_ID, "recall", conf, note=note, timeout=args.timeout)
    except AirflowAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if code:
        print(f"error: {out['error']}", file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(format_answer(out))
    return 0


def format_answer(out: dict) -> str:
    """What the recall task answered, as text."""
    t = out.get("totals") or {}
    head = (f"recall {out['id']} ({out['query']}): {out['state']}"
            + (", opened now" if out.get("new") else "") + f" — opened by {out.get('opened_by')}: {out.get('reason')}")
    lines = [head, f"  holds {t.get('model_versions', 0)} model version(s) of {t.get('pipelines', 0)} pipeline(s)"]
    for r in out.get("affected") or []:
        lines.append(f"    {r['model']} v{r['version']}" + (f" [{', '.join(r['live'])}]" if r["live"] else "")
                     + f" ({r['pipeline']}, run {r['run_id']}): {r['how']}")
    if t.get("model_versions", 0) > len(out.get("affected") or []):
        lines.append(f"    … closedloop recall show {out['id']} lists them all")
    for p in out.get("proposals") or []:
        if p["held"]:
            lines.append(f"  {p['model']}: production v{p['production']} is held; {p['why']}")
    for r in out.get("retrains") or []:
        lines.append(f"  retrain {r['pipeline']}: " + (f"run {r['run_id']} ({r['why']})" if r.get("run_id")
                                                        else r["why"]))
    closed = out.get("closed")
    if closed:
        lines.append(f"  closed by {closed['closed_by']} at {closed['closed_at']}: {closed['reason']}"
                     + (f" (left: {'; '.join(closed['left'])})" if closed.get("left") else ""))
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    lines = [f"recall {s['id']} ({s['query']}): {s['state']}, opened by {s['opened_by']} at {s['opened_at']}: "
             f"{s['reason']}"]
    if s["state"] == "closed":
        lines.append(f"  closed by {s['closed_by']} at {s['closed_at']} after {s['hours_open']:.2f} h: "
                     f"{s['close_reason']}")
    t = s["totals"]
    lines.append(f"  touches {t['model_versions']} model version(s) of {t['models']} model(s), "
                 f"{t['training_runs']} training run(s), {t['snapshots']} snapshot(s)")
    for r in s["affected"]:
        lines.append(f"    {r['model']} v{r['version']}" + (f" [{', '.join(r['live'])}]" if r["live"] else "")
                     + f" ({r['pipeline']}, run {r['run_id']}): {r['how']}")
    for p in s["proposals"]:
        lines.append(f"  {p['model']}: production v{p['production'] or '-'}: {p['why']}")
    for w in s["waiting"]:
        lines.append(f"  waiting: {w}")
    return "\n".join(lines)


def _read(args, fn) -> int:
    from closedloop.runtime.signing import trusted_keys
    from closedloop.runtime.tracking import mlflow_client
    from closedloop.steps.recall import RecallError

    try:
        out = fn(mlflow_client(), trusted_keys())
    except RecallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    elif isinstance(out, list):
        for s in out:
            print(f"{s['id']}  {s['state']:<6}  {s['query']:<40}  {s['totals']['model_versions']:>5} version(s)  "
                  f"opened {s['opened_at'][:16]} by {s['opened_by']}"
                  + (f", closed after {s['hours_open']:.1f} h" if s["state"] == "closed" else ""))
        if not out:
            print("no recalls")
    else:
        print(format_summary(out))
    return 0


def cmd_open(args) -> int:
    conf = {"action": "open", "source": args.source, "window": args.window, "label_policy": args.label_policy,
            "code_digest": args.code_digest, "snapshot": args.snapshot, "reason": args.reason}
    from closedloop.steps.recall import RecallError, query_of

    try:
        q = query_of(source=args.source, window=args.window, label_policy=args.label_policy,
                     code_digest=args.code_digest, snapshot=args.snapshot)
    except RecallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _ask(args, conf, note=f"recall {q.id}: {q.describe()}")


def cmd_close(args) -> int:
    return _ask(args, {"action": "close", "recall": args.recall, "reason": args.reason or ""},
                note=f"close recall {args.recall}")


def cmd_retrain(args) -> int:
    return _ask(args, {"action": "retrain", "recall": args.recall, "reason": ""},
                note=f"retrain for recall {args.recall}")


def cmd_list(args) -> int:
    from closedloop.steps import recall

    return _read(args, lambda c, ring: [recall.summary(c, r, ring)
                                        for r in recall.recalls(c, ring, state=args.state)])


def cmd_show(args) -> int:
    from closedloop.steps import recall

    return _read(args, lambda c, ring: recall.summary(c, recall.get(c, args.recall, ring), ring))


def add_parsers(sub) -> None:
    sp = sub.add_parser("recall", help="recall a bad data source, label policy or code version: hold every model "
                        "version it touched, propose a rollback, retrain without it")
    rs = sp.add_subparsers(dest="recall_action", required=True)
    op = rs.add_parser("open", help="open a recall (through Airflow, as a recall opener of every pipeline it touches)")
    what = op.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", help="a data source (e.g. fleet-eu)")
    what.add_argument("--label-policy", help="a label policy version NAME@VERSION (e.g. expert_idm_smoothed@2)")
    what.add_argument("--code-digest", help="a training code digest (8+ hex digits, from closedloop trace)")
    what.add_argument("--snapshot", help="a dataset snapshot digest (8+ hex digits, from closedloop trace)")
    op.add_argument("--window", help="with --source: only these days, FIRST..LAST (e.g. 2026-11-01..2026-11-08)")
    op.add_argument("--reason", required=True, help="why the input is bad (recorded, sealed, shown everywhere)")
    cp = rs.add_parser("close", help="close a recall (done when every affected pipeline has an unaffected version "
                       "in production; --reason to close it anyway)")
    cp.add_argument("recall", help="the recall's id, e.g. R-0123456789")
    cp.add_argument("--reason", help="why it is closed although something is left")
    tp = rs.add_parser("retrain", help="start the retrains a recall could not start yet (e.g. after the template "
                       "names a fixed label policy)")
    tp.add_argument("recall", help="the recall's id, e.g. R-0123456789")
    for p, fn in ((op, cmd_open), (cp, cmd_close), (tp, cmd_retrain)):
        arg_login(p)
        arg_json(p)
        p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the deployment's answer")
        p.set_defaults(func=fn, local_env=True)
    lp = rs.add_parser("list", help="every recall, its state and what it holds")
    lp.add_argument("--state", choices=["open", "closed"], help="only recalls in this state")
    arg_json(lp)
    lp.set_defaults(func=cmd_list, local_env=True)
    sp2 = rs.add_parser("show", help="one recall: what it holds, the rollback it proposes, what it waits for")
    sp2.add_argument("recall", help="the recall's id, e.g. R-0123456789")
    arg_json(sp2)
    sp2.set_defaults(func=cmd_show, local_env=True)

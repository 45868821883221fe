"""Step ``simulate``: a closed-loop simulation as a separate job, awaited without a worker slot.

``launch`` starts the job (a detached local process by default) and returns at once;
the Airflow layer then defers to a trigger that calls ``poll`` until the job is done;
``collect`` logs the results into the pipeline run's MLflow run tree. The job itself is
``python -m closedloop.steps.simulation JOB_DIR``: it needs only the job folder.
Everything is keyed by the pipeline run, so a retry re-attaches to a running or finished job
instead of starting a second one.

Liveness works across hosts: the job writes ``heartbeat.json`` into its job folder (where every
host can read it: the data root) every :data:`HEARTBEAT_SECONDS`; a job with no result whose
heartbeat is older than ``simulation.dead_after_seconds`` (or that never beat within that time of
its launch) is declared dead — an ``error.json`` says so, so a retry launches it again — whether
the poller runs on the job's host or not. On the job's own host a vanished process is noticed at
once (pid check).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from closedloop import settings, vocab
from closedloop.runtime import tracking
from closedloop.runtime.context import RunContext
from closedloop.spec import LoadedSpec
from closedloop.steps.catalog import expand_catalog
from closedloop.steps.gates import failed_for_sure, undecided

log = logging.getLogger(__name__)


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def job_dir(ctx: RunContext, shard: Shard | None = None) -> str:
    key = hashlib.sha256(ctx.run_key.encode()).hexdigest()[:16]
    return f"{ctx.data_root}/{ctx.pipeline}/jobs/{key}/simulate" + (shard.suffix if shard else "")


class Shard(tuple):
    """Shard ``index`` of ``count`` (the mapped ``simulate`` task's ``map_index`` and its length)."""

    __slots__ = ()

    def __new__(cls, index: int, count: int):
        if not 0 <= index < count:
            raise ValueError(f"shard {index} of {count} does not exist")
        return super().__new__(cls, (int(index), int(count)))

    index = property(lambda self: self[0])
    count = property(lambda self: self[1])
    suffix = property(lambda self: "" if self.count == 1 else f"-{self.index}-of-{self.count}")
    label = property(lambda self: f"{self.index + 1}/{self.count}")


_CATALOGS: dict[tuple, dict] = {}


def whole_catalog(loaded: LoadedSpec, ctx: RunContext) -> dict:
    """What this run simulates: the template's scenario set and the model's regression scenarios
    (one per admitted incident, :mod:`closedloop.steps.regression`), with the regression catalog's
    version under ``regression``. Read once per run and scenario-set file content in a process (the
    regression part is pinned for the run: it cannot change under it); callers get their own copy."""
    import copy

    st = loaded.scenario_path.stat()
    memo = (ctx.data_root, ctx.run_key, loaded.spec.model.name, str(loaded.scenario_path), st.st_mtime_ns, st.st_size)
    if memo not in _CATALOGS:
        base = yaml.safe_load(loaded.scenario_path.read_text())
        reg = pinned_regression(loaded, ctx)
        _CATALOGS.clear()  # one run's catalog at a time: a task simulates one run
        _CATALOGS[memo] = {**base, "scenarios": [*base["scenarios"], *(e["scenario"] for e in reg["entries"])],
                           "regression": {"version": reg["version"], "digest": reg["digest"],
                                          "incidents": [e["incident"]["id"] for e in reg["entries"]]}}
    return copy.deepcopy(_CATALOGS[memo])


def pinned_regression(loaded: LoadedSpec, ctx: RunContext) -> dict:
    """The model's regression catalog as this pipeline run first read it, kept beside the run's jobs
    (written once: the first reader wins). Every shard, the merge and every retry of the run see the
    same scenarios even when an incident is admitted while the run simulates; the next run sees it."""
    import uuid

    from closedloop.steps import regression

    fs, path = _fs(job_dir(ctx))
    pin = f"{path.rsplit('/', 1)[0]}/regression.json"
    found = _read_json(fs, pin)
    if found is not None:
        return found
    current = regression.catalog(ctx.data_root, loaded.spec.model.name)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{pin}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "w") as fh:
        json.dump(current, fh, sort_keys=True)
    if fs.exists(pin):  # another task of the run pinned it first
        fs.rm(tmp)
        return _read_json(fs, pin)
    fs.mv(tmp, pin)
    return current


def shard_names(loaded: LoadedSpec) -> list[str]:
    """The shards of ``simulate`` (what its mapped task expands over, known when the DAG is built):
    one per scenario type of the template's scenario set (``by: scenario_type``), else ``count``."""
    sh = loaded.spec.simulation.shards
    if sh is None:
        return []
    if sh.by == "scenario_type":
        return sorted({e["type"] for e in yaml.safe_load(loaded.scenario_path.read_text())["scenarios"]})
    return [f"part-{i + 1}" for i in range(sh.count)]


def shard_catalog(loaded: LoadedSpec, catalog: dict, shard: Shard | None) -> dict:
    """The part of ``catalog`` that ``shard`` simulates (the whole catalog without shards).

    ``by: scenario_type``: the entries of the shard's type (a regression scenario of a type the
    scenario set does not have goes to the last shard); ``count``: the catalog's episodes in
    order, cut in ``count`` contiguous, balanced slices (entries cut with ``first``/``repeats``,
    so each episode keeps its id and seed)."""
    if shard is None or shard.count == 1 and loaded.spec.simulation.shards is None:
        return {k: v for k, v in catalog.items() if k != "regression"}
    names = shard_names(loaded)
    if len(names) != shard.count:
        from closedloop.errors import PermanentError

        raise PermanentError(f"simulate shard {shard.label}: the template now has {len(names)} shards "
                             f"({', '.join(names)}); clear the run's simulate tasks to re-map them")
    return slice_catalog(catalog, loaded.spec.simulation.shards.by, names, shard)


def slice_catalog(catalog: dict, by: str, names: list[str], shard: Shard) -> dict:
    """:func:`shard_catalog` without the template: what a job needs to cut round ``r`` of the whole
    catalog (:func:`~closedloop.steps.catalog.next_round`) exactly as the shards cut the first."""
    if by == "scenario_type":
        mine = names[shard.index]
        picked = [e for e in catalog["scenarios"]
                  if e["type"] == mine or (e["type"] not in names and shard.index == shard.count - 1)]
    else:
        sizes = [int(e.get("repeats", 1)) for e in catalog["scenarios"]]
        total = sum(sizes)
        lo, hi = total * shard.index // shard.count, total * (shard.index + 1) // shard.count
        picked, start = [], 0
        for entry, size in zip(catalog["scenarios"], sizes, strict=True):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                picked.append({**entry, "first": int(entry.get("first", 0)) + a - start, "repeats": b - a})
            start += size
    return {**{k: v for k, v in catalog.items() if k not in ("scenarios", "regression")}, "scenarios": picked}


def local_log_path(job: str) -> Path:
    return settings.home() / "jobs" / hashlib.sha256(job.encode()).hexdigest()[:16] / "simulate.log"


def _read_json(fs, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def _write_json(fs, path: str, data: dict) -> None:
    import uuid

    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "w") as fh:
        json.dump(data, fh, sort_keys=True)
    fs.mv(tmp, path)


HEARTBEAT_SECONDS = float(os.environ.get("CLOSEDLOOP_JOB_HEARTBEAT_SECONDS", "5"))
DEAD_AFTER_SECONDS = 60.0


def _beat(job: str, stop) -> None:
    """The job's heartbeat (a thread of the job process): its host, pid and the time, every few seconds."""
    import time

    fs, path = _fs(job)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            _write_json(fs, f"{path}/heartbeat.json", {"at": time.time(), "n": n, "pid": os.getpid(),
                                                       "host": socket.gethostname()})
        except OSError as exc:  # a missed beat is not fatal; a long silence is
            log.warning("heartbeat not written: %s", exc)
        stop.wait(HEARTBEAT_SECONDS)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a finished child of a still-running parent is a zombie: dead for us
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def job_spec(loaded: LoadedSpec, ctx: RunContext, trained: dict, shard: Shard | None = None) -> dict:
    """What the job needs (``job.json``): the model, the simulator and the shard's catalog."""
    spec = {"model_uri": trained["model_uri"], "entry_point": loaded.spec.simulation.entry_point,
            "catalog": shard_catalog(loaded, whole_catalog(loaded, ctx), shard), "tracking_uri": ctx.tracking_uri,
            "scenario_set": loaded.spec.simulation.scenario_set}
    budget = budget_of(loaded)
    if budget and shard is not None and loaded.spec.simulation.shards is not None:
        whole = {k: v for k, v in whole_catalog(loaded, ctx).items() if k != "regression"}
        budget = {**budget, "whole": whole, "shard": {"by": loaded.spec.simulation.shards.by,
                                                      "names": shard_names(loaded), "index": shard.index,
                                                      "count": shard.count},
                  "siblings": [job_dir(ctx, Shard(i, shard.count)) for i in range(shard.count)],
                  "dead_after": loaded.spec.simulation.dead_after_seconds}
        budget["round_key"] = _round_key(budget, trained["model_uri"])
    return {**spec, "adaptive": budget} if budget else spec


def budget_of(loaded: LoadedSpec) -> dict | None:
    """The adaptive budget a job follows (``simulation.adaptive``): the most episodes, the aggregation
    and the gates it waits for; None without one."""
    sim = loaded.spec.simulation
    if sim.adaptive is None:
        return None
    return {"max_episodes": sim.adaptive.max_episodes, "summarize": sim.summarize,
            "gates": [g.model_dump(mode="json") for g in loaded.spec.adaptive_gates()]}


ROUNDS_PER_CALL = 8
"""Further rounds are simulated this many at a time (one call of the simulator: most of its cost is per
call, not per episode), then taken round by round: the stopping round, and so the metrics, are what a
round-at-a-time loop gives."""


def simulate_until_decided(simulate, model, catalog: dict, budget: dict | None) -> dict:
    """``simulate(model, catalog)``, then — with an adaptive ``budget`` — further rounds of the same
    scenarios with fresh seeds (:func:`closedloop.steps.catalog.next_round`) while a confidence gate
    is undecided, no confidence gate has already failed for sure (the release is rejected whatever more
    episodes show), and the next whole round fits in ``max_episodes``. The metrics are the template's
    aggregation over every episode of the rounds taken; ``adaptive`` says how it stopped.

    A shard of a sharded simulation (``budget["shard"]``) simulates its part of every round instead:
    :func:`simulate_shard_rounds`."""
    if budget and budget.get("shard"):
        return simulate_shard_rounds(simulate, model, catalog, budget)
    result = simulate(model, catalog)
    if not budget:
        return result
    per_round = len(result["episodes"])
    batch: list[dict] = []
    taken = [result["episodes"]]

    def round_of(r: int) -> list[dict]:
        nonlocal batch
        while len(taken) <= r:
            if not batch:  # the next rounds that fit in the budget, in one call of the simulator
                ahead = max(1, min(ROUNDS_PER_CALL, (budget["max_episodes"] - len(taken) * per_round) // per_round))
                batch = simulate(model, rounds_of(catalog, len(taken), ahead))["episodes"]
            taken.append(batch[:per_round])
            batch = batch[per_round:]
        return taken[r]

    return walk_rounds(budget, per_round, round_of)


def walk_rounds(budget: dict, per_round: int, round_of, *, quiet: bool = False) -> dict | None:
    """Take rounds 0, 1, … (``round_of(r)``: round ``r``'s episodes in catalog order, or None when they
    are not known yet) while a confidence gate of ``budget`` is undecided, none has failed for sure,
    and the next round fits in ``max_episodes``: the one stopping rule of an adaptive budget, for one
    job, for a shard watching its siblings and for the merge of shards. None: a needed round is
    missing; else the result over the rounds taken, with ``adaptive`` saying how it stopped."""
    from closedloop.runtime.context import resolve
    from closedloop.spec import GateSpec

    gates = [GateSpec(**g) for g in budget["gates"]]
    summarize = resolve(budget["summarize"])
    episodes: list[dict] = []
    rounds = 0
    while True:
        got = round_of(rounds)
        if got is None:
            return None
        episodes += got
        rounds += 1
        metrics = summarize(episodes)
        scoped = {f"{vocab.SIM}{k}": v for k, v in metrics.items()}
        waiting, failed = undecided(gates, scoped), failed_for_sure(gates, scoped)
        if rounds > 1 and not quiet:
            log.info("adaptive budget: round %d, %d episodes; still undecided: %s%s", rounds, len(episodes),
                     ", ".join(waiting) or "none", f"; failed for sure: {', '.join(failed)}" if failed else "")
        if not waiting or failed or not per_round or len(episodes) + per_round > budget["max_episodes"]:
            stopped = "a gate failed for sure" if failed else ("budget spent" if waiting else "decided")
            return {"metrics": metrics, "episodes": episodes,
                    "adaptive": {"rounds": rounds, "episodes": len(episodes), "max_episodes": budget["max_episodes"],
                                 "stopped": stopped, "undecided": waiting, "failed": failed}}


def take_rounds(budget: dict, whole: dict, records: dict[str, dict], more=None) -> dict | None:
    """The adaptive result the shards' episodes (``records`` by id) give: the rounds of ``whole`` the
    budget's rule takes (:func:`walk_rounds`), the rest dropped. A round the rule needs that the shards
    do not all have: ``more(first_round, count)`` simulates whole rounds from there (the merge's
    continuation), or None is returned when there is no ``more``."""
    plain = {k: v for k, v in whole.items() if k != "regression"}
    extra: list[dict] = []
    first_missing: int | None = None

    def round_of(r: int) -> list[dict] | None:
        nonlocal extra, first_missing
        ids = round_ids(plain, r)
        if first_missing is None and all(i in records for i in ids):
            return [records[i] for i in ids]
        if more is None:
            return None
        if first_missing is None:
            first_missing = r
            log.info("adaptive budget: the shards hold %d whole round(s); simulating the rest here", r)
        if not extra:  # the next rounds that fit in the budget, in one call of the simulator
            ahead = max(1, min(ROUNDS_PER_CALL, budget["max_episodes"] // len(ids) - r))
            extra = more(r, ahead)
        got, extra = extra[:len(ids)], extra[len(ids):]
        return got

    return walk_rounds(budget, len(expand_catalog(plain)), round_of)


def round_ids(whole: dict, r: int) -> list[str]:
    """The episode ids of round ``r`` of the whole catalog, in catalog order."""
    from closedloop.steps.catalog import next_round

    return [e["id"] for e in expand_catalog(next_round(whole, r))]


def _round_key(spec_budget: dict, model_uri: str) -> str:
    """What a shard's round files belong to: the model and the whole catalog and budget (a round
    file of an earlier launch with another model is never read as this one's)."""
    body = {k: spec_budget[k] for k in ("whole", "gates", "max_episodes", "summarize")}
    return hashlib.sha256(json.dumps([model_uri, body], sort_keys=True).encode()).hexdigest()[:16]


def simulate_shard_rounds(simulate, model, catalog: dict, budget: dict) -> dict:
    """One shard of a sharded simulation with an adaptive budget: rounds fan out over the shards.

    The shard simulates its part of round 0 (``catalog``), then of rounds 1, 2, … cut from the whole
    catalog as the shards cut the first, writing each round to ``rounds/<r>.json`` in its job folder.
    Before each further round it looks at its siblings' round files and applies the adaptive budget's
    rule (:func:`walk_rounds`) to the rounds every shard has: once that decides, or the budget is
    spent, it stops. A shard ahead of a live sibling waits for it; when a sibling that lacks the round
    is not running (not started for want of a worker slot, as under ``dag.test``, or finished) it stops
    and ``merge_simulation`` simulates the rounds still needed itself (:func:`continue_rounds`). The
    merge takes exactly the rounds the rule takes and drops the rest, so the metrics are the unsharded
    adaptive simulation's for the same seeds."""
    import time

    from closedloop.steps.catalog import next_round

    me = Shard(budget["shard"]["index"], budget["shard"]["count"])
    whole, by, names = budget["whole"], budget["shard"]["by"], budget["shard"]["names"]
    key = budget["round_key"]
    per_round = len(expand_catalog(whole))
    max_rounds = max(1, budget["max_episodes"] // per_round) if per_round else 1
    siblings = [_fs(s) for s in budget["siblings"]]
    own_fs, own = siblings[me.index]
    dead_after = float(budget.get("dead_after", DEAD_AFTER_SECONDS))
    mine: list[list[dict]] = []

    def write(r: int, episodes: list[dict]) -> None:
        own_fs.makedirs(f"{own}/rounds", exist_ok=True)
        _write_json(own_fs, f"{own}/rounds/{r}.json", {"key": key, "episodes": episodes})

    def read(i: int, r: int) -> list[dict] | None:
        if i == me.index:
            return mine[r] if r < len(mine) else None
        fs, path = siblings[i]
        try:
            found = _read_json(fs, f"{path}/rounds/{r}.json")
        except (OSError, ValueError):
            return None
        return found["episodes"] if found and found.get("key") == key else None

    def merged(r: int) -> list[dict] | None:
        parts = [read(i, r) for i in range(me.count)]
        if any(p is None for p in parts):
            return None
        by_id = {e["id"]: e for p in parts for e in p}
        return [by_id[i] for i in round_ids(whole, r)] if len(by_id) == per_round else None

    def running(i: int) -> bool:
        """Sibling ``i`` is simulating: a fresh heartbeat and neither result nor error."""
        fs, path = siblings[i]
        beat = _read_json(fs, f"{path}/heartbeat.json") if fs.exists(f"{path}/heartbeat.json") else None
        done = fs.exists(f"{path}/result.json") or fs.exists(f"{path}/error.json")
        return bool(beat) and not done and time.time() - float(beat["at"]) < dead_after

    def siblings_stand(r: int) -> str:
        """'wait': a running sibling has not finished round ``r - 1`` yet; 'alone': a sibling that is not
        running (not started, stopped or dead) lacks round ``r``, so no lockstep on it; '' — go on."""
        others = [i for i in range(me.count) if i != me.index]
        if any(read(i, r - 1) is None and running(i) for i in others):
            return "wait"
        return "alone" if any(read(i, r) is None and not running(i) for i in others) else ""

    mine.append(simulate(model, catalog)["episodes"])
    write(0, mine[0])
    known: list[list[dict]] = []  # the rounds every shard has, merged in catalog order
    while len(mine) < max_rounds:
        grown = False
        while len(known) < len(mine) and (whole_round := merged(len(known))) is not None:
            known.append(whole_round)
            grown = True
        if grown and walk_rounds(budget, per_round, lambda r: known[r] if r < len(known) else None,
                                 quiet=True) is not None:
            break
        stand = siblings_stand(len(mine))
        if stand == "wait":
            time.sleep(0.2)
            continue
        if stand == "alone":  # no lockstep without it: merge_simulation simulates the rounds still needed
            log.info("shard %s: a sibling is not running; merge_simulation continues the rounds", me.label)
            break
        first = len(mine)  # the next rounds that fit, in one call of the simulator, as an unsharded job does
        parts = [slice_catalog(next_round(whole, r), by, names, me)
                 for r in range(first, min(max_rounds, first + ROUNDS_PER_CALL))]
        batch = simulate(model, {**parts[0], "scenarios": [e for p in parts for e in p["scenarios"]]})["episodes"]
        for r, p in enumerate(parts, first):
            size = len(expand_catalog(p))
            mine.append(batch[:size])
            batch = batch[size:]
            write(r, mine[r])
    episodes = [e for part in mine for e in part]
    from closedloop.runtime.context import resolve

    return {"metrics": resolve(budget["summarize"])(episodes), "episodes": episodes,
            "adaptive": {"rounds": len(mine), "episodes": len(episodes), "max_episodes": budget["max_episodes"],
                         "shard": me.label, "stopped": "merged by merge_simulation"}}


def rounds_of(catalog: dict, first_round: int, count: int) -> dict:
    """Rounds ``first_round`` … ``first_round + count - 1`` of ``catalog`` as one catalog, round by round
    (its episodes come out in that order, each round's as :func:`~closedloop.steps.catalog.next_round`
    numbers them)."""
    from closedloop.steps.catalog import next_round

    return {**catalog, "scenarios": [e for r in range(first_round, first_round + count)
                                     for e in next_round(catalog, r)["scenarios"]]}


def launch(loaded: LoadedSpec, ctx: RunContext, *, trained: dict, shard: Shard | None = None) -> dict:
    """Start the simulation job (of ``shard``) for this pipeline run unless it is already running or done."""
    job = job_dir(ctx, shard)
    fs, path = _fs(job)
    spec = job_spec(loaded, ctx, trained, shard)
    existing = _read_json(fs, f"{path}/job.json")
    if existing and existing.get("spec") == spec:
        state, _ = poll(job, existing.get("pid"), existing.get("host"), loaded.spec.simulation.dead_after_seconds)
        if state in ("running", "success"):
            log.info("simulation job %s is already %s: attaching to it", job, state)
            return {"job_dir": job, "pid": existing["pid"], "host": existing["host"], "attached": True}
    fs.makedirs(path, exist_ok=True)
    for stale in ("result.json", "error.json"):
        if fs.exists(f"{path}/{stale}"):
            fs.rm(f"{path}/{stale}")
    logfile = local_log_path(job)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    for old in ("heartbeat.json",):
        if fs.exists(f"{path}/{old}"):
            fs.rm(f"{path}/{old}")
    _write_json(fs, f"{path}/job.json", {"spec": spec})
    import time

    launched_at = time.time()
    with open(logfile, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "closedloop.steps.simulation", job],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True,
                                env={**os.environ, **settings.thread_env(), "MLFLOW_TRACKING_URI": ctx.tracking_uri})
    record = {"spec": spec, "pid": proc.pid, "host": socket.gethostname(), "log": str(logfile),
              "launched_at": launched_at}
    _write_json(fs, f"{path}/job.json", record)
    log.info("started simulation job pid %s in %s (log: %s)", proc.pid, job, logfile)
    return {"job_dir": job, "pid": proc.pid, "host": record["host"], "attached": False}


def poll(job: str, pid: int | None, host: str | None, dead_after: float = DEAD_AFTER_SECONDS) -> tuple[str, dict]:
    """One look at a job: ``("running"|"success"|"failed", details)``. Cheap; safe to call often.

    A job with neither result nor error is dead when its process is gone (on its own host), or when
    its heartbeat is older than ``dead_after`` seconds (from anywhere); then ``error.json`` records
    why, so every later look — and a retry's launch — agrees."""
    import time

    fs, path = _fs(job)
    result = _read_json(fs, f"{path}/result.json")
    if result is not None:
        return "success", {"result_path": f"{job}/result.json"}
    error = _read_json(fs, f"{path}/error.json")
    if error is not None:
        return "failed", error
    dead = None
    if pid and host == socket.gethostname() and not _pid_alive(int(pid)):
        dead = f"simulation process {pid} exited without a result"
    else:
        beat = _read_json(fs, f"{path}/heartbeat.json")
        record = _read_json(fs, f"{path}/job.json") or {}
        since = beat["at"] if beat else record.get("launched_at")
        if since is not None and time.time() - float(since) > dead_after:
            who = f"host {beat['host']} pid {beat['pid']}" if beat else f"host {host} pid {pid}"
            dead = (f"simulation job ({who}) silent for {time.time() - float(since):.0f} s: no heartbeat "
                    f"{'since its last one' if beat else 'since its launch'} (dead after {dead_after:g} s)")
    if dead is None:
        return "running", {}
    tail = ""
    logfile = local_log_path(job)
    if logfile.exists():
        tail = logfile.read_text(errors="replace")[-2000:]
    error = {"error": dead, "log_tail": tail, "declared_dead": True}
    _write_json(fs, f"{path}/error.json", error)
    return "failed", error


def plan(loaded: LoadedSpec, ctx, results: dict):
    """The step table's cache-plan entry of ``simulate`` (sharded: each shard looks for itself)."""
    if loaded.spec.simulation.shards is not None:
        return None, None, None
    return simulation_key(loaded, ctx, results["train"]), None, None


def simulation_key(loaded: LoadedSpec, ctx: RunContext, trained: dict, shard: Shard | None = None) -> str:
    """Cache key of ``simulate`` (or one shard): the model (through the training's key), the
    simulator, and the exact scenarios simulated — the scenario set's and the regression catalog's
    entries in this shard."""
    from closedloop.runtime.cache import key_of

    whole = whole_catalog(loaded, ctx)
    part = shard_catalog(loaded, whole, shard)
    catalog = hashlib.sha256(json.dumps(part, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    sim = loaded.spec.simulation
    budget = budget_of(loaded)  # the budget and the gates it waits for decide how many episodes run
    return key_of(loaded, "simulate", entry_point=sim.entry_point, scenario_set=sim.scenario_set, catalog=catalog,
                  regression=whole["regression"]["version"], shard=shard.label if shard else "",
                  upstream=trained.get("cache_key") or trained["model_uri"], **({"adaptive": budget} if budget else {}))


def _shard_tags(loaded: LoadedSpec, ctx: RunContext, shard: Shard | None) -> dict[str, str]:
    """Step-run tags of a simulation: the regression catalog's version and the shard."""
    from closedloop import vocab

    tags = {vocab.REGRESSION_CATALOG: whole_catalog(loaded, ctx)["regression"]["version"]}
    return {**tags, vocab.SHARD: shard.label} if shard else tags


def reuse(loaded: LoadedSpec, ctx: RunContext, *, trained: dict, shard: Shard | None = None) -> dict | None:
    """The simulation result this run already has (a retry) or the step cache holds; None: launch."""
    from closedloop.runtime import cache

    _, result = cache.reuse(loaded, ctx, "simulate", simulation_key(loaded, ctx, trained, shard),
                            step_tags=_shard_tags(loaded, ctx, shard))
    return result


def collect(loaded: LoadedSpec, ctx: RunContext, *, job: str, trained: dict, shard: Shard | None = None) -> dict:
    """Log the finished job's metrics and per-episode results into the ``simulate`` MLflow run (of the shard)."""
    from closedloop.runtime.cache import KEY_TAG

    key = simulation_key(loaded, ctx, trained, shard)
    run = tracking.step_run(loaded, ctx, "simulate", step_tags={KEY_TAG: key, **_shard_tags(loaded, ctx, shard)})
    done = tracking.finished_result(run)
    if done:
        return done
    fs, path = _fs(job)
    result = _read_json(fs, f"{path}/result.json")
    if result is None:
        from closedloop.errors import TransientError

        raise TransientError(f"simulation job {job} reported success but has no result.json yet")
    return _record(loaded, ctx, run, result, key=key, trained=trained,
                   extra={"shard": shard.label} if shard else {})


def _record(loaded: LoadedSpec, ctx: RunContext, run, result: dict, *, key: str, trained: dict, extra: dict) -> dict:
    """Log a simulation result (metrics, per-episode records, per-incident outcomes) and finish its run."""
    metrics = {f"{vocab.SIM}{k}": v for k, v in result["metrics"].items()}
    c = tracking.client(ctx)
    c.log_batch(run.info.run_id, metrics=tracking.metric_entities(metrics),
                params=[_param("scenario_set", loaded.spec.simulation.scenario_set),
                        _param("model_uri", trained["model_uri"])])
    c.log_dict(run.info.run_id, result["episodes"], EPISODES_ARTIFACT)
    if result.get("adaptive"):
        a = result["adaptive"]
        c.log_batch(run.info.run_id, params=[_param("adaptive.rounds", a["rounds"]),
                                             _param("adaptive.max_episodes", a["max_episodes"]),
                                             _param("adaptive.stopped", a["stopped"])])
        extra = {**extra, "adaptive": a}
    regression = whole_catalog(loaded, ctx)["regression"]
    return tracking.finish(ctx, run.info.run_id, {
        "run_id": run.info.run_id, "metrics": metrics, "episodes": len(result["episodes"]), "cache_key": key,
        "cache": {"hit": False, "key": key}, "regression_catalog": regression["version"],
        "regression": incident_outcomes(result["episodes"]), **extra})


EPISODES_ARTIFACT = "simulation/episodes.json"


def incident_outcomes(episodes: list[dict]) -> list[dict]:
    """Per regression scenario (by incident id): episodes, collisions and the smallest time to collision."""
    out: dict[str, dict] = {}
    for e in episodes:
        if e.get("incident"):
            o = out.setdefault(e["incident"], {"incident": e["incident"], "type": e["type"], "episodes": 0,
                                               "collisions": 0, "min_ttc_s": None})
            o["episodes"] += 1
            o["collisions"] += int(bool(e["collision"]))
            if e.get("min_ttc_s") is not None:
                o["min_ttc_s"] = e["min_ttc_s"] if o["min_ttc_s"] is None else min(o["min_ttc_s"], e["min_ttc_s"])
    return [out[k] for k in sorted(out)]


def merge(loaded: LoadedSpec, ctx: RunContext, *, trained: dict, shards: list[dict]) -> dict:
    """Step ``merge_simulation``: the shards' per-episode records, read back from their MLflow runs
    (a cached shard's from the run that computed it), put in catalog order and aggregated by the
    template's ``simulation.summarize`` — the same aggregation as an unsharded simulation's, so the
    metrics are the same for the same seeds. Every episode of the catalog must be there exactly
    once; a shard missing some, or one with a record of another run's catalog, fails the step."""
    from closedloop.errors import PermanentError
    from closedloop.runtime import cache
    from closedloop.runtime.context import resolve

    whole = whole_catalog(loaded, ctx)
    key = hashlib.sha256("|".join(sorted(s["cache_key"] for s in shards)).encode()).hexdigest()
    run, done = cache.reuse(loaded, ctx, "merge_simulation", key)
    if done is not None:
        return done
    expected = [e["id"] for e in expand_catalog(whole)]
    c = tracking.client(ctx)
    records: dict[str, dict] = {}
    for n, shard in enumerate(shards, 1):
        source = (shard.get("cache") or {}).get("source_run_id") or shard["run_id"]
        for rec in _load(c, source):
            if rec["id"] in records:
                raise PermanentError(f"merge_simulation: episode {rec['id']!r} comes from two shards (shard {n}, "
                                     f"MLflow run {source}); the shards do not partition the catalog")
            records[rec["id"]] = rec
    budget = budget_of(loaded)
    if budget:  # rounds fanned out over the shards: take the rounds the budget's rule takes, drop the rest
        def more(first_round: int, count: int) -> list[dict]:
            from closedloop.steps.models import load_model

            if "model" not in loaded_model:
                loaded_model["model"] = load_model(trained["model_uri"])
            plain = {k: v for k, v in whole.items() if k != "regression"}
            return resolve(loaded.spec.simulation.entry_point)(
                loaded_model["model"], rounds_of(plain, first_round, count))["episodes"]

        loaded_model: dict = {}
        result = take_rounds(budget, whole, records, more)
        if result is None:
            missing = [i for i in expected if i not in records]
            raise PermanentError(f"merge_simulation: the shards do not hold every round the adaptive budget "
                                 f"takes (regression catalog {whole['regression']['version']}); first missing "
                                 f"{missing[:10] or 'episodes of a later round'}")
    else:
        missing = [i for i in expected if i not in records]
        extra = sorted(set(records) - set(expected))
        if missing or extra:
            raise PermanentError(f"merge_simulation: the shards' episodes do not match this run's catalog "
                                 f"(regression catalog {whole['regression']['version']}): missing {missing[:10]}, "
                                 f"unexpected {extra[:10]}")
        episodes = [records[i] for i in expected]
        result = {"metrics": resolve(loaded.spec.simulation.summarize)(episodes), "episodes": episodes}
    c.set_tag(run.info.run_id, vocab.SHARDS, str(len(shards)))
    return _record(loaded, ctx, run, result, key=key, trained=trained, extra={"shards": len(shards)})


def _load(c, run_id: str) -> list[dict]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with open(c.download_artifacts(run_id, EPISODES_ARTIFACT, tmp), encoding="utf-8") as fh:
            return json.load(fh)


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, str(value))


def main(job: str) -> int:
    """Entry point of the job process."""
    import traceback

    from closedloop.runtime.context import resolve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import threading

    stop = threading.Event()
    threading.Thread(target=_beat, args=(job, stop), daemon=True, name="heartbeat").start()  # before any import
    fs, path = _fs(job)
    spec = _read_json(fs, f"{path}/job.json")["spec"]
    try:
        import mlflow

        mlflow.set_tracking_uri(spec["tracking_uri"])
        from closedloop.steps.models import load_model

        model = load_model(spec["model_uri"])
        log.info("simulating %s on scenario set %s", spec["model_uri"], spec["scenario_set"])
        result = simulate_until_decided(resolve(spec["entry_point"]), model, spec["catalog"], spec.get("adaptive"))
        _write_json(fs, f"{path}/result.json", result)
        log.info("done: %s", json.dumps(result["metrics"], sort_keys=True))
        return 0
    except Exception as exc:
        _write_json(fs, f"{path}/error.json", {"error": f"{type(exc).__name__}: {exc}",
                                               "log_tail": traceback.format_exc()[-2000:]})
        raise
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))


def simulate_inline(loaded: LoadedSpec, ctx: RunContext, *, trained: dict, shard: Shard | None = None) -> dict:
    """The whole step (or shard) in this process (a Kubernetes pod): the cache or this run's earlier
    result, else the same job code as a local job (:func:`main`) and :func:`collect`."""
    done = reuse(loaded, ctx, trained=trained, shard=shard)
    if done is not None:
        return done
    job = job_dir(ctx, shard)
    fs, path = _fs(job)
    spec = job_spec(loaded, ctx, trained, shard)
    if poll(job, None, None)[0] != "success":
        fs.makedirs(path, exist_ok=True)
        _write_json(fs, f"{path}/job.json", {"spec": spec, "pid": os.getpid(), "host": socket.gethostname()})
        main(job)
    return collect(loaded, ctx, job=job, trained=trained, shard=shard)

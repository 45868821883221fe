"""Asset watchers that turn the outside world into incident events, in Airflow's triggerer.

- :class:`IncidentInboxTrigger` watches a folder for incident JSON files (the embedded default;
  production uses a message queue through Airflow's common messaging triggers).
- :class:`KpiWatchTrigger` reads the production version's online KPIs from MLflow and raises an
  incident when one crosses the template's bound — once per degradation.

Each yields :class:`~airflow.triggers.base.TriggerEvent` s; Airflow records each as an asset
event on the model's incident asset (``extra = {"from_trigger": True, "payload": incident}``),
which starts the ``<pipeline>_incident`` DAG. Blocking I/O runs in threads, never on the
triggerer's event loop; a bad file or an unreachable MLflow is logged and the watch goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from closedloop.spec.incident import IncidentError, parse_incident

log = logging.getLogger(__name__)

ACCEPTED, REJECTED = "accepted", "rejected"


MAX_BYTES = 1_000_000
"""Default size cap of one inbox file (``incidents.inbox_max_bytes`` in the template)."""
MAX_DEPTH = 20
"""JSON nesting an incident may have (it has 2: the object and its ``log_refs`` list)."""


class Unreadable(ValueError):
    """An inbox entry that is not a readable, small, regular JSON file."""


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def read_entry(path: Path, max_bytes: int) -> Any:
    """The JSON of one inbox file — a regular file, not a link, at most ``max_bytes``, nested at most
    :data:`MAX_DEPTH` deep. Opened without following links and without blocking (a FIFO never
    hangs the watcher; a link to ``/dev/zero`` or out of the inbox is never read).

    :raises Unreadable: saying which rule the entry breaks.
    :raises FileNotFoundError: it is gone (another watcher took it).
    """
    import stat

    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise Unreadable("a symbolic link; the inbox reads regular files only (links are never followed)")
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable("not a regular file (a FIFO, device, socket or folder); the inbox reads regular files only")
    if st.st_size > max_bytes:
        raise Unreadable(f"{st.st_size} bytes, more than the inbox's limit of {max_bytes}")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the look and the open
            raise Unreadable("not a regular file when opened")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise Unreadable(f"more than the inbox's limit of {max_bytes} bytes")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise Unreadable("not UTF-8 text") from None
    except RecursionError:
        raise Unreadable(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise Unreadable(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise Unreadable(f"JSON that cannot be read safely ({str(exc)[:200]})") from None
    if depth(value) > MAX_DEPTH:
        raise Unreadable(f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


def scan_inbox(inbox: Path, model: str, routes: dict[str, list[str]],
               max_bytes: int = MAX_BYTES) -> list[tuple[Path, dict]]:
    """One look at the inbox: this model's valid incidents (oldest first); bad entries are moved to
    ``rejected/`` with a ``.error.txt`` saying why (never quoting a long or secret-like value). Files of
    other known models are left alone. One bad entry never stops the look.

    Writers should create ``name.json.tmp`` (or ``.name.json``) and rename it when complete.
    """
    inbox.mkdir(parents=True, exist_ok=True)
    found: list[tuple[float, Path, dict]] = []
    with os.scandir(inbox) as entries:
        names = sorted(e.name for e in entries if e.name.endswith(".json") and not e.name.startswith("."))
    for name in names:
        path = inbox / name
        try:
            mtime = path.lstat().st_mtime
            data = read_entry(path, max_bytes)
        except FileNotFoundError:  # taken by another watcher meanwhile
            continue
        except Unreadable as exc:
            reject(path, f"{name}: {exc}")
            continue
        except OSError as exc:
            reject(path, f"{name}: cannot be read ({exc.strerror or type(exc).__name__})")
            continue
        if isinstance(data, dict) and data.get("model") in routes and data.get("model") != model:
            continue  # another pipeline's watcher handles it
        data = {"reported_by": f"inbox:{name}", **data} if isinstance(data, dict) else data
        try:
            incident = parse_incident(data, routes)
        except IncidentError as exc:
            reject(path, f"{name}: {exc}")
            continue
        found.append((mtime, path, incident))
    return [(p, i) for _, p, i in sorted(found, key=lambda f: (f[0], f[1].name))]


def _move(path: Path, folder: str) -> Path | None:
    """Move ``path`` into its sibling ``folder``; None if another watcher took it first."""
    target = path.parent / folder / path.name
    target.parent.mkdir(exist_ok=True)
    if target.parent.is_symlink():
        raise Unreadable(f"{target.parent} is a symbolic link; the inbox keeps its files in real folders")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    return target


def reject(path: Path, reason: str) -> None:
    """Move a bad entry (the entry itself: a link is moved, never followed) to ``rejected/`` with its reason."""
    reason = reason[:2000]
    try:
        target = _move(path, REJECTED)
    except Unreadable as exc:
        log.error("incident inbox: cannot set %s aside: %s", path.name, exc)
        return
    if target is not None:
        note = target.with_name(target.name + ".error.txt")
        fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(reason + "\n")
        log.warning("incident inbox: rejected %s", reason)


def accept(path: Path) -> None:
    _move(path, ACCEPTED)


class IncidentInboxTrigger(BaseEventTrigger):
    """Watch ``inbox`` for incident files about ``model``.

    A valid file becomes an incident event, then moves to ``accepted/``; a malformed one, or one
    about an unknown model, moves to ``rejected/`` next to an ``.error.txt`` and starts nothing.
    The file moves only after the event is handed to the triggerer, so a crash in between sends
    it again on restart (at least once) and the incident DAG's debounce absorbs the repeat.

    :param inbox: the folder to watch.
    :param model: the registered model whose incidents this watcher reports.
    :param routes: every known model → its incident scenario types (to tell "unknown model"
        from "another pipeline's model").
    :param poll_interval: seconds between looks.
    :param max_bytes: size cap of one file (bigger ones are rejected unread).
    """

    def __init__(self, *, inbox: str, model: str, routes: dict[str, list[str]], poll_interval: float = 2.0,
                 max_bytes: int = MAX_BYTES) -> None:
        super().__init__()
        self.inbox = inbox
        self.model = model
        self.routes = routes
        self.poll_interval = poll_interval
        self.max_bytes = max_bytes

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("closedloop.triggers.incidents.IncidentInboxTrigger",
                {"inbox": self.inbox, "model": self.model, "routes": self.routes, "poll_interval": self.poll_interval,
                 "max_bytes": self.max_bytes})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        folder = Path(self.inbox)
        while True:
            try:
                found = await asyncio.to_thread(scan_inbox, folder, self.model, self.routes, self.max_bytes)
            except Exception:  # the watch must survive anything one look can throw
                log.exception("incident inbox %s: scan failed; trying again", folder)
                found = []
            for path, incident in found:
                log.info("incident inbox: %s → incident %s", path.name, incident["id"])
                yield TriggerEvent(incident)
                await asyncio.to_thread(accept, path)
            await asyncio.sleep(self.poll_interval)


class KpiWatchTrigger(BaseEventTrigger):
    """Raise an incident when a production KPI of ``model`` crosses a template bound.

    Reads the newest value of each rule's metric that online monitoring logged for the version
    the ``production`` alias points at (:func:`closedloop.steps.monitoring.latest_kpis`). A
    breach fires once: the alarm is kept in Airflow's asset state store (it survives triggerer
    restarts), keyed by metric and version, and re-arms when the KPI is back within bounds or a
    new version reaches production.

    :param model: registered model name.
    :param rules: the template's ``incidents.kpis`` as JSON text. (Text, not a list of dicts:
        Airflow 3.3 hashes an event trigger's kwargs before and after storing them, and a list of
        dicts comes back encoded differently, so such a watcher would be dropped and re-created
        on every parse and never run.)
    :param poll_interval: seconds between reads.
    :param mlflow_conn_id: Airflow connection naming MLflow (else the environment's default).
    """

    def __init__(self, *, model: str, rules: str, poll_interval: float = 60.0,
                 mlflow_conn_id: str = "mlflow_default") -> None:
        super().__init__()
        self.model = model
        self.rules = rules
        self.poll_interval = poll_interval
        self.mlflow_conn_id = mlflow_conn_id
        self._memory: dict[str, Any] = {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("closedloop.triggers.incidents.KpiWatchTrigger",
                {"model": self.model, "rules": self.rules, "poll_interval": self.poll_interval,
                 "mlflow_conn_id": self.mlflow_conn_id})

    async def _get(self, key: str) -> Any:
        if self.asset_state_store is None:  # run outside a triggerer (no watched asset)
            return self._memory.get(key)
        return await self.asset_state_store.aget(key)

    async def _set(self, key: str, value: Any) -> None:
        if self.asset_state_store is None:
            self._memory[key] = value
        else:
            await self.asset_state_store.aset(key, value)

    async def _delete(self, key: str) -> None:
        if self.asset_state_store is None:
            self._memory.pop(key, None)
        else:
            await self.asset_state_store.adelete(key)

    def _read(self) -> dict[str, Any]:
        from closedloop.hooks.mlflow import MLflowHook
        from closedloop.steps.monitoring import latest_kpis

        hook = MLflowHook(self.mlflow_conn_id)
        os.environ.update(hook.credentials_env())
        metrics = [r["metric"] for r in json.loads(self.rules)]
        return latest_kpis(self.model, metrics, tracking_uri=hook.tracking_uri())

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from closedloop.spec import KpiRuleSpec

        rules = [KpiRuleSpec.model_validate(r) for r in json.loads(self.rules)]
        while True:
            try:
                kpis = await asyncio.to_thread(self._read)
            except Exception as exc:  # MLflow down, no model yet...: keep watching
                log.warning("KPI watch of %s: cannot read KPIs (%s: %s); trying again in %g s",
                            self.model, type(exc).__name__, exc, self.poll_interval)
                kpis = {"version": None, "values": {}}
            version = kpis["version"]
            for rule in rules:
                value = kpis["values"].get(rule.metric)
                key = f"kpi_alarm.{rule.metric}"
                alarm = await self._get(key)
                if value is None or version is None:
                    continue
                if not rule.breached(value):
                    if alarm:
                        log.info("KPI %s of %s v%s back within bounds (%g): alarm re-armed",
                                 rule.metric, self.model, version, value)
                        await self._delete(key)
                    continue
                if alarm and alarm.get("version") == version:
                    continue  # this degradation already raised its incident
                incident = {
                    "id": f"kpi-{self.model}-v{version}-{rule.metric}"[:100].replace("/", "_").replace(" ", "_"),
                    "model": self.model, "scenario_type": rule.scenario_type, "severity": rule.severity,
                    "kind": "kpi_degradation", "reported_by": "kpi-watcher",
                    "description": f"{rule.metric} = {value:g} on production version {version} breaks "
                                   f"{rule.describe()}",
                }
                log.warning("KPI watch: %s", incident["description"])
                yield TriggerEvent(incident)
                await self._set(key, {"version": version, "value": value})  # after: at least once
            await asyncio.sleep(self.poll_interval)

"""A local Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor on SQLite),
bound to 127.0.0.1, for ``make airflow``, the demo and the tests that need a real one.

Local users and their passwords are written to a file under the Airflow home before start
(``[core] simple_auth_manager_passwords_file``); nothing is hard-coded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from closedloop import settings

SERVICE_USER = "closedloop-service"
SQLITE_CONNECT_ARGS = {"timeout": 30}
"""Connection arguments of the embedded Airflow's SQLite database (``[database]
sql_alchemy_connect_args``): a writer waits up to 30 s for the lock instead of sqlite3's 5 s."""


def wal(env: dict[str, str]) -> str | None:
    """Put the embedded Airflow's SQLite database in write-ahead-log mode (kept in the file): readers no longer
    block the one writer, so a long read by the API server cannot hold the scheduler's heartbeat or an audit-log
    write past the lock timeout (Airflow then answers 500 "database is locked"). The file's path, or None when
    the database is not SQLite."""
    import sqlite3

    url = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") or f"sqlite:///{env['AIRFLOW_HOME']}/airflow.db"
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?")[0]
    with sqlite3.connect(path, timeout=30) as db:
        db.execute("PRAGMA journal_mode=WAL")
    return path


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_users(path: Path, names_roles: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Users for the simple auth manager: name -> (role, password), passwords kept in ``path``."""
    import secrets

    known = json.loads(path.read_text()) if path.exists() else {}
    users = {u: (role, known.get(u) or secrets.token_urlsafe(12)) for u, role in names_roles.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({u: pw for u, (_, pw) in users.items()}, indent=1))
    path.chmod(0o600)
    return users


class AirflowServer:
    """Airflow's components on 127.0.0.1 with the given users.

    :param root: scratch folder (Airflow home under ``root/airflow`` unless ``home`` is given).
    :param env: extra environment (e.g. ``CLOSEDLOOP_HOME``, ``MLFLOW_TRACKING_URI``).
    """

    def __init__(self, root: Path, dags_folder: Path, users: dict[str, tuple[str, str]], *,
                 home: Path | None = None, port: int | None = None, env: dict[str, str] | None = None):
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the deployment's own account (role user): tasks read Airflow's audit log with it (who posted an
        # incident), an earlier try's review, and write a run's note (a gate's rejection); a connection in
        # the environment holds it, people never see it
        if SERVICE_USER not in users:
            import secrets

            users = {**users, SERVICE_USER: ("user", secrets.token_urlsafe(16))}
        self.users = users  # name -> (role, password)
        self.home = home or root / "airflow"
        self.home.mkdir(parents=True, exist_ok=True)
        pwfile = self.home / "simple_auth_manager_passwords.json.generated"
        pwfile.write_text(json.dumps({u: pw for u, (_, pw) in users.items()}))
        venv_bin = str(Path(sys.executable).parent)
        env = env or {}
        self.env = {
            **os.environ,
            **settings.thread_env(),  # every task: one thread pool per core's worth of work, not per task
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "CLOSEDLOOP_HOME": env.get("CLOSEDLOOP_HOME", str(root / "closedloop")),
            "MLFLOW_TRACKING_URI": env.get("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, (r, _) in users.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pwfile),
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": "8",  # 2-core machines: fewer idle worker processes
            # warm tasks: the LocalExecutor preloads the libraries the steps compute with before it forks
            # its workers, so a task starts with them loaded (CLOSEDLOOP_WARM_TASKS=0 turns it off)
            "AIRFLOW__CORE__EXECUTOR": "closedloop.executors.WarmLocalExecutor",
            # the scheduler looks for work again 0.2 s after a loop that found none (Airflow: 1 s): a
            # task's successor is queued within a fraction of a second (benchmarks/local_servers.py)
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            "GX_ANALYTICS_ENABLED": "False",
            # SQLite lets one writer in at a time; sqlite3 gives up after 5 s of waiting and Airflow then
            # answers 500 "database is locked" (seen under load on an audit-log write): wait up to 30 s
            **({} if "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" in env else {
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "closedloop.local.server.SQLITE_CONNECT_ARGS",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "closedloop.local.server.SQLITE_CONNECT_ARGS"}),
            "AIRFLOW_CONN_CLOSEDLOOP_AIRFLOW_API": json.dumps({"conn_type": "http", "host": self.url,
                                                               "login": SERVICE_USER,
                                                               "password": users[SERVICE_USER][1]}),
            **{k: v for k, v in env.items() if k not in ("CLOSEDLOOP_HOME", "MLFLOW_TRACKING_URI")},
        }
        self.log = root / "airflow.log"
        self.procs: dict[str, subprocess.Popen] = {}
        self.proc: subprocess.Popen | None = None
        self._tokens: dict = {}

    COMPONENTS = (
        ("api-server", ["api-server", "--host", "127.0.0.1", "--port", "{port}", "--workers", "1"]),
        ("scheduler", ["scheduler", "--skip-serve-logs"]),
        ("dag-processor", ["dag-processor"]),
        ("triggerer", ["triggerer", "--skip-serve-logs"]),
    )

    def start(self, timeout: float = 180) -> AirflowServer:
        """Migrate the metadata DB, then start the four Airflow 3 components, all local-only.

        Rather than ``airflow standalone``, whose scheduler and triggerer also start log servers
        bound to every interface (ports 8793/8794): with a local executor the API server reads
        task logs from disk, so those servers are skipped and nothing listens beyond 127.0.0.1.
        """
        # a plain SIGTERM would end Python without running ``finally`` blocks that stop us
        if threading_main() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_system_exit)
        self.prepare()
        for name, _ in self.COMPONENTS:
            self.start_component(name)
        self.proc = self.procs["scheduler"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                self.stop()
                raise RuntimeError(f"airflow {', '.join(dead)} exited; log:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as r:
                    health = json.load(r)
                if all(health.get(c, {}).get("status") == "healthy"
                       for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")):
                    self.ensure_pools()
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"Airflow not healthy within {timeout} s; log:\n{self.tail()}")

    def prepare(self) -> None:
        """Create and migrate every store once, by this one process, before any component opens it:
        Airflow's metadata database, MLflow's store, the embedded default's signing key and its pin.
        A file lock in the Airflow home makes two starts on the same state take turns (the second finds
        everything done); a store is never migrated by two processes at once."""
        import fcntl

        airflow = str(Path(sys.executable).parent / "airflow")
        with open(self.home / ".closedloop-init.lock", "w") as lock, open(self.log, "ab") as logfile:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subprocess.run([airflow, "db", "migrate"], env=self.env, stdout=logfile, stderr=subprocess.STDOUT,
                           check=True, timeout=600)
            wal(self.env)
            from closedloop.runtime.tracking import ensure_store

            ensure_store(self.env["MLFLOW_TRACKING_URI"])  # MLflow's tables, before tasks or a UI race to
            if not any(k in self.env for k in ("CLOSEDLOOP_SIGNING_KEY", "AIRFLOW_CONN_CLOSEDLOOP_SIGNING")):
                from closedloop.runtime.signing import ensure_local_key

                ensure_local_key(home=self.env["CLOSEDLOOP_HOME"])  # the embedded default's key and pin, once

    def start_component(self, name: str) -> subprocess.Popen:
        """(Re)start one component, e.g. a Celery worker after it was killed."""
        args = dict(self.COMPONENTS)[name]
        cmd = [str(Path(sys.executable).parent / "airflow"), *[a.format(port=self.port) for a in args]]
        with open(self.log, "ab") as logfile:
            self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=logfile, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        return self.procs[name]

    def template_pools(self) -> dict[str, int]:
        """Pools the templates next to the DAG folder name (incident pools), 4 slots each."""
        from closedloop import settings
        from closedloop.spec import load_all

        folder = settings.pipelines_beside(self.env["AIRFLOW__CORE__DAGS_FOLDER"])
        specs, _ = load_all(folder) if folder.is_dir() else ([], [])
        return {s.spec.incidents.pool: 4 for s in specs if s.spec.incidents is not None}

    def ensure_pools(self, pools: dict[str, int] | None = None) -> None:
        """Create missing pools (a task in a missing pool would never be scheduled)."""
        for name, slots in (pools if pools is not None else self.template_pools()).items():
            status, _ = self.api("GET", f"/api/v2/pools/{name}")
            if status == 404:
                status, body = self.api("POST", "/api/v2/pools", {
                    "name": name, "slots": slots, "description": "closedloop incident runs", "include_deferred": False})
                if status not in (200, 201, 409):
                    raise RuntimeError(f"cannot create pool {name!r}: HTTP {status} {body}")

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs.values())

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def client(self, user: str):
        """An :class:`~closedloop.records.airflow_api.AirflowAPI` logged in as ``user``."""
        from closedloop.records.airflow_api import AirflowAPI

        if user not in self._tokens:
            self._tokens[user] = AirflowAPI(self.url, user, self.users[user][1])
        return self._tokens[user]

    def api(self, method: str, path: str, body: dict | None = None, *, user: str = "admin") -> tuple[int, dict]:
        """``path`` as in the REST docs, e.g. ``/api/v2/dags``."""
        return self.client(user).call(method, path.removeprefix("/api/v2"), body)

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 2.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}; airflow log:\n{self.tail()}")


def default_users(approvers: list[str], reporters: list[str] = ()) -> dict[str, str]:
    """Local users, each with the narrowest SimpleAuthManager role that works: an admin; a requester
    (``user``: triggers runs); every approver named in the templates (``user``: answers reviews and asks
    for registry actions); every incident reporter (``viewer``: reports through the plugin, which posts
    the event for them — no ``op``, so no connections, pools, variables or other asset events). Nobody
    but the admin has ``op``."""
    roles = {"admin": "admin", "ml-engineer": "user", "fleet-monitor": "viewer"}
    roles.update({r: "viewer" for r in reporters if r not in roles})
    roles.update({a: "user" for a in approvers})
    return roles


def template_approvers() -> list[str]:
    from closedloop import settings
    from closedloop.spec import load_all

    specs, _ = load_all(settings.pipelines_dir())
    return sorted({a for s in specs if s.spec.approval for a in s.spec.approval.approvers})


def template_reporters() -> list[str]:
    from closedloop import settings
    from closedloop.spec import load_all

    specs, _ = load_all(settings.pipelines_dir())
    return sorted({r for s in specs if s.spec.incidents for r in s.spec.incidents.reporters})


def mlflow_ui_command(port: int, uri: str, artifacts: str | None) -> tuple[list[str], dict[str, str]]:
    """``mlflow server`` as the embedded default runs it, for its UI: one web worker, and MLflow's job
    queue off (MLflow 3 otherwise starts a job runner and job-queue consumers beside its workers, each
    a Python process, for server-side jobs the UI never runs). benchmarks/local_servers.py measures both."""
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", uri, "--workers", "1"]
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    return cmd, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow_ui(port: int, log: Path) -> subprocess.Popen:
    from closedloop import settings
    from closedloop.runtime.tracking import ensure_store

    uri = settings.tracking_uri()
    ensure_store(uri)  # created and migrated here, once, under the store's lock: never by the UI and a task at once
    cmd, env = mlflow_ui_command(port, uri, settings.artifact_root(uri))
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **env})


def local_server(port: int | None = None) -> AirflowServer:
    """The embedded-default Airflow: this checkout's DAGs, the ``.closedloop`` stores, local users."""
    from closedloop import settings

    home = settings.home()
    users = local_users(home / "airflow" / "simple_auth_manager_passwords.json.generated",
                        default_users(template_approvers(), template_reporters()))
    return AirflowServer(home, Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]), users, home=home / "airflow",
                         port=port, env={"CLOSEDLOOP_HOME": str(home), "MLFLOW_TRACKING_URI": settings.tracking_uri()})


def announce(server, mlflow_port: int) -> Path:
    """Tell the CLI where this local deployment listens and where its logins are (owner-only file)."""
    path = settings.local_endpoint()
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(json.dumps({"airflow": server.url, "mlflow": f"http://127.0.0.1:{mlflow_port}", "pid": os.getpid(),
                                "passwords": str(server.home / "simple_auth_manager_passwords.json.generated")}))
    part.chmod(0o600)
    os.replace(part, path)
    return path


def serve(airflow_port: int = 8080, mlflow_port: int = 5000) -> int:
    """``make airflow``: Airflow UI and MLflow UI in the foreground until Ctrl-C."""
    server = local_server(airflow_port)
    mlflow_proc = start_mlflow_ui(mlflow_port, server.root / "logs-mlflow-ui.log")
    try:
        print(f"starting Airflow on {server.url} and MLflow on http://127.0.0.1:{mlflow_port} ...", flush=True)
        server.start()
        width = max(len(u) for u in server.users)
        print("\n" + "=" * 66)
        print(f" Airflow UI : {server.url}")
        print(f" MLflow UI  : http://127.0.0.1:{mlflow_port}")
        print(f" DAGs from  : {server.env['AIRFLOW__CORE__DAGS_FOLDER']}")
        print(" logins     :")
        for user, (role, pw) in server.users.items():
            if user != SERVICE_USER:  # the deployment's own account: a secret
                print(f"   {user:<{width}}  {pw}  ({role})")
        print(f" Airflow log: {server.log}      Ctrl-C stops both")
        print("=" * 66, flush=True)
        announce(server, mlflow_port)
        while server.alive():
            time.sleep(1)
        print(f"an Airflow component exited; see {server.log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        settings.local_endpoint().unlink(missing_ok=True)
        server.stop()
        if mlflow_proc.poll() is None:
            os.killpg(mlflow_proc.pid, signal.SIGTERM)

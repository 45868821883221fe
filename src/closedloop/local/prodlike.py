"""The production shape on one machine, without Docker: PostgreSQL (Airflow's metadata and MLflow's
backend), Redis (Celery's broker), ``mlflow server`` on PostgreSQL with proxied artifacts, and
Airflow 3's api-server, scheduler, dag-processor, triggerer and Celery workers — all on 127.0.0.1,
all in one scratch folder. ``make prodlike`` (``closedloop prodlike``) starts it and stops it
cleanly on Ctrl-C; the tests and the throughput benchmark start it from Python.

Needs Debian's ``postgresql`` and ``redis-server`` packages (``.ci/run`` installs them) and the
``production`` extra (Celery provider, psycopg2, redis).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from closedloop.local.server import AirflowServer, free_port

MLFLOW_AUTH_CACHE_SECONDS = 60
"""How long an MLflow server worker trusts a checked password (MLflow's ``auth_cache_ttl_seconds``)."""


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name)
                                                                      else [])
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: apt-get install postgresql")
    return found[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres:
    def __init__(self, root: Path, port: int | None = None):
        import tempfile

        # its own folder under the system temp dir: the postgres user must reach it (a test's tmp_path may be
        # readable by root only)
        self.root = Path(tempfile.mkdtemp(prefix="closedloop-pg-")) if os.geteuid() == 0 else root
        self.port = port or free_port()
        self.data, self.log = self.root / "pgdata", root / "postgres.log"
        self.proc: subprocess.Popen | None = None

    def url(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://closedloop@127.0.0.1:{self.port}/{db}"

    def start(self, databases: tuple[str, ...]) -> Postgres:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        if not self.data.exists():
            subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(self.data), "-U", "closedloop", "--auth=trust",
                                         "-E", "UTF8", "--no-instructions"]), check=True, capture_output=True)
        self.proc = subprocess.Popen(_as_postgres([
            _pg_bin("postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.root),
            "-c", "max_connections=300", "-c", "fsync=off", "-c", "shared_buffers=128MB"]),
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        psql = [_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "closedloop", "-d", "postgres", "-c"]
        deadline = time.monotonic() + 60
        while subprocess.run([*psql, "select 1"], capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start; log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        for db in databases:
            subprocess.run([*psql, f"create database {db}"], capture_output=True)  # exists already: fine
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if os.geteuid() == 0 and self.root.name.startswith("closedloop-pg-"):
            shutil.rmtree(self.root, ignore_errors=True)


class Service:
    """A local server process with a log file and a readiness check."""

    def __init__(self, name: str, cmd: list[str], log: Path, ready, env: dict[str, str] | None = None):
        self.name, self.cmd, self.log, self.ready, self.env = name, cmd, log, ready, env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Service:
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.env)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


class ProdLike:
    """PostgreSQL + Redis + MLflow server + Airflow with the CeleryExecutor and ``workers`` Celery workers."""

    def __init__(self, root: Path, dags_folder: Path, users: dict[str, tuple[str, str]], *, workers: int = 2,
                 concurrency: int = 4, env: dict[str, str] | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.postgres = Postgres(root / "postgres")
        self.redis_port, self.mlflow_port = free_port(), free_port()
        bin_dir = Path(sys.executable).parent
        self.redis = Service("redis", [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
                                       "--port", str(self.redis_port), "--save", "", "--appendonly", "no"],
                             root / "redis.log", self._redis_ready)
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        # MLflow's auth app: the pipelines' service account (MLflow admin) writes; people get accounts whose
        # default permission is READ, so nobody but the deployment registers versions or moves aliases
        import secrets

        self.mlflow_service = ("closedloop-service", secrets.token_urlsafe(18))
        auth_ini = root / "mlflow-auth.ini"
        auth_ini.write_text("[mlflow]\ndefault_permission = READ\n"
                            f"database_uri = {self.postgres.url('mlflow_auth', 'postgresql+psycopg2')}\n"
                            f"admin_username = {self.mlflow_service[0]}\nadmin_password = {self.mlflow_service[1]}\n"
                            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                            # MLflow's credential cache: a password is hashed (PBKDF2, ~0.2 s of CPU) once a
                            # minute per worker instead of on every request; a revoked password keeps working
                            # on the other worker for at most that minute (README, threat table)
                            f"auth_cache_ttl_seconds = {MLFLOW_AUTH_CACHE_SECONDS}\n")
        auth_ini.chmod(0o600)
        self.mlflow = Service("mlflow", [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1",
                                         "--port", str(self.mlflow_port), "--workers", "2", "--app-name", "basic-auth",
                                         "--backend-store-uri", self.postgres.url("mlflow", "postgresql+psycopg2"),
                                         "--artifacts-destination", str(root / "mlartifacts"), "--serve-artifacts"],
                              root / "mlflow.log", lambda: _http_ok(f"{self.mlflow_url}/health"),
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                                   "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                                   "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24)})
        self.workers = workers
        celery = {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            # warm tasks: each Celery worker preloads the libraries the steps compute with before it forks its pool
            "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "closedloop.executors.CELERY_CONFIG",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url("airflow", "postgresql+psycopg2"),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": self.postgres.url("airflow", "db+postgresql+psycopg2"),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            # the service identity: mlflow_default carries it for the tasks and watchers; the API server's
            # pages and the scheduler's callbacks read MLflow with it too
            "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps({
                "conn_type": "mlflow", "host": "127.0.0.1", "port": self.mlflow_port, "schema": "http",
                "login": self.mlflow_service[0], "password": self.mlflow_service[1]}),
            "MLFLOW_TRACKING_USERNAME": self.mlflow_service[0],
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_service[1],
            "CLOSEDLOOP_DATA_ROOT": str(root / "data"),
            **(env or {}),
        }
        # the deployment's signing key in the environment (what a secrets backend holds in production), never
        # Airflow's metadata database; its public key pinned beside it: every verifier believes only that
        from closedloop.runtime.signing import local_signer

        key = local_signer(home=celery.get("CLOSEDLOOP_HOME", str(root / "closedloop")))
        celery["CLOSEDLOOP_SIGNING_KEY"] = key.seed_b64()
        celery["CLOSEDLOOP_TRUSTED_KEYS"] = key.verifier.published()
        self.airflow = AirflowServer(root, dags_folder, users, env=celery)
        self.airflow.COMPONENTS = AirflowServer.COMPONENTS + tuple(
            (f"worker-{i}", ["celery", "worker", "--celery-hostname", f"worker{i}@%h", "--skip-serve-logs",
                             "--concurrency", str(concurrency)]) for i in range(1, workers + 1))

    def _redis_ready(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> ProdLike:
        try:
            self.postgres.start(("airflow", "mlflow", "mlflow_auth"))
            self.redis.start()
            self.prepare_mlflow()
            self.mlflow.start(timeout=180)
            self.airflow.start(timeout=300)
        except BaseException:
            self.stop()
            raise
        return self

    def prepare_mlflow(self) -> None:
        """Create and migrate MLflow's store and its auth store here, once, before the server starts: its
        workers would otherwise each migrate the same new databases at once (alembic "expected to match
        one row … 0 found")."""
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore as AuthStore
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(self.postgres.url("mlflow", "postgresql+psycopg2"), str(self.root / "mlartifacts"))
        AuthStore().init_db(self.postgres.url("mlflow_auth", "postgresql+psycopg2"))

    def stop(self) -> None:
        self.airflow.stop()
        self.mlflow.stop()
        self.redis.stop()
        self.postgres.stop()

    def mlflow_user(self, name: str, password: str) -> None:
        """An MLflow account for a person (default permission READ: reads governed models, moves nothing)."""
        import base64

        auth = base64.b64encode(":".join(self.mlflow_service).encode()).decode()
        req = urllib.request.Request(f"{self.mlflow_url}/api/2.0/mlflow/users/create", method="POST",
                                     data=json.dumps({"username": name, "password": password}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
        try:
            urllib.request.urlopen(req, timeout=30).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 400 or "already exists" not in exc.read().decode(errors="replace"):
                raise

    def describe(self) -> str:
        return (f"Airflow   {self.airflow.url} (CeleryExecutor, {self.workers} workers)\n"
                f"MLflow    {self.mlflow_url} (PostgreSQL backend, proxied artifacts, auth: service account "
                f"{self.mlflow_service[0]} writes, people read)\n"
                f"Postgres  127.0.0.1:{self.postgres.port}   Redis 127.0.0.1:{self.redis_port}\n"
                f"Folder    {self.root}")


def main(root: str | None = None, workers: int = 2) -> int:
    """``make prodlike``: start everything, print where, wait for Ctrl-C, stop everything."""
    import tempfile

    from closedloop.local.server import default_users, template_approvers, template_reporters

    project = Path.cwd()
    folder = Path(root) if root else Path(tempfile.mkdtemp(prefix="closedloop-prodlike-"))
    users = {u: (role, f"{u}-pw") for u, role in default_users(template_approvers(), template_reporters()).items()}
    shape = ProdLike(folder, project / "dags", users, workers=workers)
    print("starting PostgreSQL, Redis, MLflow server, Airflow (CeleryExecutor) on 127.0.0.1 ...", flush=True)
    shape.start()
    for user, (_, pw) in users.items():
        shape.mlflow_user(user, pw)
    print(shape.describe(), flush=True)
    print("users (Airflow and MLflow): " + ", ".join(f"{u} / {pw}" for u, (_, pw) in users.items()), flush=True)
    print("Ctrl-C stops everything.", flush=True)
    try:
        while shape.airflow.alive():
            time.sleep(2)
        print(f"an Airflow component exited; log:\n{shape.airflow.tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        shape.stop()

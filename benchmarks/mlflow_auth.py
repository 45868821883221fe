"""What MLflow's auth app costs per request, with and without its credential cache.

Starts two ``mlflow server --app-name basic-auth`` (SQLite, one worker each, 127.0.0.1) side by
side: MLflow's default (every request checks the password's PBKDF2 hash) and the production
shape's setting (``auth_cache_ttl_seconds = 60``: a worker checks a password once a minute). Then,
interleaved, 3 × 30 authenticated ``experiments/get-by-name`` requests against each; prints the
median latency per setting and the ratio. A pipeline run makes a few hundred such requests.
Usage: ``python benchmarks/mlflow_auth.py``.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from closedloop.local.prodlike import MLFLOW_AUTH_CACHE_SECONDS  # noqa: E402
from closedloop.local.server import free_port  # noqa: E402


def start(tmp: Path, name: str, cache_seconds: int, password: str) -> tuple[subprocess.Popen, str]:
    ini = tmp / f"{name}.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp / f'{name}-auth.db'}\n"
                   f"admin_username = bench\nadmin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   f"auth_cache_ttl_seconds = {cache_seconds}\n")
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp / f'{name}.db'}"],
                            stdout=(tmp / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                                 "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
                                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    return proc, f"http://127.0.0.1:{port}"


def wait(url: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not come up")


def timed(session, url: str, password: str, n: int = 30) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = session.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "Default"},
                        auth=("bench", password), timeout=60)
        out.append(time.perf_counter() - t)
        r.raise_for_status()
    return out


def main() -> int:
    import requests

    password = secrets.token_urlsafe(18)
    with tempfile.TemporaryDirectory(prefix="closedloop-bench-mlflow-auth-") as d:
        tmp = Path(d)
        servers = {"MLflow's default (no cache)": start(tmp, "nocache", 0, password),
                   f"credential cache {MLFLOW_AUTH_CACHE_SECONDS} s (production shape)":
                       start(tmp, "cache", MLFLOW_AUTH_CACHE_SECONDS, password)}
        try:
            for _, url in servers.values():
                wait(url)
            times: dict[str, list[float]] = {k: [] for k in servers}
            session = requests.Session()
            for _ in range(3):  # interleaved
                for name, (_, url) in servers.items():
                    times[name] += timed(session, url, password)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print("authenticated MLflow request (experiments/get-by-name), median of 90, this machine:")
    for k, v in medians.items():
        print(f"  {k:<45} {v:7.1f} ms")
    a, b = medians.values()
    print(f"  ratio (no cache / cache): {a / b:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

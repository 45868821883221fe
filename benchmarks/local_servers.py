"""What the local MLflow server costs idle and at start-up: the embedded default's ``make airflow``
MLflow UI as MLflow 3 starts it by default vs as closedloop starts it (one web worker, MLflow's job
queue off: the UI runs no jobs), side by side.

For each: seconds until ``/health`` answers, then after 10 s of idling the processes in its session,
their resident memory (RSS, summed) and CPU seconds spent while idle (10 s).

    .venv/bin/python benchmarks/local_servers.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def session_processes(sid: int) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getsid(int(pid)) == sid:
                    out.append(int(pid))
            except (ProcessLookupError, PermissionError):
                pass
    return out


def rss_and_cpu(pids: list[int]) -> tuple[float, float]:
    rss = cpu = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, ProcessLookupError):
            pass
    return rss / 2**20, cpu


def measure(name: str, cmd: list[str], env: dict[str, str], port: int) -> None:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.perf_counter() - started > 180:
                    raise RuntimeError(f"{name}: no /health within 180 s") from None
                time.sleep(0.2)
        up = time.perf_counter() - started
        time.sleep(10)
        pids = session_processes(proc.pid)
        _, cpu0 = rss_and_cpu(pids)
        time.sleep(10)
        pids = session_processes(proc.pid)
        rss, cpu1 = rss_and_cpu(pids)
        print(f"{name:<44} up in {up:5.1f} s   {len(pids):2d} processes   {rss:7.0f} MB RSS   "
              f"{cpu1 - cpu0:5.2f} CPU-s per 10 s idle", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> int:
    from closedloop.local.server import free_port, mlflow_ui_command

    with tempfile.TemporaryDirectory(prefix="closedloop-bench-servers-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        subprocess.run([str(VENV_BIN / "python"), "-c", "import sys; from closedloop.steps.tracking import ensure_store; "
                        "ensure_store(sys.argv[1])", uri], check=True)  # the tables exist, as in use
        for _ in range(2):  # interleaved, twice
            port = free_port()
            measure("mlflow server (MLflow's defaults)", [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1",
                    "--port", str(port), "--backend-store-uri", uri, "--default-artifact-root", f"{tmp}/artifacts"],
                    dict(os.environ), port)
            port = free_port()
            cmd, env = mlflow_ui_command(port, uri, f"{tmp}/artifacts")
            measure("mlflow server as closedloop starts it", cmd, {**os.environ, **env}, port)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the local servers cost idle and at start-up, side by side:

1. the embedded default's ``make airflow`` MLflow UI as MLflow 3 starts it by default vs as closedloop
   starts it (one web worker, MLflow's job queue off: the UI runs no jobs);
2. the embedded default's Airflow (API server, scheduler, DAG processor, triggerer; LocalExecutor):
   Airflow's defaults (cold tasks, the scheduler idling 1 s between loops that found no work), warm
   tasks, and as closedloop starts it (warm, 0.2 s): start-up, processes, memory, idle CPU, and the wall
   of a no-op DAG of eight chained tasks (median of 3).

For each: seconds until healthy, then after 10 s of idling the processes in its session(s), their
memory (PSS, summed: shared pages counted once) and CPU seconds spent while idle (10 s).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
    """Memory (PSS: each process's share of its pages, so the copy-on-write pages forked processes
    share are counted once) in MB, and CPU seconds (user + system) spent so far, summed."""
    pss = cpu = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return pss / 2**20, cpu


def idle_figures(sessions: list[int]) -> tuple[int, float, float]:
    time.sleep(10)
    pids = [p for sid in sessions for p in session_processes(sid)]
    _, cpu0 = rss_and_cpu(pids)
    time.sleep(10)
    pids = [p for sid in sessions for p in session_processes(sid)]
    rss, cpu1 = rss_and_cpu(pids)
    return len(pids), rss, cpu1 - cpu0


def airflow(name: str, tmp: Path, env: dict[str, str]) -> None:
    import statistics

    from orchestration_overhead import NOOP, NOOP_DAG, run_once

    from closedloop.local.server import AirflowServer

    dags = tmp / "dags"
    dags.mkdir(exist_ok=True)
    (dags / "noop.py").write_text(NOOP_DAG)
    server = AirflowServer(Path(tempfile.mkdtemp(dir=tmp)), dags, {"admin": ("admin", "admin-pw")}, env=env)
    started = time.perf_counter()
    server.start()
    up = time.perf_counter() - started
    try:
        server.wait_for(lambda: server.api("GET", f"/api/v2/dags/{NOOP}")[0] == 200, 180, "the no-op DAG")
        n, rss, cpu = idle_figures([p.pid for p in server.procs.values()])
        walls = [run_once(server, NOOP, {})["wall"] for _ in range(3)]
        print(f"{name:<44} up in {up:5.1f} s   {n:2d} processes   {rss:7.0f} MB PSS   "
              f"{cpu:5.2f} CPU-s per 10 s idle   no-op DAG {statistics.median(walls):4.1f} s", flush=True)
    finally:
        server.stop()


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
        n, rss, cpu = idle_figures([proc.pid])
        print(f"{name:<44} up in {up:5.1f} s   {n:2d} processes   {rss:7.0f} MB PSS   "
              f"{cpu:5.2f} CPU-s per 10 s idle", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> int:
    from closedloop.local.server import free_port, mlflow_ui_command

    with tempfile.TemporaryDirectory(prefix="closedloop-bench-servers-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        subprocess.run([str(VENV_BIN / "python"), "-c", "import sys; from closedloop.runtime.tracking import ensure_store; "
                        "ensure_store(sys.argv[1])", uri], check=True)  # the tables exist, as in use
        for _ in range(2):  # interleaved, twice
            port = free_port()
            measure("mlflow server (MLflow's defaults)", [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1",
                    "--port", str(port), "--backend-store-uri", uri, "--default-artifact-root", f"{tmp}/artifacts"],
                    dict(os.environ), port)
            port = free_port()
            cmd, env = mlflow_ui_command(port, uri, f"{tmp}/artifacts")
            measure("mlflow server as closedloop starts it", cmd, {**os.environ, **env}, port)
        print()
        for _ in range(2):
            airflow("airflow: cold tasks, idle sleep 1 s (Airflow's)", Path(tmp),
                    {"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1", "CLOSEDLOOP_WARM_TASKS": "0"})
            airflow("airflow: warm tasks, idle sleep 1 s", Path(tmp), {"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1"})
            airflow("airflow as closedloop starts it (warm, 0.2 s)", Path(tmp), {})
    return 0


if __name__ == "__main__":
    sys.exit(main())

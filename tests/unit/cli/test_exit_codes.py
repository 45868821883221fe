"""One exit-code convention, kept by every command: 0 done; 1 refused, a check failed or Airflow unreachable;
2 bad input or not found — with a message that says what and where, never a traceback. Each command runs
as a person runs it (its own process) on an empty local home and an Airflow address nobody listens on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "CLOSEDLOOP"))}
    return {**keep, "CLOSEDLOOP_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
            "AIRFLOW_API_URL": f"http://127.0.0.1:{port}", "AIRFLOW_USERNAME": "safety-lead",
            "AIRFLOW_PASSWORD": "x"}


CASES = [
    # done
    (0, ["pipelines", "list"], ""),
    (0, ["pipelines", "validate"], ""),
    (0, ["pipelines", "describe", "acc_longitudinal"], ""),
    (0, ["impact", "--source", "no-such-source"], ""),  # an exact answer: nothing touched
    # bad input or not found
    (2, ["pipelines", "describe", "nosuch"], "no valid pipeline named 'nosuch'"),
    (2, ["pipelines", "validate", "/nonexistent.yaml"], "cannot read template"),
    (2, ["run", "nosuch"], "no valid pipeline named 'nosuch'"),
    (2, ["trace", "nosuch_model/1"], "unknown model 'nosuch_model'"),
    (2, ["scenarios", "list", "nosuch_model"], "unknown model 'nosuch_model'"),
    (2, ["dossier", "show", "nosuch_model/1"], "unknown model 'nosuch_model'"),
    (2, ["dossier", "verify", "/nonexistent"], "no such dossier folder"),
    (2, ["summary", "acc_longitudinal", "manual__x"], "no run 'manual__x' of pipeline 'acc_longitudinal'"),
    (2, ["kpi", "report", "nosuch_model", "--metric", "hard_brake_rate=0.1"], "'nosuch_model' has no 'production'"),
    (2, ["request", "acc_longitudinal", "--purpose", "short", "--change", "data", "--impact", "fewer"],
     "purpose: 5 characters, at least 10 needed"),
    (2, ["impact", "--source", "a%"], "no wildcards"),
    (2, ["trace"], "the following arguments are required: ref"),  # argparse's own usage error
    # refused, or Airflow unreachable
    (1, ["runs", "acc_longitudinal"], "cannot reach Airflow at http://127.0.0.1:"),
    (1, ["health"], "cannot reach Airflow at http://127.0.0.1:"),
    (1, ["approve", "acc_longitudinal", "manual__x", "--wait", "0"], "cannot reach Airflow at http://127.0.0.1:"),
    (1, ["promote", "acc_longitudinal_policy", "1"], "cannot reach Airflow at http://127.0.0.1:"),
    (1, ["request", "acc_longitudinal", "--purpose", "EU-only winter policy", "--change", "data", "--impact",
         "fewer EU cut-in errors"], "cannot reach Airflow at http://127.0.0.1:"),
]


def test_every_command_keeps_the_exit_code_convention(env):
    def run(case):
        code, args, message = case
        out = subprocess.run([sys.executable, "-m", "closedloop.cli", *args], capture_output=True, text=True,
                             timeout=300, env=env)
        return case, out

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, CASES))
    wrong = [f"closedloop {' '.join(args)}: exit {out.returncode} (expected {code}); stderr: {out.stderr[-400:]}"
             for (code, args, message), out in results
             if out.returncode != code or message not in out.stderr or "Traceback" in out.stderr]
    assert not wrong, "\n".join(wrong)

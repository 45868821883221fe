"""Parse time of dags/: the shipped templates and 100 generated ones.

Each measurement is a fresh interpreter (like a DAG-processor parse): the time to import
Airflow's DagBag is reported apart from the time to fill it from the folder (our part plus
Airflow's per-file work). Prints medians over REPEATS runs, measured side by side.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
REPEATS = 5
PROBE = """
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
t2 = time.perf_counter()
assert not bag.import_errors, bag.import_errors
print(json.dumps({"import_s": t1 - t0, "fill_s": t2 - t1, "dags": len(bag.dags)}))
"""


def project_with(n: int, root: Path) -> Path:
    shutil.copytree(PROJECT / "dags", root / "dags")
    for sub in ("expectations", "scenarios"):
        shutil.copytree(PROJECT / "include" / sub, root / "include" / sub)
    (root / "include" / "pipelines").mkdir()
    text = (PROJECT / "include" / "pipelines" / "acc_longitudinal.yaml").read_text()
    for i in range(n):
        (root / "include" / "pipelines" / f"p{i:03d}.yaml").write_text(
            text.replace("name: acc_longitudinal", f"name: gen_{i:03d}")
                .replace("name: acc_longitudinal_policy", f"name: gen_model_{i:03d}"))
    return root / "dags"


def measure(folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"shipped": PROJECT / "dags", "100 generated": project_with(100, Path(tmp) / "g100")}
        samples: dict[str, list[dict]] = {k: [] for k in folders}
        for _ in range(REPEATS):  # interleaved, so machine noise hits both alike
            for name, folder in folders.items():
                samples[name].append(measure(folder))
    print(f"parse time of dags/ (median of {REPEATS} fresh interpreters)")
    print(f"{'templates':<16}{'DAGs':>6}{'import DagBag':>16}{'fill DagBag':>14}{'per DAG':>10}")
    for name, rows in samples.items():
        imp = statistics.median(r["import_s"] for r in rows)
        fill = statistics.median(r["fill_s"] for r in rows)
        dags = rows[0]["dags"]
        print(f"{name:<16}{dags:>6}{imp:>14.2f} s{fill * 1000:>11.0f} ms{fill * 1000 / dags:>7.1f} ms")


if __name__ == "__main__":
    main()

"""Parse time of dags/: the shipped templates and 200 generated ones.

Each measurement is a fresh interpreter (like a DAG-processor parse): the time to import
Airflow's DagBag is reported apart from the time to fill it from the folder (every DAG file: our
part plus Airflow's per-file work). Prints medians over REPEATS runs, measured side by side.

``--compare PATH``: the same measurements of another checkout of this project (its ``src`` first on
the path, its dags/ and templates), interleaved with this one's, so machine noise hits both alike.
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


GENERATED = 200


def project_with(n: int, root: Path, project: Path = PROJECT) -> Path:
    shutil.copytree(project / "dags", root / "dags")
    for sub in ("expectations", "scenarios"):
        shutil.copytree(project / "include" / sub, root / "include" / sub)
    (root / "include" / "pipelines").mkdir()
    text = (project / "include" / "pipelines" / "acc_longitudinal.yaml").read_text()
    for i in range(n):
        (root / "include" / "pipelines" / f"p{i:03d}.yaml").write_text(
            text.replace("name: acc_longitudinal", f"name: gen_{i:03d}")
                .replace("name: acc_longitudinal_policy", f"name: gen_model_{i:03d}"))
    return root / "dags"


def measure(folder: Path, src: Path | None = None) -> dict:
    import os

    env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {})}
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    other = Path(sys.argv[sys.argv.index("--compare") + 1]).resolve() if "--compare" in sys.argv else None
    with tempfile.TemporaryDirectory() as tmp:
        checkouts = {"": (PROJECT, PROJECT / "src")} | ({f" [{other.name}]": (other, other / "src")} if other else {})
        folders = {}
        for tag, (project, src) in checkouts.items():
            folders[f"shipped{tag}"] = (project / "dags", src)
            folders[f"{GENERATED} generated{tag}"] = (project_with(GENERATED, Path(tmp) / f"g{len(folders)}", project), src)
        samples: dict[str, list[dict]] = {k: [] for k in folders}
        for _ in range(REPEATS):  # interleaved, so machine noise hits every checkout alike
            for name, (folder, src) in folders.items():
                samples[name].append(measure(folder, src))
    print(f"parse time of dags/ (median of {REPEATS} fresh interpreters)")
    print(f"{'templates':<24}{'DAGs':>6}{'import DagBag':>16}{'fill DagBag':>14}{'per DAG':>10}")
    for name, rows in samples.items():
        imp = statistics.median(r["import_s"] for r in rows)
        fill = statistics.median(r["fill_s"] for r in rows)
        dags = rows[0]["dags"]
        print(f"{name:<24}{dags:>6}{imp:>14.2f} s{fill * 1000:>11.0f} ms{fill * 1000 / dags:>7.1f} ms")


if __name__ == "__main__":
    main()

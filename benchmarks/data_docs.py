"""What Great Expectations' Data Docs cost a data validation.

    .venv/bin/python benchmarks/data_docs.py [--rows 20000] [--repeat 5]

Validates one labelled frame of ``--rows`` rows against the shipped suite, alternating without and with
the Data Docs site built (what ``validate_data`` publishes on its MLflow run), and prints the medians side
by side and the size of what is published.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import numpy as np
    import pandas as pd

    from closedloop.steps.validation import DOCS_SKIPPED, load_suite, validate_frame

    suite = load_suite(ROOT / "include" / "expectations" / "drive_log_labels.json")
    columns = {e["kwargs"]["column"] for e in suite["expectations"] if "column" in e["kwargs"]}
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({c: rng.uniform(0.1, 1.0, args.rows) for c in sorted(columns)})
    validate_frame(frame, suite)  # warm: Great Expectations' first use loads its registries
    times: dict[bool, list[float]] = {False: [], True: []}
    published = 0
    for _ in range(args.repeat):
        for docs in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                validate_frame(frame, suite, docs_dir=folder if docs else None, run_name="bench/run")
                times[docs].append(time.perf_counter() - started)
                if docs:
                    skipped = [Path(folder) / s for s in DOCS_SKIPPED]
                    published = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()
                                    and not any(f == s or s in f.parents for s in skipped))
    plain, with_docs = statistics.median(times[False]), statistics.median(times[True])
    print(f"validation of {args.rows:,} rows, {len(suite['expectations'])} expectations, median of {args.repeat}:")
    print(f"  without Data Docs  {plain:.3f} s")
    print(f"  with Data Docs     {with_docs:.3f} s  (+{with_docs - plain:.3f} s, ×{with_docs / plain:.2f})")
    print(f"  Data Docs published on the step's MLflow run: {published / 1024:.0f} KB (the site without its fonts and "
          "tutorial pictures)")


if __name__ == "__main__":
    main()

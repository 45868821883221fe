"""What trustworthy results cost: the code identity in a cache key, and sha256 over snapshot bytes.

    .venv/bin/python benchmarks/integrity.py [--mb 100]

Prints, for each cacheable step of the shipped template, the cost of computing its cache key in a
fresh process (cold: the step's source files are read and parsed, the library versions looked up)
and again in the same process (warm: median of 50), then for a snapshot of about ``--mb`` MB: the
sha256 of its Parquet bytes, a verified read (hash + parse) beside an unverified parse, and the
old 64-bit row-hash digest, measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COLD = """
import json, time
t0 = time.perf_counter()
from closedloop.spec import load_spec
from closedloop.runtime.cache import key_of
loaded = load_spec({template!r})
out = {{}}
for step in {steps!r}:
    t = time.perf_counter()
    key_of(loaded, step, dataset="0" * 64)
    out[step] = (time.perf_counter() - t) * 1000
print(json.dumps(out))
"""


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples):7.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100)
    args = ap.parse_args()

    from closedloop import pipeline
    from closedloop.runtime.cache import key_of
    from closedloop.spec import load_spec

    template = str(ROOT / "include" / "pipelines" / "acc_longitudinal.yaml")
    steps = list(pipeline.CACHEABLE)
    cold = json.loads(subprocess.run([sys.executable, "-c", COLD.format(template=template, steps=steps)],
                                     capture_output=True, text=True, check=True).stdout)
    loaded = load_spec(template)
    print("cache key per step (the code identity included)")
    print(f"  {'step':<18}{'cold (fresh process)':>22}{'warm (median of 50)':>22}")
    for step in steps:
        warm = []
        for _ in range(50):
            t = time.perf_counter()
            key_of(loaded, step, dataset="0" * 64)
            warm.append((time.perf_counter() - t) * 1000)
        print(f"  {step:<18}{cold[step]:>19.2f} ms{ms(warm):>22}")

    import numpy as np
    import pandas as pd

    from closedloop.runtime.storage import bytes_digest, read_snapshot, to_bytes, write_snapshot

    rows = int(args.mb * 1e6 / 8 / 10)  # ten float64 columns
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows, 10)), columns=[f"f{i}" for i in range(10)])
    data = to_bytes(frame)
    size = len(data) / 1e6
    sha, old, verified, plain = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ref = write_snapshot(frame, root=tmp, pipeline="bench", kind="raw")
        for _ in range(5):
            t = time.perf_counter()
            bytes_digest(data)
            sha.append(time.perf_counter() - t)
            t = time.perf_counter()
            pd.util.hash_pandas_object(frame, index=False).values.tobytes()
            old.append(time.perf_counter() - t)
            t = time.perf_counter()
            read_snapshot(ref["uri"], ref["digest"])
            verified.append(time.perf_counter() - t)
            t = time.perf_counter()
            pd.read_parquet(ref["uri"])
            plain.append(time.perf_counter() - t)
    per100 = 100 / size
    print(f"\nsnapshot of {rows:,} rows, {size:.1f} MB of Parquet (median of 5; per 100 MB in brackets)")
    print(f"  sha256 of the bytes             {statistics.median(sha):6.3f} s  ({statistics.median(sha) * per100:.3f} s)")
    print(f"  old digest (pandas row hashes)  {statistics.median(old):6.3f} s  ({statistics.median(old) * per100:.3f} s)")
    print(f"  verified read (hash + parse)    {statistics.median(verified):6.3f} s  "
          f"({statistics.median(verified) * per100:.3f} s)")
    print(f"  unverified parse                {statistics.median(plain):6.3f} s  "
          f"({statistics.median(plain) * per100:.3f} s)")
    print(f"  verification overhead on a read {statistics.median(verified) / statistics.median(plain):6.2f}x")


if __name__ == "__main__":
    main()

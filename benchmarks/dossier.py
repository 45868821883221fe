"""The release dossier's cost: assembling, signing and writing the bundle, and verifying it offline, for a
bundle the size of the demo's (348 simulated episodes) and one with 100,000 episodes.

The evidence is real in kind: simulated episodes from the example simulator's records (the demo's catalog,
repeated with fresh seeds to the size asked), a sealed release record and two sealed approvals, the gate
report; the labelled snapshot for the independence check is the example generator's 14 days of two fleets.
Build = :func:`closedloop.steps.dossier.assemble` (minus MLflow reads, which the step adds) + bundle + write;
verify = :func:`closedloop.steps.dossier.verify` with the public key only. Medians of REPEAT runs.

Usage: ``python benchmarks/dossier.py [REPEAT]``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPEAT = int(sys.argv[1]) if len(sys.argv) > 1 else 5
ROOT = Path(__file__).resolve().parents[1]


def episodes(n: int) -> bytes:
    import random

    rng = random.Random(7)
    kinds = ["cruise", "cut_in", "stop_and_go", "hard_braking"]
    rows = [{"scenario": f"s-{i % 26}", "type": kinds[i % 4], "seed": 100 + i, "collision": False,
             "min_ttc_s": round(rng.uniform(0.8, 50), 3), "min_gap_m": round(rng.uniform(2, 80), 3),
             "max_jerk": round(rng.uniform(0.1, 5), 3), "hard_brakes": rng.randint(0, 3)} for i in range(n)]
    return json.dumps(rows).encode()


def main() -> None:
    from closedloop.driving.logs import synthesize_drive_logs
    from closedloop.runtime.context import RunContext
    from closedloop.runtime.signing import Binding, Signer, digest
    from closedloop.spec import load_spec
    from closedloop.steps import dossier

    loaded = load_spec(ROOT / "include" / "pipelines" / "acc_longitudinal.yaml")
    ctx = RunContext(pipeline=loaded.spec.name, template_digest=loaded.digest, dag_id=loaded.spec.name,
                     run_id="bench", data_root=tempfile.mkdtemp(), tracking_uri="sqlite:///:memory:")
    signer = Signer.generate()
    frame = synthesize_drive_logs(sources=["fleet-eu", "fleet-us"], window_start=date(2026, 11, 1),
                                  window_end=date(2026, 11, 15), scenarios=["cruise", "cut_in", "hard_braking",
                                                                            "stop_and_go"], episodes_per_day=1, seed=7)
    record = signer.seal({"kind": "release_record", "model": loaded.spec.model.name, "version": "1",
                          "registered_at": "2026-12-07T00:00:00+00:00", "requester": "ml-engineer"},
                         Binding(loaded.spec.name, "bench", "register_candidate"))
    approvals = [signer.seal({"statement": {"kind": "approval", "decision": "approved", "responder": who,
                                            "record_digest": digest(record), "task_id": task,
                                            "responded_at": "2026-12-07T01:00:00+00:00"}},
                             Binding(loaded.spec.name, "bench", task))
                 for who, task in (("safety-lead", "approval"), ("safety-deputy", "approval_2"))]
    report = [{"metric": g.metric, "min": g.min, "max": g.max, "value": 0.0, "passed": True, "verdict": "pass"}
              for g in loaded.spec.gates]
    print(f"release dossier, medians of {REPEAT} (labelled snapshot {len(frame):,} rows)")
    print(f"{'episodes':>9} {'bundle MB':>10} {'build s':>8} {'verify s':>9}")
    for n in (348, 100_000):
        data = episodes(n)
        build, check, size = [], [], 0
        for i in range(REPEAT):
            dest = Path(tempfile.mkdtemp()) / f"b{i}"
            started = time.perf_counter()
            body, evidence = dossier.assemble(
                loaded, ctx, raw={"digest": "r" * 64, "rows": len(frame)}, labelled={"digest": "l" * 64},
                validation={"suite": "s", "success": True, "evaluated": 9, "failed": 0},
                trained={"run_id": "t"}, offline={"metrics": {"offline.rmse": 0.16}},
                simulation={"episodes": n, "metrics": {"sim.cut_in.episodes": n / 4}}, gate={"report": report},
                record=record, approvals=approvals, shift=None, frame=frame, production=None, episodes=data)
            files = dossier.bundle(body, evidence, signer)
            dossier.write(files, str(dest))
            build.append(time.perf_counter() - started)
            size = sum(len(v) for v in files.values())
            started = time.perf_counter()
            dossier.verify(dest, signer.verifier.published())
            check.append(time.perf_counter() - started)
        print(f"{n:>9,} {size / 1e6:>10.2f} {statistics.median(build):>8.3f} {statistics.median(check):>9.3f}")


if __name__ == "__main__":
    main()

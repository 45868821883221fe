"""Snapshots: content digests, idempotent writes, and an fsspec URI through the same code path."""

from __future__ import annotations

from datetime import date

import pytest

from closedloop.errors import IntegrityError
from closedloop.runtime.context import RunContext
from closedloop.runtime.storage import intact, read_snapshot, write_snapshot
from closedloop.spec import load_spec
from closedloop.steps.dataset import generate_dataset
from closedloop.steps.labeling import label


@pytest.fixture(scope="module")
def loaded(project):
    return load_spec(project / "include" / "pipelines" / "acc_longitudinal.yaml")


def ctx(loaded, root: str, run_id: str = "manual__1") -> RunContext:
    return RunContext(pipeline=loaded.spec.name, template_digest=loaded.digest, dag_id=loaded.spec.name,
                      run_id=run_id, data_root=root)


def test_same_window_same_digest_other_window_other_digest(loaded, tmp_path):
    a = generate_dataset(loaded, ctx(loaded, str(tmp_path)), interval_end=date(2026, 11, 23))
    b = generate_dataset(loaded, ctx(loaded, str(tmp_path), "manual__2"), interval_end=date(2026, 11, 23))
    c = generate_dataset(loaded, ctx(loaded, str(tmp_path)), interval_end=date(2026, 11, 30))
    assert a["digest"] == b["digest"] and a["created"] and not b["created"]
    assert c["digest"] != a["digest"]
    assert (a["window_start"], a["window_end"]) == ("2026-11-09", "2026-11-23")
    assert sorted(p.name for p in (tmp_path / "acc_longitudinal" / "raw").iterdir()) == sorted(
        [f"{a['digest']}.parquet", f"{c['digest']}.parquet"])


def test_object_storage_uri_goes_through_the_same_code(loaded, tmp_path):
    """fsspec's in-memory filesystem stands in for S3/GCS (no cloud here): same steps, same digests."""
    local = ctx(loaded, str(tmp_path))
    remote = ctx(loaded, "memory://closedloop-test", "manual__remote")
    raw_local = generate_dataset(loaded, local, interval_end=date(2026, 11, 23))
    raw_remote = generate_dataset(loaded, remote, interval_end=date(2026, 11, 23))
    assert raw_remote["uri"].startswith("memory://closedloop-test/acc_longitudinal/raw/")
    assert raw_remote["digest"] == raw_local["digest"]
    lab_local, lab_remote = label(loaded, local, raw=raw_local), label(loaded, remote, raw=raw_remote)
    assert lab_remote["digest"] == lab_local["digest"]
    assert len(read_snapshot(lab_remote["uri"], lab_remote["digest"])) == lab_remote["rows"]


def test_a_snapshot_is_named_by_the_sha256_of_its_bytes(tmp_path):
    import hashlib

    import pandas as pd

    ref = write_snapshot(pd.DataFrame({"x": [1.0, 2.0]}), root=str(tmp_path), pipeline="p", kind="raw")
    data = open(ref["uri"], "rb").read()
    assert ref["digest"] == hashlib.sha256(data).hexdigest() and ref["uri"].endswith(f"/{ref['digest']}.parquet")
    again = write_snapshot(pd.DataFrame({"x": [1.0, 2.0]}), root=str(tmp_path), pipeline="p", kind="raw")
    assert again == {**ref, "created": False}


def test_a_modified_snapshot_is_detected_even_when_the_row_hashes_agree(tmp_path):
    """The old digest (pandas row hashes, 64 bits) could not tell two frames apart whose row hashes
    collide or whose change is outside the values it hashed; sha256 over the bytes sees any change:
    here a brake label changed and a compensating value kept every sum the same."""
    import pandas as pd

    frame = pd.DataFrame({"episode_id": ["e1", "e1"], "brake": [0.2, 0.8], "target_accel": [-1.0, -3.0]})
    ref = write_snapshot(frame, root=str(tmp_path), pipeline="p", kind="labelled")
    swapped = frame.assign(brake=[0.8, 0.2])  # same column sum, same multiset of values
    swapped.to_parquet(ref["uri"], index=False)
    with pytest.raises(IntegrityError, match=f"snapshot {ref['uri']} failed its integrity check"):
        read_snapshot(ref["uri"], ref["digest"])
    assert not intact(ref["uri"], ref["digest"])
    with pytest.raises(IntegrityError, match="not a sha256 digest"):  # a short or old-style digest is refused
        read_snapshot(ref["uri"], ref["digest"][:16])
    # the same content computed again repairs the file under its name (and says so in the log)
    assert write_snapshot(frame, root=str(tmp_path), pipeline="p", kind="labelled")["created"]
    assert intact(ref["uri"], ref["digest"]) and read_snapshot(ref["uri"], ref["digest"]).equals(frame)

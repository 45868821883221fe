"""Content-addressed Parquet snapshots under a data root (local folder or any fsspec URI)."""

from __future__ import annotations

import hashlib


def frame_digest(frame) -> str:
    """A digest of a DataFrame's content: column names, dtypes and every value, in order."""
    import pandas as pd

    h = hashlib.sha256()
    h.update(repr([(c, str(t)) for c, t in frame.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
    return h.hexdigest()[:16]


def snapshot_uri(root: str, pipeline: str, kind: str, digest: str) -> str:
    return f"{root}/{pipeline}/{kind}/{digest}.parquet"


def write_snapshot(frame, *, root: str, pipeline: str, kind: str) -> dict:
    """Write ``frame`` once under its digest; writing the same content again is a no-op.

    The file is written to a temporary name and renamed, so a killed writer never leaves a
    half snapshot under the final name, and concurrent writers of one snapshot do not collide.
    """
    import fsspec

    digest = frame_digest(frame)
    uri = snapshot_uri(root, pipeline, kind, digest)
    fs, path = fsspec.core.url_to_fs(uri)
    created = False
    if not fs.exists(path):
        import uuid

        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # one per writer: concurrent runs may write the same snapshot
        with fs.open(tmp, "wb") as fh:
            frame.to_parquet(fh, index=False)
        fs.mv(tmp, path)  # same content under the same name: the last rename wins, harmlessly
        created = True
    return {"uri": uri, "digest": digest, "rows": int(len(frame)), "created": created}


def read_snapshot(uri: str, expected_digest: str | None = None):
    """Read a snapshot back; with ``expected_digest`` verify the content has not changed."""
    import fsspec
    import pandas as pd

    from closedloop.errors import PermanentError

    with fsspec.open(uri, "rb") as fh:
        frame = pd.read_parquet(fh)
    if expected_digest and frame_digest(frame) != expected_digest:
        raise PermanentError(f"snapshot {uri} does not match its digest {expected_digest}: it was modified")
    return frame

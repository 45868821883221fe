"""Content-addressed Parquet snapshots under a data root (local folder or any fsspec URI).

A snapshot's name is the **sha256 of its exact bytes** (64 hex digits): the Parquet file is
written to memory, hashed, and stored as ``<root>/<pipeline>/<kind>/<sha256>.parquet``. Every
read hashes the bytes again and refuses a file that does not match (:class:`IntegrityError`,
naming the file): a changed label, a compensating edit, a truncated copy — anything — is found.
Records keep the full digest; :func:`short` is for display only.
"""

from __future__ import annotations

import hashlib
import re

from closedloop.errors import IntegrityError

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
SHORT = 12


def short(digest: str) -> str:
    """The display form of a digest (never used to find or check anything)."""
    return digest[:SHORT]


def to_bytes(frame) -> bytes:
    """The snapshot's Parquet bytes (deterministic for the same frame and library versions)."""
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot_uri(root: str, pipeline: str, kind: str, digest: str) -> str:
    return f"{root}/{pipeline}/{kind}/{digest}.parquet"


def write_snapshot(frame, *, root: str, pipeline: str, kind: str) -> dict:
    """Write ``frame`` once under the sha256 of its bytes; writing the same content again is a no-op.

    The file is written to a temporary name and renamed, so a killed writer never leaves a
    half snapshot under the final name, and concurrent writers of one snapshot do not collide.
    A file already under the name whose bytes do not match it (tampered, truncated) is replaced
    by the content just computed, and the replacement is logged.
    """
    import logging
    import uuid

    import fsspec

    data = to_bytes(frame)
    digest = bytes_digest(data)
    uri = snapshot_uri(root, pipeline, kind, digest)
    fs, path = fsspec.core.url_to_fs(uri)
    created = False
    if fs.exists(path):
        with fs.open(path, "rb") as fh:
            if bytes_digest(fh.read()) == digest:
                return {"uri": uri, "digest": digest, "rows": int(len(frame)), "created": False}
        logging.getLogger(__name__).warning("snapshot %s did not match its name (modified or truncated); "
                                            "replacing it with the content computed now", uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # one per writer: concurrent runs may write the same snapshot
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)  # same content under the same name: the last rename wins, harmlessly
    created = True
    return {"uri": uri, "digest": digest, "rows": int(len(frame)), "created": created}


def read_bytes(uri: str, digest: str) -> bytes:
    """The snapshot's bytes, checked against ``digest`` (the full sha256).

    :raises IntegrityError: the file's bytes do not hash to ``digest``, or ``digest`` is no sha256.
    :raises FileNotFoundError: there is no file.
    """
    import fsspec

    if not DIGEST_RE.match(digest or ""):
        raise IntegrityError(f"snapshot {uri}: {digest!r} is not a sha256 digest (64 hex digits); a snapshot is "
                             "only read against its full digest")
    with fsspec.open(uri, "rb") as fh:
        data = fh.read()
    actual = bytes_digest(data)
    if actual != digest:
        raise IntegrityError(f"snapshot {uri} failed its integrity check: its bytes hash to sha256 {actual}, not "
                             f"{digest}; it was modified after it was written. Nothing was read from it")
    return data


def read_snapshot(uri: str, digest: str):
    """Read a snapshot back, verified byte for byte (:func:`read_bytes`), parsed from those same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_bytes(uri, digest))).to_pandas()


def intact(uri: str, digest: str) -> bool:
    """True when the snapshot is there and its bytes match ``digest`` (a cache hit may reuse it)."""
    try:
        read_bytes(uri, digest)
    except (FileNotFoundError, IntegrityError):
        return False
    return True

"""Where jobs' bytes live: the key layout, and `open_storage`, which turns an operator's storage
URL into a backend. The Storage protocol every backend implements, its errors and ObjectInfo live
in `base.py` and are re-exported here (`from relaymd.storage import StorageError` and so on).

Objects are immutable by default (`overwrite=False`), so a late upload from a dead worker can
never clobber newer progress; downloads can verify a sha256 recorded when the object was written.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from relaymd.storage.base import (
    IntegrityError,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    validate_key,
    validate_prefix,
)
from relaymd.storage.local import LocalStorage
from relaymd.storage.s3 import S3Options, S3Storage

__all__ = [
    "IntegrityError",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "Storage",
    "StorageError",
    "bundle_key",
    "checkpoint_key",
    "job_prefix",
    "log_key",
    "manifest_key",
    "open_storage",
    "output_index_key",
    "output_part_key",
    "outputs_prefix",
    "validate_key",
    "validate_prefix",
]

ACCEPTED_SCHEMES = "file:///ABSOLUTE/PATH, a plain absolute path, or s3://BUCKET/PREFIX"


def _job_segment(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id or "/" in job_id:
        raise ValueError(f"invalid job id {job_id!r} for a storage key")
    return job_id


def _non_negative(what: str, n: int) -> int:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"invalid {what} {n!r} for a storage key: expected an integer >= 0")
    return n


def job_prefix(job_id: str) -> str:
    return validate_prefix(f"jobs/{_job_segment(job_id)}/")


def bundle_key(job_id: str) -> str:
    return validate_key(f"{job_prefix(job_id)}input/bundle.tar.gz")


def checkpoint_key(job_id: str, seq: int) -> str:
    seq = _non_negative("checkpoint sequence", seq)
    return validate_key(f"{job_prefix(job_id)}checkpoints/{seq:06d}.tar.gz")


def manifest_key(job_id: str, seq: int) -> str:
    seq = _non_negative("checkpoint sequence", seq)
    return validate_key(f"{job_prefix(job_id)}checkpoints/{seq:06d}.json")


def log_key(job_id: str, attempt: int) -> str:
    attempt = _non_negative("attempt", attempt)
    return validate_key(f"{job_prefix(job_id)}logs/attempt-{attempt}.log.gz")


def outputs_prefix(job_id: str) -> str:
    return validate_prefix(f"{job_prefix(job_id)}outputs/")


def output_index_key(job_id: str, attempt: int) -> str:
    """One attempt's index of its output parts (offsets, sizes, sha256) and resume point."""
    attempt = _non_negative("attempt", attempt)
    return validate_key(f"{outputs_prefix(job_id)}attempt-{attempt}.json")


def output_part_key(job_id: str, attempt: int, path: str, part: int) -> str:
    """Part `part` of output file `path` (relative to the job dir) of one attempt."""
    attempt = _non_negative("attempt", attempt)
    part = _non_negative("output part", part)
    if not path or path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"invalid output path {path!r} for a storage key")
    return validate_key(f"{outputs_prefix(job_id)}attempt-{attempt}/{path}/part-{part:06d}")


def open_storage(url: str, s3: S3Options | None = None) -> Storage:
    """Turn an operator's storage setting into a backend.

    Accepts `file:///abs/path` (or `file://localhost/abs/path`), a plain absolute path (`~` is
    expanded), and `s3://BUCKET/PREFIX` (reached as `s3` says: endpoint, credentials, read base
    URL, part size; `Settings.open_storage()` fills it from the config).
    """
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise StorageError(f"storage URL {url!r} is empty; use {ACCEPTED_SCHEMES}")
    if text.startswith("~"):
        text = os.path.expanduser(text)
    if text.startswith("/"):
        return LocalStorage(Path(text))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise StorageError(
                f"storage URL {url!r} does not name an absolute local path; "
                "write it as file:///ABSOLUTE/PATH (three slashes)"
            )
        return LocalStorage(Path(path))
    if scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment:
            raise StorageError(f"storage URL {url!r}: write it as s3://BUCKET or s3://BUCKET/PREFIX")
        try:
            return S3Storage(parts.netloc, unquote(parts.path), s3)
        except ValueError as exc:
            raise StorageError(f"storage URL {url!r}: {exc}") from None
    raise StorageError(f"storage URL {url!r} is not understood; use {ACCEPTED_SCHEMES}")

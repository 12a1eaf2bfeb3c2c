"""Find, judge and pack a job's checkpoint files.

A checkpoint set is the files matching the bundle's `checkpoint.paths` globs. It is worth
uploading only when it is newer than the last uploaded set, stable (sizes and mtimes unchanged
across two looks) and complete: every file of the previous set is still there (a file missing
during a scan is a write in progress, never a deletion) and, if a sentinel is configured, the
sentinel exists before and after the files are read, with the same mtime.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

Signature = dict[str, tuple[int, int]]  # relative path -> (size, mtime_ns)


class IncompleteCheckpoint(Exception):
    """The set changed or lost a file while it was read; try again at the next look."""


@dataclass(frozen=True)
class PackedCheckpoint:
    path: Path
    sha256: str
    size: int
    files: dict[str, int]  # relative path -> size
    newest_mtime_ns: int


def scan(job_dir: Path, patterns: list[str]) -> Signature:
    """Checkpoint files now present. Files that vanish mid-scan are simply not listed."""
    found: Signature = {}
    root = job_dir.resolve()
    for pattern in patterns:
        for path in job_dir.glob(pattern):
            try:
                st = path.stat()
                inside = path.resolve().is_relative_to(root)
            except OSError:
                continue  # vanished between glob and stat: a write in progress
            if inside and path.is_file():
                found[path.relative_to(job_dir).as_posix()] = (st.st_size, st.st_mtime_ns)
    return found


def stat_files(job_dir: Path, names: Signature) -> Signature:
    out: Signature = {}
    for rel in names:
        try:
            st = (job_dir / rel).stat()
        except OSError:
            continue
        out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def newest(sig: Signature) -> int:
    return max((m for _, m in sig.values()), default=0)


def sentinel_mtime(job_dir: Path, sentinel: str | None) -> int | None:
    if sentinel is None:
        return 0
    try:
        return (job_dir / sentinel).stat().st_mtime_ns
    except OSError:
        return None


class Watcher:
    """Decides when the job dir holds a new, stable, complete checkpoint set."""

    def __init__(self, job_dir: Path, patterns: list[str], sentinel: str | None) -> None:
        self.job_dir = job_dir
        self.patterns = patterns
        self.sentinel = sentinel
        self.uploaded: Signature = {}  # the last set uploaded (or restored at start)
        self._last_look: Signature | None = None

    def mark_restored(self) -> None:
        """The files restored from the resume checkpoint are not new progress."""
        self.uploaded = scan(self.job_dir, self.patterns)

    def baseline(self) -> int:
        """Newest checkpoint mtime now: a hand-off waits for something strictly newer."""
        return newest(scan(self.job_dir, self.patterns))

    def candidate(self, newer_than: int | None = None) -> Signature | None:
        """A set worth packing now, or None. Needs two equal looks in a row (call per poll)."""
        sig = scan(self.job_dir, self.patterns)
        previous, self._last_look = self._last_look, sig
        if not sig or sig == self.uploaded:
            return None
        if newest(sig) <= max(newest(self.uploaded), newer_than or 0):
            return None
        if set(self.uploaded) - set(sig):
            return None  # a file of the last set is missing: mid-write, not deleted
        if sentinel_mtime(self.job_dir, self.sentinel) is None:
            return None
        return sig if sig == previous else None

    def pack(self, sig: Signature, dest: Path) -> PackedCheckpoint:
        """Tar the set into dest; IncompleteCheckpoint if anything moved while reading."""
        before = sentinel_mtime(self.job_dir, self.sentinel)
        if before is None:
            raise IncompleteCheckpoint("sentinel missing")
        digest = hashlib.sha256()
        with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
                    tarfile.open(fileobj=gz, mode="w") as tar:
            for rel in sorted(sig):
                path = self.job_dir / rel
                try:
                    info = tar.gettarinfo(str(path), arcname=rel)
                    if (info.size, os.stat(path).st_mtime_ns) != sig[rel]:
                        raise IncompleteCheckpoint(f"{rel} changed while packing")
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
                except FileNotFoundError:
                    raise IncompleteCheckpoint(f"{rel} vanished while packing") from None
        after = stat_files(self.job_dir, sig)
        if after != sig or sentinel_mtime(self.job_dir, self.sentinel) != before:
            raise IncompleteCheckpoint("checkpoint files changed while packing")
        with open(dest, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        return PackedCheckpoint(dest, digest.hexdigest(), dest.stat().st_size,
                                {rel: size for rel, (size, _) in sig.items()}, newest(sig))

    def mark_uploaded(self, sig: Signature) -> None:
        self.uploaded = sig

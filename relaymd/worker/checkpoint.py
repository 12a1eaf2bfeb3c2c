"""Find, judge and pack a job's checkpoint files.

A checkpoint set is the files matching the bundle's `checkpoint.paths` globs. It is worth
uploading only when it is newer than the last uploaded set, stable (sizes and mtimes unchanged
across two looks) and complete: every file of the previous set is still there (a file missing
during a scan is a write in progress, never a deletion) and, if a sentinel is configured, the
sentinel exists before and after the files are read, with the same mtime.

The two looks are a moment apart (the bundle's `settle_seconds`), not a poll apart: an engine
that checkpoints more often than the worker polls must still get its sets uploaded. Packing works
on a snapshot: the set's files are hard-linked (copied where links are impossible) into a private
directory, which takes microseconds; the originals are checked to be unchanged after that, and
the slow part (tar + gzip + sha256) reads only the snapshot. An engine that replaces its files by
rename, as it should, can write its next checkpoint meanwhile without spoiling this one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        # The sentinel travels with the set: an engine that finds its state restored without it
        # takes the state for half-written (AToM-OpenMM: "Bad checkpoints", exit 1).
        self.patterns = patterns + [sentinel] if sentinel and sentinel not in patterns \
            else patterns
        self.sentinel = sentinel
        self.uploaded: Signature = {}  # the last set uploaded (or restored at start)
        self._last_look: Signature | None = None
        self.awaiting_second_look = False  # the last look found a new set not yet confirmed

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
        self.awaiting_second_look = False
        if not sig or sig == self.uploaded:
            return None
        if newest(sig) <= max(newest(self.uploaded), newer_than or 0):
            return None
        if set(self.uploaded) - set(sig):
            return None  # a file of the last set is missing: mid-write, not deleted
        if sentinel_mtime(self.job_dir, self.sentinel) is None:
            return None
        if sig != previous:
            self.awaiting_second_look = True
            return None
        return sig

    def pack(self, sig: Signature, dest: Path) -> PackedCheckpoint:
        """Snapshot the set beside dest, then tar it into dest; IncompleteCheckpoint if the set
        moved before the snapshot was whole."""
        snap = dest.with_name(dest.name + ".snapshot")
        try:
            self.snapshot(sig, snap)
            return pack_snapshot(snap, sig, dest)
        finally:
            shutil.rmtree(snap, ignore_errors=True)

    def snapshot(self, sig: Signature, into: Path) -> None:
        """Hard-link (or copy) every file of the set into `into`, then check that the originals
        and the sentinel did not move meanwhile: the snapshot then is exactly `sig`."""
        before = sentinel_mtime(self.job_dir, self.sentinel)
        if before is None:
            raise IncompleteCheckpoint("sentinel missing")
        for rel in sorted(sig):
            src, dst = self.job_dir / rel, into / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                link_or_copy(src, dst)
            except FileNotFoundError:
                raise IncompleteCheckpoint(f"{rel} vanished while packing") from None
        after = stat_files(self.job_dir, sig)
        moved = sorted(rel for rel in sig if after.get(rel) != sig[rel])
        if moved:
            raise IncompleteCheckpoint(f"{', '.join(moved)} changed while packing")
        if sentinel_mtime(self.job_dir, self.sentinel) != before:
            raise IncompleteCheckpoint("the sentinel changed while packing")

    def mark_uploaded(self, sig: Signature) -> None:
        self.uploaded = sig


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def pack_snapshot(snap: Path, sig: Signature, dest: Path) -> PackedCheckpoint:
    """tar.gz the snapshot (fast gzip: checkpoints are mostly incompressible floats, and the
    engine shares the CPU) with the sha256 taken while writing."""
    with open(dest, "wb") as raw:
        hashing = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=hashing, mode="wb", mtime=0, compresslevel=1) as gz, \
                tarfile.open(fileobj=gz, mode="w") as tar:
            for rel in sorted(sig):
                path = snap / rel
                info = tar.gettarinfo(str(path), arcname=rel)
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
    # A writer that rewrites files in place (not by rename) would change the linked inodes.
    moved = sorted(rel for rel, st in stat_files(snap, sig).items() if st != sig[rel])
    if moved:
        raise IncompleteCheckpoint(f"{', '.join(moved)} rewritten in place while packing")
    return PackedCheckpoint(dest, hashing.digest.hexdigest(), hashing.size,
                            {rel: size for rel, (size, _) in sig.items()}, newest(sig))


class _HashingWriter:
    """A file-like sink that hashes and counts what passes through to the real file."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

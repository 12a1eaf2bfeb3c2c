"""Restoring a checkpoint archive into a job directory: only regular files that the job's own
checkpoint globs name, judged in full in a staging directory before any reaches the job dir;
and reading a checkpoint's manifest. The archive is read by `archive.scan`, as hostile.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tarfile
from pathlib import Path

from relaymd.storage.archive import CHUNK, BundleError, BundleInfo, BundleLimits, clean_name, scan


def glob_matches(name: str, pattern: str) -> bool:
    """Whether relative path `name` is one that `Path(job_dir).glob(pattern)` finds: `*`, `?`
    and `[...]` within one path segment, `**` for any number of segments. (PurePath.match is
    anchored at the right only, so `*.chk` would let `anything/x.chk` through.)"""
    parts = [p for p in name.split("/") if p]
    pats = [p for p in pattern.split("/") if p not in ("", ".")]

    def match(i: int, j: int) -> bool:
        if j == len(pats):
            return i == len(parts)
        if pats[j] == "**":
            return any(match(k, j + 1) for k in range(i, len(parts) + 1))
        return i < len(parts) and fnmatch.fnmatchcase(parts[i], pats[j]) and match(i + 1, j + 1)

    return match(0, 0)


def checkpoint_refusal(name: str, patterns: list[str], sentinel: str | None) -> str | None:
    """Why `name` cannot be part of a checkpoint of a job with these `checkpoint.paths`, or None.
    A checkpoint restores state, never code: only files the job's own globs (or its sentinel)
    name, and never the job's relaymd.yaml (nor a name that climbs out of the job dir)."""
    try:
        clean = clean_name(name)
    except BundleError as exc:
        return str(exc)
    if clean == "relaymd.yaml":
        return f"checkpoint holds {clean}, which only a bundle may carry"
    if clean == sentinel or any(glob_matches(clean, p) for p in patterns):
        return None
    return (f"checkpoint holds {clean}, which matches none of the job's checkpoint.paths "
            f"({', '.join(patterns)})")


def manifest_files(raw: bytes) -> dict[str, int]:
    """A checkpoint manifest's `files` (relative path -> size), as the worker that packed the
    checkpoint wrote them. ValueError when the manifest is not that shape."""
    try:
        files = json.loads(raw)["files"]
        return {str(name): int(size) for name, size in files.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a JSON object with a `files` map of sizes ({exc})") from None


def extract_checkpoint(path: Path, job_dir: Path, staging: Path, patterns: list[str],
                       sentinel: str | None, max_bytes: int) -> BundleInfo:
    """Restore a checkpoint archive into `job_dir`, refusing anything but regular files that
    the job's checkpoint globs name, and more than `max_bytes` unpacked.

    A checkpoint comes from whichever worker held the job, maybe a stranger's machine, and the
    next worker runs the job's command in `job_dir`: a planted `run.py` would be code. So every
    member is judged and written (mode 0600, no exec bit) into the empty `staging` directory;
    only when the whole archive has passed are the files moved into `job_dir`. A refused
    archive leaves `job_dir` as it was (BundleError)."""
    staging, job_dir = Path(staging), Path(job_dir)
    staging.mkdir(mode=0o700)
    root = os.path.realpath(job_dir)
    names: list[str] = []

    def visit(tar: tarfile.TarFile, member: tarfile.TarInfo, clean: str) -> bool:
        if not member.isreg():
            kind = ("a directory" if member.isdir() else "a link" if member.issym()
                    or member.islnk() else "a special file")
            raise BundleError(f"checkpoint member {clean or member.name!r} is {kind}; a "
                              "checkpoint holds only regular files")
        why = checkpoint_refusal(clean, patterns, sentinel)
        if why is not None:
            raise BundleError(why)
        target = staging / clean
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        src = tar.extractfile(member)
        assert src is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
        os.utime(target, (member.mtime, member.mtime))
        names.append(clean)
        return False

    try:
        info = scan(Path(path), BundleLimits(max_total_bytes=max(0, max_bytes)), visit)
        assert info is not None
        # Every target must be a file place inside the job dir: not a directory, and not under
        # a link or a file that the bundle put there.
        for clean in names:
            dest = os.path.join(root, clean)
            parent = os.path.realpath(os.path.dirname(dest))
            if not (parent == root or parent.startswith(root + os.sep)):
                raise BundleError(f"checkpoint member {clean} would land outside the job "
                                  "directory (through a link in the job's files)")
            if os.path.isdir(dest) and not os.path.islink(dest):
                raise BundleError(f"checkpoint member {clean} would replace a directory")
            if os.path.lexists(os.path.dirname(dest)) and not os.path.isdir(
                    os.path.dirname(dest)):
                raise BundleError(f"checkpoint member {clean} lies under a file")
    except OSError as exc:
        raise BundleError(f"cannot unpack checkpoint {path}: {exc.strerror or exc}") from exc
    for clean in names:
        dest = os.path.join(root, clean)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(staging / clean, dest)
    return info

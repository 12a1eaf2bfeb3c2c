"""Job bundles: packing an input directory into `bundle.tar.gz`, and reading one back safely.

A bundle comes from whoever submitted the job, so reading treats it as hostile: one streaming
pass judges every member (paths, links, file types, counts, sizes, expansion ratio) as the bytes
flow, extraction re-checks everything itself, and tarfile's 'data' filter stands behind that.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import stat
import tarfile
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
RATIO_FLOOR = 64 << 20  # small inputs compress a lot legitimately: judge the ratio past this
HEADER_ALLOWANCE = 1 << 20  # tar headers (pax ones included) between two members' data
MAX_LINK_HOPS = 40
_SPECIAL = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
            tarfile.FIFOTYPE: "a fifo"}  # fmt: skip


class BundleError(ValueError):
    """A bundle cannot be packed or is refused; the message is one operator-facing line."""


@dataclass(frozen=True)
class BundleLimits:
    max_members: int = 100_000
    max_total_bytes: int = 64 * 2**30  # total uncompressed size
    max_ratio: float = 200.0  # uncompressed / compressed, judged once past RATIO_FLOOR


@dataclass(frozen=True)
class BundleInfo:
    sha256: str  # of the compressed file
    size: int
    members: int
    uncompressed_bytes: int  # sum of regular files' sizes


class _Tap:
    """Hashes and counts the compressed bytes on their way into or out of the bundle file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.digest, self.count = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.digest.update(data)
        self.count += len(data)
        return data

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.count += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _clean_name(name: str) -> str:
    """Normalise a member name ('./a//b' -> 'a/b'); refuse absolute paths, '..' and NUL."""
    if name.startswith("/"):
        raise BundleError(f"bundle has an absolute path {name}; refusing it")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or "\x00" in name:
        raise BundleError(f"bundle member {name} climbs out of the job directory; refusing it")
    return "/".join(parts)


def _ancestors(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


# -- packing ----------------------------------------------------------------------------------


def _collect(root: Path, src: Path) -> dict[str, Path | None]:
    """Everything under `root` as arcname -> file to read (None for a directory)."""
    entries: dict[str, Path | None] = {}

    def walk(directory: Path, prefix: str, ancestors: frozenset[Path]) -> None:
        for entry in os.scandir(directory):
            name, path = prefix + entry.name, Path(entry.path)
            if entry.is_symlink():
                path = Path(os.path.realpath(path))
                if not path.is_relative_to(root):
                    raise BundleError(
                        f"{src / name} is a symlink to {path}, outside {src}; copy the file in "
                        "or remove the link"
                    )
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                raise BundleError(f"{src / name} is a broken symlink; fix or remove it") from None
            if stat.S_ISDIR(mode):
                if path in ancestors:
                    raise BundleError(f"{src / name} is a symlink loop; remove it")
                entries[name] = None
                walk(path, name + "/", ancestors | {path})
            elif stat.S_ISREG(mode):
                entries[name] = path
            else:
                raise BundleError(f"{src / name} is not a regular file or directory; remove it")

    walk(root, "", frozenset({root}))
    return entries


def pack_directory(
    src: Path, dest: Path, *, extra_files: dict[str, bytes] | None = None
) -> BundleInfo:
    """Write src's contents (names relative to src, sorted) to the tar.gz `dest`.

    Symlinks staying inside src are stored as what they point to; `extra_files` (name -> bytes)
    adds or replaces members, e.g. a generated relaymd.yaml.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise BundleError(f"{src} is not a directory; point at the job's input directory")
    root = Path(os.path.realpath(src))
    if Path(os.path.realpath(dest.parent)).is_relative_to(root):
        raise BundleError(f"bundle destination {dest} lies inside {src}; write it elsewhere")
    try:
        entries: dict[str, Path | bytes | None] = dict(_collect(root, src))
    except OSError as exc:
        raise BundleError(f"cannot read {src}: {exc}") from exc
    for name, data in (extra_files or {}).items():
        clean = _clean_name(name)
        if not clean or (clean in entries and entries[clean] is None):
            raise BundleError(f"extra bundle file {name!r} would replace a directory")
        entries[clean] = data

    tmp = dest.with_name(dest.name + ".part")
    members = total = 0
    try:
        with open(tmp, "wb") as out:
            sink = _Tap(out)  # type: ignore[arg-type]
            with (
                gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for name in sorted(entries):
                    source = entries[name]
                    info = tarfile.TarInfo(name)
                    if source is None:
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        info.mtime = int((root / name).stat().st_mtime)
                        tar.addfile(info)
                    elif isinstance(source, bytes):
                        info.size, info.mode, info.mtime = len(source), 0o644, int(time.time())
                        tar.addfile(info, io.BytesIO(source))
                    else:
                        with open(source, "rb") as f:
                            st = os.fstat(f.fileno())
                            info.size, info.mtime = st.st_size, int(st.st_mtime)
                            info.mode = stat.S_IMODE(st.st_mode) & 0o777
                            tar.addfile(info, f)
                    members += 1
                    total += info.size
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        raise BundleError(f"cannot pack {src} into {dest}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return BundleInfo(sink.digest.hexdigest(), sink.count, members, total)


# -- reading ----------------------------------------------------------------------------------


class _Meter:
    """The uncompressed side: enforces the limits as bytes flow, before tarfile parses them."""

    def __init__(self, raw: _Tap, limits: BundleLimits) -> None:
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
        self._raw, self._limits = raw, limits
        self.out, self.allowed, self.member = 0, HEADER_ALLOWANCE, "(first header)"
        self.data_end = 0  # where the current member's data should end
        self.recent = bytearray()  # the last TAIL_WINDOW bytes read, to judge the archive's end
        self.zeros_only = False  # past the end-of-archive block: anything but zeros is refused

    def read(self, n: int = -1) -> bytes:
        data = self._gz.read(CHUNK if n < 0 or n > CHUNK else n)
        if self.zeros_only and data.count(0) != len(data):
            raise BundleError(_HIDDEN_MEMBERS)
        self.recent += data
        del self.recent[:-TAIL_WINDOW]
        if not data and n and self.out < self.data_end:
            # The archive ends inside a member's data: say so now. (tarfile's stream mode would
            # otherwise "skip" the missing bytes one empty read at a time: seconds per GiB
            # declared, for a bundle of a few hundred bytes.)
            raise BundleError(f"bundle is truncated inside member {self.member} (it declares "
                              f"{self.data_end - self.out} more bytes than it holds); refusing it")
        self.out += len(data)
        if self.out > self.allowed:
            raise BundleError(
                f"bundle has oversized headers or trailing data near member {self.member}; "
                "refusing it"
            )
        ratio = self.out / max(self._raw.count, 1)
        if self.out > RATIO_FLOOR and ratio > self._limits.max_ratio:
            raise BundleError(
                f"bundle member {self.member} expands {ratio:.0f}x (limit "
                f"{self._limits.max_ratio:.0f}x), a decompression bomb; refusing it"
            )
        return data


TAIL_WINDOW = 256 << 10  # more than tarfile reads ahead of the header it stops at (a record)
_HIDDEN_MEMBERS = ("bundle has non-zero data after its end-of-archive block (an invalid header "
                   "that Python's tar reader takes for the end, where GNU tar skips ahead to "
                   "more members); refusing it")


def _check_archive_end(meter: _Meter, end: int) -> None:
    """Python's tar reader stops, silently, at the first header it cannot parse after the first
    member, as it does at the end-of-archive block; GNU tar and others skip such a header and
    read on, so they would see members this reader never checked. A real archive ends with
    zero blocks only: whatever follows the block the reader stopped at must be zeros."""
    start = meter.out - len(meter.recent)
    if end < start:
        raise BundleError("bundle's end of archive lies out of reach; refusing it")
    if meter.recent[end - start:].count(0) != meter.out - end:
        raise BundleError(_HIDDEN_MEMBERS)
    meter.zeros_only = True


def _stays_inside(path: str, links: dict[str, str]) -> bool:
    """Follow `path` through the bundle's own symlinks; False if it leaves the root or loops."""
    todo, resolved, hops = deque(path.split("/")), [], 0
    while todo:
        part = todo.popleft()
        if part == "..":
            if not resolved:
                return False
            resolved.pop()
        elif part not in ("", "."):
            resolved.append(part)
            target = links.get("/".join(resolved))
            if target is not None:
                hops += 1
                if hops > MAX_LINK_HOPS or target.startswith("/"):
                    return False
                resolved.pop()
                todo.extendleft(reversed(target.split("/")))
    return True


class _Checker:
    """Judges members one by one in stream order, as extraction meets them."""

    def __init__(self, limits: BundleLimits) -> None:
        self.limits, self.members, self.total = limits, 0, 0
        self.kinds: dict[str, str] = {}  # clean name -> "file" | "dir" | "link"
        self.parents: set[str] = set()
        self.links: dict[str, str] = {}

    def check(self, m: tarfile.TarInfo) -> str:
        self.members += 1
        if self.members > self.limits.max_members:
            raise BundleError(
                f"bundle has more than {self.limits.max_members} members (at {m.name}); refusing it"
            )
        name = _clean_name(m.name)
        if not name and m.isdir():
            return name  # "./": the root itself
        if not name or name in self.kinds:
            raise BundleError(f"bundle member {m.name!r} is unnamed or repeated; refusing it")
        for parent in _ancestors(name):
            if self.kinds.get(parent, "dir") != "dir":
                raise BundleError(
                    f"bundle member {name} lies under {parent}, which is not a directory; "
                    "refusing it"
                )
        if m.isdir():
            kind = "dir"
        elif name in self.parents:
            raise BundleError(f"bundle member {name} replaces a directory; refusing it")
        elif m.issym():
            kind, target = "link", m.linkname
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if not target or posixpath.isabs(joined) or joined.split("/")[0] == "..":
                raise BundleError(
                    f"bundle member {name} is a symlink to {target}, outside the job directory; "
                    "refusing it"
                )
            self.links[name] = target
        elif m.islnk():
            kind = "file"
            if self.kinds.get(m.linkname.removeprefix("./")) != "file":
                raise BundleError(
                    f"bundle member {name} is a hard link to {m.linkname}, which is not an "
                    "earlier file in the bundle; refusing it"
                )
        elif m.isreg():
            kind = "file"
            self.total += m.size
            if self.total > self.limits.max_total_bytes:
                raise BundleError(
                    f"bundle member {name} takes the unpacked size past "
                    f"{self.limits.max_total_bytes} bytes; refusing it"
                )
        else:
            what = _SPECIAL.get(m.type, f"a special file (type {m.type!r})")
            raise BundleError(f"bundle member {name} is {what}; only files, dirs and links allowed")
        self.kinds[name] = kind
        self.parents.update(_ancestors(name))
        return name

    def finish(self) -> None:
        for name, target in sorted(self.links.items()):
            if not _stays_inside(posixpath.join(posixpath.dirname(name), target), self.links):
                raise BundleError(
                    f"bundle member {name} is a symlink to {target}, which leads outside the job "
                    "directory (or loops) through other links; refusing it"
                )


# visit(tar, member, clean name) may act on a checked member; True stops the scan early.
Visitor = Callable[[tarfile.TarFile, tarfile.TarInfo, str], bool]


def _scan(path: Path, limits: BundleLimits, visit: Visitor | None = None) -> BundleInfo | None:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the open error needs its own text
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror or exc}") from exc
    with f:
        raw = _Tap(f)  # type: ignore[arg-type]
        meter, checker, opened = _Meter(raw, limits), _Checker(limits), False
        try:
            with tarfile.open(fileobj=meter, mode="r|") as tar:  # type: ignore[call-overload]
                opened, tar.errorlevel = True, 2
                for member in tar:
                    meter.member = member.name
                    name = checker.check(member)
                    padded = -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    meter.allowed = member.offset_data + padded + HEADER_ALLOWANCE
                    meter.data_end = member.offset_data + member.size
                    if visit is not None and visit(tar, member, name):
                        return None
                checker.finish()
                _check_archive_end(meter, tar.offset)
            meter.member, meter.allowed = "(end of archive)", meter.out + HEADER_ALLOWANCE
            while meter.read(CHUNK):  # on to gzip's end, which checks its CRC and length
                pass
            while raw.read(CHUNK):
                pass
        except BundleError:
            raise
        except EOFError as exc:
            raise BundleError(f"bundle {path} is truncated ({exc}); upload it again") from exc
        except (gzip.BadGzipFile, zlib.error, tarfile.TarError) as exc:
            if not opened:
                raise BundleError(
                    f"bundle {path} is not a gzip-compressed tar file ({exc})"
                ) from exc
            raise BundleError(
                f"bundle {path} is corrupt near member {meter.member} ({exc})"
            ) from exc
        except OSError as exc:
            raise BundleError(f"cannot unpack {path} at member {meter.member}: {exc}") from exc
    return BundleInfo(raw.digest.hexdigest(), raw.count, checker.members, checker.total)


def inspect_bundle(path: Path, limits: BundleLimits = BundleLimits()) -> BundleInfo:  # noqa: B008
    """Read the whole bundle once without extracting; BundleError if anything is hostile."""
    info = _scan(Path(path), limits)
    assert info is not None
    return info


def read_member(path: Path, name: str, *, max_bytes: int = 1 << 20) -> bytes | None:
    """The contents of regular-file member `name` (e.g. "relaymd.yaml"), or None if absent."""
    wanted, found = _clean_name(name), []

    def visit(tar: tarfile.TarFile, member: tarfile.TarInfo, clean: str) -> bool:
        if clean != wanted or not member.isreg():
            return False
        if member.size > max_bytes:
            raise BundleError(f"bundle member {clean} is over {max_bytes} bytes; refusing it")
        found.append(tar.extractfile(member).read())  # type: ignore[union-attr]
        return True

    _scan(Path(path), BundleLimits(), visit)
    return found[0] if found else None


def extract_bundle(
    path: Path,
    dest: Path,
    limits: BundleLimits = BundleLimits(),  # noqa: B008
) -> BundleInfo:
    """Check and extract the bundle into `dest` (created); nothing is written outside it.

    On error, whatever this call created is removed (all of `dest` if it did not exist).
    """
    dest = Path(dest)
    existed = os.path.lexists(dest)
    if existed and not dest.is_dir():
        raise BundleError(f"cannot extract into {dest}: it exists and is not a directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {dest}: {exc.strerror or exc}") from exc
    root = os.path.realpath(dest)
    created: list[str] = []

    def visit(tar: tarfile.TarFile, member: tarfile.TarInfo, clean: str) -> bool:
        if clean:
            for target in [*_ancestors(clean), clean]:
                if not os.path.lexists(os.path.join(root, target)):
                    created.append(os.path.join(root, target))
            tar.extract(member, path=root, set_attrs=True, filter="data")
        return False

    try:
        info = _scan(Path(path), limits, visit)
    except BaseException:
        if not existed:
            shutil.rmtree(dest, ignore_errors=True)
        for target in reversed(created if existed else []):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                os.unlink(target)
        raise
    assert info is not None
    return info


# -- checkpoints ------------------------------------------------------------------------------


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
        clean = _clean_name(name)
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
        info = _scan(Path(path), BundleLimits(max_total_bytes=max(0, max_bytes)), visit)
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

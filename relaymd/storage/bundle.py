"""Job bundles: packing an input directory into `bundle.tar.gz`, and reading one back safely.

A bundle arrives from whoever submitted the job, so reading it treats it as hostile: one streaming
pass checks every member (paths, links, file types, counts, sizes, expansion ratio) as the bytes
flow, and extraction re-checks everything itself, with tarfile's 'data' filter behind it.
"""

from __future__ import annotations

import gzip
import hashlib
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
RATIO_FLOOR = 64 << 20  # below this much unpacked data the ratio is not judged
HEADER_ALLOWANCE = 1 << 20  # tar headers (pax included) read between two members' data
MAX_LINK_HOPS = 40


class BundleError(ValueError):
    """A bundle cannot be packed or is refused; the message is one operator-facing line."""


@dataclass(frozen=True)
class BundleLimits:
    max_members: int = 100_000
    max_total_bytes: int = 64 * 2**30
    max_ratio: float = 200.0


@dataclass(frozen=True)
class BundleInfo:
    sha256: str
    size: int
    members: int
    uncompressed_bytes: int


# -- packing ----------------------------------------------------------------------------------


class _HashingWriter:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


def _clean_name(name: str) -> str:
    """Normalise a member name; refuse absolute paths, '..' and NUL."""
    if "\x00" in name:
        raise BundleError(f"bundle member {name!r} has a NUL byte in its name; refusing it")
    if name.startswith("/"):
        raise BundleError(f"bundle has an absolute path {name}; refusing it")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(
            f"bundle member {name} climbs out of the job directory ('..'); refusing it"
        )
    return "/".join(parts)


def _collect(root: Path, src: Path) -> dict[str, Path | None]:
    """Every entry under `root` as arcname -> file to read (None for a directory)."""
    entries: dict[str, Path | None] = {}

    def walk(directory: Path, prefix: str, ancestors: frozenset[Path]) -> None:
        for entry in os.scandir(directory):
            name = prefix + entry.name
            path = Path(entry.path)
            if entry.is_symlink():
                target = Path(os.path.realpath(path))
                if not target.is_relative_to(root):
                    raise BundleError(
                        f"{src / name} is a symlink to {target}, outside {src}; copy the file "
                        "into the job directory or remove the link"
                    )
                path = target
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
                raise BundleError(
                    f"{src / name} is not a regular file or directory; remove it from the job "
                    "directory"
                )

    walk(root, "", frozenset({root}))
    return entries


def pack_directory(
    src: Path, dest: Path, *, extra_files: dict[str, bytes] | None = None
) -> BundleInfo:
    """Write src's contents (names relative to src, sorted) to the tar.gz `dest`.

    Symlinks that stay inside src are stored as what they point to; `extra_files` adds or
    replaces members (a generated relaymd.yaml).
    """
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise BundleError(f"{src} is not a directory; point at the job's input directory")
    root = Path(os.path.realpath(src))
    if Path(os.path.realpath(dest.parent)).is_relative_to(root):
        raise BundleError(f"bundle destination {dest} lies inside {src}; write it elsewhere")
    extras = {}
    for name, data in (extra_files or {}).items():
        clean = _clean_name(name)
        if not clean:
            raise BundleError(f"extra bundle file name {name!r} is empty")
        extras[clean] = data
    try:
        entries: dict[str, Path | bytes | None] = dict(_collect(root, src))
    except OSError as exc:
        raise BundleError(f"cannot read {src}: {exc}") from exc
    for name, data in extras.items():
        if name in entries and entries[name] is None:
            raise BundleError(f"{src / name} is a directory; cannot replace it with a file")
        entries[name] = data

    tmp = dest.with_name(dest.name + ".part")
    now = int(time.time())
    members = total = 0
    try:
        with open(tmp, "wb") as out:
            sink = _HashingWriter(out)
            with (
                gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for name in sorted(entries):
                    source = entries[name]
                    info = tarfile.TarInfo(name)
                    info.mtime, info.mode = now, 0o644
                    if source is None:
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        info.mtime = int((root / name).stat().st_mtime)
                        tar.addfile(info)
                    elif isinstance(source, bytes):
                        info.size = len(source)
                        tar.addfile(info, _BytesReader(source))
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
    return BundleInfo(sink.digest.hexdigest(), sink.size, members, total)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._view, self._pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else self._pos + n
        chunk = bytes(self._view[self._pos : end])
        self._pos += len(chunk)
        return chunk


# -- reading ----------------------------------------------------------------------------------


class _HashingReader:
    """The compressed side: hashes and counts every byte read from the bundle file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.digest.update(data)
        self.count += len(data)
        return data


class _Meter:
    """The uncompressed side: enforces the limits while bytes flow, before tarfile sees them."""

    def __init__(self, gz: gzip.GzipFile, raw: _HashingReader, limits: BundleLimits) -> None:
        self._gz, self._raw, self._limits = gz, raw, limits
        self.out = 0
        self.allowed = HEADER_ALLOWANCE
        self.member = "(first header)"

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > CHUNK:
            n = CHUNK
        data = self._gz.read(n)
        self.out += len(data)
        if self.out > self.allowed:
            raise BundleError(
                f"bundle has oversized tar headers or trailing data near member {self.member}; "
                "refusing it"
            )
        ratio = self.out / max(self._raw.count, 1)
        if self.out > RATIO_FLOOR and ratio > self._limits.max_ratio:
            raise BundleError(
                f"bundle member {self.member} expands {ratio:.0f}x (limit "
                f"{self._limits.max_ratio:.0f}x): a decompression bomb; refusing it"
            )
        return data


def _stays_inside(path: str, links: dict[str, str]) -> bool:
    """Follow `path` through the bundle's own symlinks; False if it leaves the root or loops."""
    todo = deque(path.split("/"))
    resolved: list[str] = []
    hops = 0
    while todo:
        part = todo.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return False
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is not None:
            hops += 1
            if hops > MAX_LINK_HOPS or target.startswith("/"):
                return False
            resolved.pop()
            todo.extendleft(reversed(target.split("/")))
    return True


_KINDS = {
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
}


class _Checker:
    """Judges members one by one, in stream order, as extraction would meet them."""

    def __init__(self, limits: BundleLimits) -> None:
        self.limits = limits
        self.members = 0
        self.total = 0
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
        if not name:
            if m.isdir():
                return name  # "./": the root itself
            raise BundleError(f"bundle member {m.name!r} has no name; refusing it")
        if name in self.kinds:
            raise BundleError(f"bundle member {name} appears twice; refusing it")
        parent = name
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if self.kinds.get(parent, "dir") != "dir":
                raise BundleError(
                    f"bundle member {name} lies under {parent}, which is not a directory "
                    "(writing through a link or file); refusing it"
                )
        if m.isdir():
            kind = "dir"
        elif name in self.parents:
            raise BundleError(f"bundle member {name} replaces a directory; refusing it")
        elif m.issym():
            kind = "link"
            target = m.linkname
            if not target or target.startswith("/"):
                raise BundleError(f"bundle member {name} is a symlink to {target!r}; refusing it")
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if joined == ".." or joined.startswith("../") or "\x00" in target:
                raise BundleError(
                    f"bundle member {name} is a symlink to {target}, outside the job directory; "
                    "refusing it"
                )
            self.links[name] = target
        elif m.islnk():
            kind = "file"
            try:
                target = _clean_name(m.linkname)
            except BundleError:
                target = None
            if target is None or self.kinds.get(target) != "file" or target in self.links:
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
            what = _KINDS.get(m.type, f"a special file (type {m.type!r})")
            raise BundleError(
                f"bundle member {name} is {what}; only files, directories and links are allowed"
            )
        self.kinds[name] = kind
        parent = name
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            self.parents.add(parent)
        return name

    def finish(self) -> None:
        for name, target in sorted(self.links.items()):
            if not _stays_inside(posixpath.join(posixpath.dirname(name), target), self.links):
                raise BundleError(
                    f"bundle member {name} is a symlink to {target}, which leads outside the job "
                    "directory (or loops) through other links; refusing it"
                )


Visitor = Callable[[tarfile.TarFile, tarfile.TarInfo, str], bool]


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _scan(path: Path, limits: BundleLimits, visit: Visitor | None = None) -> BundleInfo | None:
    """One pass over the bundle; `visit` may act on each checked member and return True to stop
    early (then None is returned)."""
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, the open error needs its own text
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror or exc}") from exc
    with f:
        raw = _HashingReader(f)
        meter = _Meter(gzip.GzipFile(fileobj=raw, mode="rb"), raw, limits)  # type: ignore[arg-type]
        checker = _Checker(limits)
        opened = False
        try:
            with tarfile.open(fileobj=meter, mode="r|") as tar:  # type: ignore[call-overload]
                opened = True
                tar.errorlevel = 2
                for member in tar:
                    meter.member = member.name
                    name = checker.check(member)
                    meter.allowed = member.offset_data + _padded(member.size) + HEADER_ALLOWANCE
                    if visit is not None and visit(tar, member, name):
                        return None
                checker.finish()
            meter.member = "(end of archive)"
            meter.allowed = meter.out + HEADER_ALLOWANCE
            while meter.read(CHUNK):  # reaches gzip's end, which checks its CRC and length
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
            raise BundleError(
                f"cannot unpack bundle {path} at member {meter.member}: {exc}"
            ) from exc
    return BundleInfo(raw.digest.hexdigest(), raw.count, checker.members, checker.total)


def inspect_bundle(path: Path, limits: BundleLimits = BundleLimits()) -> BundleInfo:  # noqa: B008
    """Read the whole bundle once without extracting; BundleError if anything is hostile."""
    info = _scan(path, limits)
    assert info is not None
    return info


def read_member(path: Path, name: str, *, max_bytes: int = 1 << 20) -> bytes | None:
    """The contents of regular-file member `name` (e.g. "relaymd.yaml"), or None if absent."""
    wanted = _clean_name(name)
    found: list[bytes] = []

    def visit(tar: tarfile.TarFile, member: tarfile.TarInfo, clean: str) -> bool:
        if clean != wanted or not member.isreg():
            return False
        if member.size > max_bytes:
            raise BundleError(
                f"bundle member {clean} is {member.size} bytes, more than {max_bytes}; refusing it"
            )
        data = tar.extractfile(member)
        assert data is not None
        found.append(data.read())
        return True

    _scan(path, BundleLimits(), visit)
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
            target = os.path.join(root, clean)
            if not os.path.lexists(target):
                created.append(target)
            tar.extract(member, path=root, set_attrs=True, filter="data")
        return False

    try:
        info = _scan(path, limits, visit)
    except BaseException:
        if not existed:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            _remove_created(created)
        raise
    assert info is not None
    return info


def _remove_created(paths: list[str]) -> None:
    for target in reversed(paths):
        try:
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.unlink(target)
        except OSError:
            pass

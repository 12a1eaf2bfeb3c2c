"""Reading a tar.gz that someone else made (a job bundle, a checkpoint) as hostile: one streaming
pass judges every member (paths, links, file types, counts, sizes, expansion ratio) as the bytes
flow, and a visitor may act on each member once it has passed. Shared by `bundle.py` (job
bundles) and `checkpoints.py` (checkpoint restores); also the errors, limits and summary both use.
"""

from __future__ import annotations

import gzip
import hashlib
import posixpath
import tarfile
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


class Tap:
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


def clean_name(name: str) -> str:
    """Normalise a member name ('./a//b' -> 'a/b'); refuse absolute paths, '..' and NUL."""
    if name.startswith("/"):
        raise BundleError(f"bundle has an absolute path {name}; refusing it")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or "\x00" in name:
        raise BundleError(f"bundle member {name} climbs out of the job directory; refusing it")
    return "/".join(parts)


def ancestors(name: str) -> list[str]:
    """The directories above a member: "a/b/c" -> ["a", "a/b"]."""
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class _Meter:
    """The uncompressed side: enforces the limits as bytes flow, before tarfile parses them."""

    def __init__(self, raw: Tap, limits: BundleLimits) -> None:
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
        name = clean_name(m.name)
        if not name and m.isdir():
            return name  # "./": the root itself
        if not name or name in self.kinds:
            raise BundleError(f"bundle member {m.name!r} is unnamed or repeated; refusing it")
        for parent in ancestors(name):
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
        self.parents.update(ancestors(name))
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


def scan(path: Path, limits: BundleLimits, visit: Visitor | None = None) -> BundleInfo | None:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the open error needs its own text
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror or exc}") from exc
    with f:
        raw = Tap(f)  # type: ignore[arg-type]
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



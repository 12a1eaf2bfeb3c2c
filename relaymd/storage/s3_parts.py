"""Moving a large object in parts, without S3 itself: a file window an upload part streams from,
the sha256 of a file whose parts land in any order, how a size splits into parts, and the size
and sha256 an answer's headers (HTTP) or fields (S3) carry. Used by `s3.py`."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relaymd.storage.base import StorageError

MiB = 1 << 20
CHUNK = MiB  # streaming buffer: what one transfer thread holds at a time
MIN_PART = 5 * MiB  # S3 and B2: every part but the last is at least this
MAX_PARTS = 10_000


class FilePart(io.RawIOBase):
    """A seekable read-only window [offset, offset + length) of a file: an upload_part body that
    botocore can hash, send and rewind for a retry without it ever being read into memory."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__()
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._offset, self._length, self._pos = offset, length, 0

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        n = left if size is None or size < 0 else min(size, left)
        if n <= 0:
            return b""
        data = os.pread(self._fh.fileno(), n, self._offset + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._fh.close()
        super().close()


class OrderedHasher:
    """sha256 of a file being written in parts in any order: hashes each part as soon as it and
    every part before it have landed, reading back from the (page-cached) file."""

    def __init__(self, fd: int, parts: list[tuple[int, int]]) -> None:
        self.fd, self.parts = fd, parts
        self.digest = hashlib.sha256()
        self._done = [False] * len(parts)
        self._next = 0
        self._cond = threading.Condition()

    def landed(self, index: int) -> None:
        with self._cond:
            self._done[index] = True
            self._cond.notify_all()

    def follow(self, failed: Callable[[], bool]) -> None:
        """Run in the caller's thread while the parts download; returns once all are hashed."""
        while self._next < len(self.parts):
            with self._cond:
                while not self._done[self._next]:
                    if failed():
                        return
                    self._cond.wait(0.2)
            offset, length = self.parts[self._next]
            end = offset + length
            while offset < end:
                data = os.pread(self.fd, min(CHUNK, end - offset), offset)
                if not data:
                    raise StorageError("download file shrank while it was being verified")
                self.digest.update(data)
                offset += len(data)
            self._next += 1


def split_parts(size: int, part_size: int) -> list[tuple[int, int]]:
    part = max(part_size, -(-size // MAX_PARTS))  # never more than 10,000 parts
    return [(off, min(part, size - off)) for off in range(0, size, part)] or [(0, 0)]


def note_http_meta(headers: Any, meta: dict[str, Any]) -> None:
    total = headers.get("content-range", "").rpartition("/")[2]
    if total.isdigit():
        meta["size"] = int(total)
    elif headers.get("content-length", "").isdigit():
        meta["size"] = int(headers["content-length"])
    if headers.get("x-amz-meta-sha256"):
        meta["sha256"] = headers["x-amz-meta-sha256"]


def note_s3_meta(resp: dict[str, Any], meta: dict[str, Any]) -> None:
    total = str(resp.get("ContentRange", "")).rpartition("/")[2]
    if total.isdigit():
        meta["size"] = int(total)
    elif resp.get("ContentLength") is not None:
        meta["size"] = int(resp["ContentLength"])
    sha = (resp.get("Metadata") or {}).get("sha256")
    if sha:
        meta["sha256"] = sha

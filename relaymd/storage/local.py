"""The `file://` storage backend: objects are files under one root directory.

Right for the embedded orchestrator and for a cluster's shared filesystem. Every write lands in
a temp file beside its final name, is fsynced, then appears in one step (rename, or hard link
when an existing object must never be replaced), so readers never see a half-written object.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from relaymd.storage.base import (
    IntegrityError,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    validate_key,
    validate_prefix,
)

CHUNK = 1 << 20
TMP_PREFIX = ".relaymd-tmp-"
# Filesystems without hard links answer os.link with one of these.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


def _describe(exc: OSError) -> str:
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc)


def _copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


class LocalStorage:
    """Storage over a directory; created on demand with mode 0700."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(os.path.abspath(root))
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    # -- paths and errors -------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        validate_key(key)
        if any(part.startswith(TMP_PREFIX) for part in key.split("/")):
            raise ValueError(f"invalid storage key {key!r}: {TMP_PREFIX}* names are reserved")
        return self.root / key

    @contextmanager
    def _os_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(
                f"file storage {self.root}: cannot {action}: {_describe(exc)}; "
                "check that the directory exists, is writable and has free space"
            ) from exc

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no object {key} in file storage {self.root}")

    def _make_dirs(self, directory: Path) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)

    # -- writes -----------------------------------------------------------------------------

    def _store(self, key: str, source: BinaryIO, overwrite: bool) -> ObjectInfo:
        final = self._path(key)
        with self._os_errors(f"write {key}"):
            # A concurrent delete_prefix may prune the directory between makedirs and mkstemp.
            for attempt in range(3):
                self._make_dirs(final.parent)
                try:
                    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=final.parent)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out:
                    size, sha = _copy_hashing(source, out)
                    out.flush()
                    os.fsync(out.fileno())
                if overwrite:
                    os.replace(tmp, final)
                else:
                    self._publish_new(key, tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(final.parent)
        return ObjectInfo(key=key, size=size, sha256=sha)

    def _publish_new(self, key: str, tmp: Path, final: Path) -> None:
        """Make `tmp` visible as `final` unless something is already there, race-free."""
        exists = ObjectExists(
            f"object {key} already exists in file storage {self.root}; stored objects are "
            "never overwritten (write a new key)"
        )
        try:
            os.link(tmp, final)
            return
        except FileExistsError:
            raise exists from None
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
        # No hard links here: claim the name exclusively, then rename over our own claim.
        try:
            os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise exists from None
        os.replace(tmp, final)

    def put_file(self, key: str, path: Path, *, overwrite: bool = False) -> ObjectInfo:
        self._path(key)
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed below, errors need their own text
        except OSError as exc:
            raise StorageError(f"cannot read {path} to upload as {key}: {_describe(exc)}") from exc
        with source:
            return self._store(key, source, overwrite)

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> ObjectInfo:
        return self._store(key, io.BytesIO(data), overwrite)

    # -- reads ------------------------------------------------------------------------------

    @contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        try:
            source = open(path, "rb")  # noqa: SIM115 - yielded to the caller
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            raise StorageError(
                f"file storage {self.root}: cannot read {key}: {_describe(exc)}"
            ) from exc
        with source:
            yield source

    def get_file(self, key: str, dest: Path, *, expected_sha256: str | None = None) -> ObjectInfo:
        dest = Path(dest)
        with self._open(key) as source:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
            except OSError as exc:
                raise StorageError(f"cannot write {dest}: {_describe(exc)}") from exc
            tmp = Path(tmp_name)
            try:
                with self._os_errors(f"download {key} to {dest}"), os.fdopen(fd, "wb") as out:
                    size, sha = _copy_hashing(source, out)
                    out.flush()
                    os.fsync(out.fileno())
                if expected_sha256 is not None and sha != expected_sha256.lower():
                    raise IntegrityError(
                        f"object {key} in file storage {self.root} has sha256 {sha}, expected "
                        f"{expected_sha256}; it is corrupt or was replaced, {dest} left untouched"
                    )
                with self._os_errors(f"move the download of {key} into {dest}"):
                    os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return ObjectInfo(key=key, size=size, sha256=sha)

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as source, self._os_errors(f"read {key}"):
            return source.read()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            raise StorageError(
                f"file storage {self.root}: cannot stat {key}: {_describe(exc)}"
            ) from exc
        if not stat.S_ISREG(st.st_mode):
            raise self._not_found(key)
        return st.st_size

    # -- listing and deletion ---------------------------------------------------------------

    def _walk_root(self, prefix: str) -> Path:
        """The deepest directory that can hold every key starting with `prefix`."""
        directory, _, _ = prefix.rpartition("/")
        return self.root / directory if directory else self.root

    def list(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        start = self._walk_root(prefix)
        found: list[str] = []

        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError | NotADirectoryError):
                raise exc

        with self._os_errors(f"list {prefix or 'all keys'}"):
            for dirpath, _dirs, files in os.walk(start, onerror=fail):
                rel_dir = Path(dirpath).relative_to(self.root).as_posix()
                for name in files:
                    if name.startswith(TMP_PREFIX):
                        continue
                    key = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if key.startswith(prefix):
                        found.append(key)
        return sorted(found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._os_errors(f"delete {key}"):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass
            except IsADirectoryError:
                pass  # a prefix, not an object

    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)
        if not prefix:
            raise ValueError("refusing to delete every object in storage (empty prefix)")
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        self._prune_empty_dirs(self._walk_root(prefix))
        return len(keys)

    def _prune_empty_dirs(self, start: Path) -> None:
        """Remove directories left empty under `start` (and `start` itself), never the root."""
        for dirpath, _dirs, _files in os.walk(start, topdown=False):
            path = Path(dirpath)
            if path != self.root:
                try:
                    path.rmdir()
                except OSError:
                    pass  # not empty: another object or an in-flight write lives there

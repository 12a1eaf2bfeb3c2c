"""What every storage backend shares: the Storage protocol, its errors, ObjectInfo and the rules
for a valid key. The backends (local.py, s3.py) import from here, never from the package, so the
package `__init__` can import them at its top without a cycle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


class StorageError(Exception):
    """Storage could not do what was asked; the message is one operator-facing line."""


class ObjectNotFound(StorageError):
    """The key names no object."""


class ObjectExists(StorageError):
    """A write with overwrite=False met an object already stored under the key."""


class IntegrityError(StorageError):
    """Downloaded bytes do not hash to the sha256 the caller expected."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str


@runtime_checkable
class Storage(Protocol):
    url: str

    def put_file(self, key: str, path: Path, *, overwrite: bool = False) -> ObjectInfo: ...

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> ObjectInfo: ...

    def get_file(
        self, key: str, dest: Path, *, expected_sha256: str | None = None
    ) -> ObjectInfo: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    # Declared after every method that annotates with the builtin `list`, which it shadows here.
    def list(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...


def validate_key(key: str) -> str:
    """Return `key` if it is a clean relative '/'-separated key, else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid storage key {key!r}: it is empty")
    if key.startswith("/"):
        raise ValueError(f"invalid storage key {key!r}: it must be relative (no leading '/')")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}: backslashes and NUL are not allowed")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(
                f"invalid storage key {key!r}: empty, '.' and '..' segments are not allowed"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A prefix is a key, a key ending in '/', or '' (everything)."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix

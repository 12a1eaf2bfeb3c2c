"""The file:// storage backend, through the Storage protocol."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest

from relaymd.storage import (
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    Storage,
    StorageError,
    bundle_key,
    checkpoint_key,
    job_prefix,
    log_key,
    manifest_key,
    open_storage,
)
from relaymd.storage.local import LocalStorage


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".relaymd-tmp-" in p.name]


def test_local_storage_satisfies_the_protocol(store: LocalStorage) -> None:
    assert isinstance(store, Storage)


def test_bytes_round_trip(store: LocalStorage) -> None:
    info = store.put_bytes("jobs/j1/checkpoints/000001.json", b'{"seq": 1}')
    assert info.sha256 == sha(b'{"seq": 1}')
    assert info.size == 10
    assert store.get_bytes("jobs/j1/checkpoints/000001.json") == b'{"seq": 1}'
    assert store.exists("jobs/j1/checkpoints/000001.json")
    assert store.size("jobs/j1/checkpoints/000001.json") == 10
    assert leftovers(store.root) == []


def test_file_round_trip_over_several_chunks(store: LocalStorage, tmp_path: Path) -> None:
    data = os.urandom((1 << 20) * 2 + 12345)
    src = tmp_path / "ckpt.tar.gz"
    src.write_bytes(data)
    info = store.put_file("jobs/j1/checkpoints/000002.tar.gz", src)
    assert (info.size, info.sha256) == (len(data), sha(data))
    dest = tmp_path / "down" / "here.tar.gz"
    got = store.get_file("jobs/j1/checkpoints/000002.tar.gz", dest, expected_sha256=sha(data))
    assert got == info
    assert dest.read_bytes() == data
    assert leftovers(tmp_path) == []


def test_overwrite_false_refuses_and_keeps_the_original(store: LocalStorage) -> None:
    store.put_bytes("k/obj", b"first")
    with pytest.raises(ObjectExists, match="k/obj"):
        store.put_bytes("k/obj", b"second")
    assert store.get_bytes("k/obj") == b"first"
    assert leftovers(store.root) == []


def test_overwrite_true_replaces(store: LocalStorage) -> None:
    store.put_bytes("k/obj", b"first")
    info = store.put_bytes("k/obj", b"second", overwrite=True)
    assert info.sha256 == sha(b"second")
    assert store.get_bytes("k/obj") == b"second"


def test_wrong_sha_raises_and_leaves_dest_alone(store: LocalStorage, tmp_path: Path) -> None:
    store.put_bytes("k/obj", b"payload")
    fresh = tmp_path / "fresh.bin"
    with pytest.raises(IntegrityError, match="k/obj"):
        store.get_file("k/obj", fresh, expected_sha256="0" * 64)
    assert not fresh.exists()
    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"keep me")
    with pytest.raises(IntegrityError):
        store.get_file("k/obj", existing, expected_sha256=sha(b"other"))
    assert existing.read_bytes() == b"keep me"
    assert leftovers(tmp_path) == []


def test_list_delete_and_delete_prefix(store: LocalStorage) -> None:
    keys = [bundle_key("j1"), checkpoint_key("j1", 1), manifest_key("j1", 1), log_key("j1", 1)]
    for key in keys:
        store.put_bytes(key, key.encode())
    store.put_bytes(bundle_key("j10"), b"other job")
    assert store.list(job_prefix("j1")) == sorted(keys)
    assert store.list("jobs/j1/checkpoints/") == [manifest_key("j1", 1), checkpoint_key("j1", 1)]
    assert store.list("jobs/j1") == sorted(keys + [bundle_key("j10")])  # a plain string prefix
    assert store.list("nothing/here/") == []

    store.delete(log_key("j1", 1))
    store.delete(log_key("j1", 1))  # already gone: not an error
    assert not store.exists(log_key("j1", 1))

    assert store.delete_prefix(job_prefix("j1")) == 3
    assert store.list("") == [bundle_key("j10")]
    assert not (store.root / "jobs" / "j1").exists()


def test_missing_object_names_the_key_and_root(store: LocalStorage, tmp_path: Path) -> None:
    key = checkpoint_key("j1", 7)
    for call in (
        lambda: store.get_bytes(key),
        lambda: store.size(key),
        lambda: store.get_file(key, tmp_path / "x"),
    ):
        with pytest.raises(ObjectNotFound) as caught:
            call()
        assert key in str(caught.value)
        assert str(store.root) in str(caught.value)
    assert not store.exists(key)


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a\\b", "a\x00b", "", "a/"])
def test_invalid_keys_are_refused(store: LocalStorage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="invalid storage key"):
        store.exists(key)


def test_key_layout() -> None:
    assert bundle_key("abc") == "jobs/abc/input/bundle.tar.gz"
    assert checkpoint_key("abc", 12) == "jobs/abc/checkpoints/000012.tar.gz"
    assert manifest_key("abc", 12) == "jobs/abc/checkpoints/000012.json"
    assert log_key("abc", 2) == "jobs/abc/logs/attempt-2.log.gz"
    assert job_prefix("abc") == "jobs/abc/"
    with pytest.raises(ValueError):
        bundle_key("../abc")


def test_open_storage_accepts_file_urls_and_paths(tmp_path: Path) -> None:
    by_url = open_storage((tmp_path / "s").as_uri())
    by_path = open_storage(str(tmp_path / "s"))
    assert isinstance(by_url, LocalStorage) and isinstance(by_path, LocalStorage)
    by_url.put_bytes("a/b", b"shared")
    assert by_path.get_bytes("a/b") == b"shared"
    assert open_storage(by_url.url).get_bytes("a/b") == b"shared"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://host/x", "ftp://host/x"),
        ("relative/dir", "relative/dir"),
        ("file://remotehost/x", "three slashes"),
    ],
)
def test_open_storage_refuses_other_urls(url: str, expected: str) -> None:
    with pytest.raises(StorageError, match=expected):
        open_storage(url)


def test_unusable_root_is_a_storage_error(tmp_path: Path) -> None:
    # Tests may run as root, where permission bits do not bite: a root that is a file does.
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"")
    store = LocalStorage(root)
    with pytest.raises(StorageError, match=r"cannot write k/obj: \[Errno \d+\]"):
        store.put_bytes("k/obj", b"x")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageError, match=str(root)):
        store.put_file("k/obj", src)


def test_missing_upload_source_is_a_storage_error(store: LocalStorage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot read"):
        store.put_file("k/obj", tmp_path / "absent")
    assert not store.exists("k/obj")


def test_racing_writers_of_one_key_leave_exactly_one_winner(store: LocalStorage) -> None:
    outcomes: list[str] = []

    def write(i: int) -> None:
        try:
            store.put_bytes("race/obj", f"writer {i}".encode() * 1000)
            outcomes.append(f"won {i}")
        except ObjectExists:
            outcomes.append("lost")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 7
    assert store.get_bytes("race/obj") == f"writer {winners[0][4:]}".encode() * 1000


def test_without_hard_links_existing_objects_are_still_kept(
    store: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # some shared filesystems refuse hard links
    store.put_bytes("k/obj", b"first")
    with pytest.raises(ObjectExists):
        store.put_bytes("k/obj", b"second")
    assert store.get_bytes("k/obj") == b"first"
    assert leftovers(store.root) == []

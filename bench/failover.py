"""Failover benchmark: how long a job is down, and how much work it loses, when its node dies.

    python bench/failover.py [--kills 5] [--every 20] [--step-s 0.05] [--poll-interval 0.5]
                             [--heartbeat-interval 1] [--heartbeat-timeout 5] [--seed 1]

It starts `relaymd serve --port 0` with a fresh temporary RELAYMD_HOME (heartbeat every 1 s,
stale after 5 s, reaper every 1 s), submits one job running the test engine
`tests/engines/stepper.py` (a restartable recurrence that checkpoints every EVERY steps), and
starts a real `relaymd worker`. Then K times: wait until the current worker has a checkpoint
accepted, wait a random part of a checkpoint interval (a node dies at any moment, not just after
a checkpoint), kill -9 the worker *and* its engine's process group (a node dying), start a
replacement worker at once (`poll_then_exit`, claiming every --poll-interval s), and measure

  (a) time from the kill to the job being `running` again on the new worker, split into the
      requeue (stale timeout + reaper), the claim (poll interval) and the start (first heartbeat);
  (b) steps lost: steps the engine had computed when it died minus the step of the checkpoint
      the next attempt resumes from (read from the checkpoint itself); the engine's STEPS_LOG
      (one line per computed step, across attempts) cross-checks the sum at the end.

The last worker finishes the job; its result must equal an uninterrupted run's. The last line is
`RESULT kills=K downtime_s_mean=.. downtime_s_max=.. steps_lost_mean=.. steps_lost_max=..
result=ok|WRONG`; the exit status is 1 when the result is wrong or a measurement failed.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
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

from relaymd.client import Client  # noqa: E402
from relaymd.models import CheckpointInfo, JobCreate, JobDetail  # noqa: E402
from relaymd.storage import open_storage  # noqa: E402
from relaymd.storage.bundle import pack_directory  # noqa: E402

ENGINE = ROOT / "tests" / "engines" / "stepper.py"


# --------------------------------------------------------------------------- processes


def engine_group(worker_pid: int) -> int | None:
    """The worker's engine: a child leading its own session (and so its own process group)."""
    for pid in all_pids():
        st = proc_stat(pid)
        if st and st[1] == worker_pid and st[2] == pid and st[0] != "Z":
            return pid
    return None


def group_alive(group: int) -> bool:
    return any((st := proc_stat(pid)) and st[2] == group and st[0] != "Z" for pid in all_pids())


class Cluster:
    """One orchestrator and the workers started against it; `close()` ends them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="relaymd-failover-", dir=args.home_parent))
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.groups: set[int] = set()
        self.url = ""
        self.tokens: dict[str, str] = {}
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("RELAYMD_") and k != "SLURM_JOB_ID"}
        self.env.update(RELAYMD_HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / "config"))

    def start_server(self, timeout: float = 60.0) -> None:
        a = self.args
        env = {**self.env, "RELAYMD_HEARTBEAT_INTERVAL": str(a.heartbeat_interval),
               "RELAYMD_HEARTBEAT_TIMEOUT": str(a.heartbeat_timeout), "RELAYMD_LOCAL_WORKERS": "0",
               "RELAYMD_REAP_INTERVAL": str(a.reap_interval)}
        with (self.home / "serve.out").open("wb") as log:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "relaymd", "serve", "--host", "127.0.0.1", "--port", "0"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"relaymd serve exited with {self.server.returncode}: "
                                   + self.tail("serve.out"))
            try:
                self.url = json.loads((self.home / "orchestrator.json").read_text())["url"]
                self.tokens = json.loads((self.home / "tokens.json").read_text())
                return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"relaymd serve did not come up in {timeout:.0f}s")
            time.sleep(0.05)

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        a = self.args
        env = {**self.env, "RELAYMD_URL": self.url,
               "RELAYMD_WORKER_WORKDIR": str(self.home / f"work-{name}"),
               "RELAYMD_WORKER_IDLE": "poll_then_exit",
               "RELAYMD_WORKER_POLL_INTERVAL": str(a.poll_interval),
               "RELAYMD_WORKER_POLL_MAX": "3600"}
        with (self.home / f"worker-{name}.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "relaymd", "worker"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.workers.append(proc)
        return proc

    def kill_node(self, worker: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its engine's whole process group, as a dying node would."""
        group = engine_group(worker.pid)
        worker.kill()
        if group is not None:
            self.groups.add(group)
            signal_group(group, signal.SIGKILL)
        worker.wait(10)
        deadline = time.monotonic() + 10
        while group is not None and group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.01)

    def tail(self, name: str, lines: int = 5) -> str:
        try:
            return " | ".join((self.home / name).read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        for proc in self.workers:
            group = engine_group(proc.pid)
            if group is not None:
                self.groups.add(group)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for group in self.groups:
            signal_group(group, signal.SIGKILL)
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        if not self.args.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)


# --------------------------------------------------------------------------- the job


def submit(cluster: Cluster, op: Client, total: int, every: int, step_s: float) -> tuple[str, Path]:
    job_id = uuid.uuid4().hex
    src = cluster.home / "job"
    src.mkdir()
    shutil.copy(ENGINE, src / "stepper.py")
    steps_log = cluster.home / "steps.log"
    env = f"TOTAL={total} EVERY={every} STEP_S={step_s} STEPS_LOG={steps_log}"
    # `exec`: the engine itself gets the worker's signals, whatever /bin/sh is
    (src / "relaymd.yaml").write_text(json.dumps({
        "command": f"{env} exec {sys.executable} stepper.py", "progress": "progress.json",
        "checkpoint": {"paths": ["state.json", "result.json"], "poll_seconds": 0.1},
        "resources": {"gpus": 0}, "max_attempts": 3}))
    bundle = cluster.home / "bundle.tar.gz"
    pack_directory(src, bundle)
    op.upload_bundle(job_id, bundle)
    op.create_job(JobCreate(id=job_id, title="failover benchmark"))
    return job_id, steps_log


def steps_done(steps_log: Path) -> int:
    """Steps computed so far, across every attempt (the engine appends one line a step)."""
    try:
        return len(steps_log.read_text().split())
    except FileNotFoundError:
        return 0


def step_reached(steps_log: Path) -> int:
    """The step the engine last computed (its last line)."""
    lines = steps_log.read_text().split()
    return int(lines[-1]) if lines else 0


def checkpoint_step(cluster: Cluster, info: CheckpointInfo) -> int:
    """The step a checkpoint resumes from (state.json inside it)."""
    dest = cluster.home / f"ckpt-{info.seq}.tar.gz"
    open_storage(f"file://{cluster.home / 'storage'}").get_file(info.key, dest,
                                                               expected_sha256=info.sha256)
    with tarfile.open(dest) as tar:
        member = tar.extractfile("state.json")
        assert member is not None, f"checkpoint {info.seq} has no state.json"
        return int(json.load(member)["n"])


def latest(d: JobDetail) -> CheckpointInfo:
    return next(c for c in d.checkpoint_list if c.seq == d.latest_checkpoint)


def wait_for(what: str, predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Kill:
    attempt: int
    resume_step: int  # step of the newest accepted checkpoint when the node died
    steps_at_kill: int  # steps the engine had computed
    requeued_s: float  # kill -> job back in the queue (stale timeout + reaper)
    claimed_s: float  # kill -> claimed by the new worker
    running_s: float  # kill -> running on the new worker (its first heartbeat)

    @property
    def lost(self) -> int:
        return self.steps_at_kill - self.resume_step


def event_time(d: JobDetail, kind: str, attempt: int) -> float:
    for e in d.events:
        if e.kind == kind and e.attempt == attempt:
            return e.at.timestamp()
    raise RuntimeError(f"no {kind} event for attempt {attempt}")


def run(args: argparse.Namespace, cluster: Cluster) -> int:
    rng = random.Random(args.seed)
    every, step_s = args.every, args.step_s
    interval = every * step_s
    # each attempt advances the job by at most two checkpoint intervals before it dies
    total = args.total or (2 * args.kills + 3) * every
    cluster.start_server()
    op = Client(cluster.url, cluster.tokens["operator"])
    job_id, steps_log = submit(cluster, op, total, every, step_s)
    print(f"orchestrator {cluster.url} (heartbeat {args.heartbeat_interval:g}s, stale after "
          f"{args.heartbeat_timeout:g}s, reaper every {args.reap_interval:g}s), home {cluster.home}")
    print(f"job {job_id[:8]}: {total} steps of {step_s:g}s, checkpoint every {every} steps "
          f"({interval:g}s); replacement workers claim every {args.poll_interval:g}s")
    worker = cluster.start_worker("w0")
    kills: list[Kill] = []
    for k in range(args.kills):
        attempt = k + 1
        wait_for(f"attempt {attempt} to checkpoint ({cluster.tail(f'worker-w{k}.log', 2)})",
                 lambda a=attempt: any(c.attempt == a for c in op.get_job(job_id).checkpoint_list),
                 60)
        time.sleep(rng.uniform(0, interval))  # the node dies at any moment of an interval
        if op.get_job(job_id).status != "running":
            raise RuntimeError("the job ended before the kill: raise --total")
        killed_at = time.time()
        cluster.kill_node(worker)
        ran = step_reached(steps_log)
        d = op.get_job(job_id)
        resume = checkpoint_step(cluster, latest(d))
        worker = cluster.start_worker(f"w{k + 1}")
        d = wait_for(f"the job to run again (attempt {attempt + 1})",
                     lambda a=attempt: (j := op.get_job(job_id)).attempt == a + 1
                     and j.status == "running" and j, args.heartbeat_timeout * 4 + 30)
        kills.append(Kill(attempt, resume, ran,
                          event_time(d, "lose", attempt) - killed_at,
                          event_time(d, "claim", attempt + 1) - killed_at,
                          event_time(d, "start", attempt + 1) - killed_at))
        print(f"  kill {k + 1}: attempt {attempt} died at step {ran}, resumes from step {resume}, "
              f"running again after {kills[-1].running_s:.2f}s", flush=True)
    d = wait_for("the job to finish", lambda: (j := op.get_job(job_id)).status
                 in ("completed", "failed", "cancelled") and j, total * step_s * 2 + 120)
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    result: dict[str, int] = {}
    if d.status == "completed":
        dest = cluster.home / "final.tar.gz"
        info = latest(d)
        open_storage(f"file://{cluster.home / 'storage'}").get_file(info.key, dest,
                                                                   expected_sha256=info.sha256)
        with tarfile.open(dest) as tar:
            member = tar.extractfile("result.json")
            result = json.load(member) if member else {}
    ok = result == {"x": expected_result(total), "n": total}
    redone = steps_done(steps_log) - total

    print()
    print(f"{'kill':>4} {'resume':>7} {'died at':>8} {'lost':>5} {'requeued s':>11} "
          f"{'claimed s':>10} {'running s':>10}")
    for i, k in enumerate(kills, 1):
        print(f"{i:>4} {k.resume_step:>7} {k.steps_at_kill:>8} {k.lost:>5} {k.requeued_s:>11.2f} "
              f"{k.claimed_s:>10.2f} {k.running_s:>10.2f}")
    downs = [k.running_s for k in kills]
    lost = [k.lost for k in kills]
    print(f"steps lost: {lost} (interval {every}); steps redone per STEPS_LOG: {redone} "
          f"{'= sum' if redone == sum(lost) else f'!= sum {sum(lost)}'}")
    print(f"job {d.status} after {d.attempt} attempts, failures {d.failures}; result "
          f"{'equals' if ok else 'DIFFERS from'} the uninterrupted run's")
    print(f"RESULT kills={len(kills)} downtime_s_mean={statistics.mean(downs):.2f} "
          f"downtime_s_max={max(downs):.2f} steps_lost_mean={statistics.mean(lost):.1f} "
          f"steps_lost_max={max(lost)} result={'ok' if ok else 'WRONG'}")
    return 0 if ok and redone == sum(lost) and d.failures == 0 else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=5, help="node deaths to measure (default 5)")
    p.add_argument("--every", type=int, default=20, help="engine checkpoint interval, steps")
    p.add_argument("--step-s", type=float, default=0.05, help="seconds per engine step")
    p.add_argument("--total", type=int, default=0,
                   help="steps in the job (default: enough to outlive every kill)")
    p.add_argument("--poll-interval", type=float, default=0.5,
                   help="replacement workers' claim poll interval, s")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-timeout", type=float, default=5.0)
    p.add_argument("--reap-interval", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1, help="seed of the random kill moments")
    p.add_argument("--home-parent", help="where the temporary RELAYMD_HOME goes")
    p.add_argument("--keep-home", action="store_true", help="keep logs and storage for a look")
    args = p.parse_args(argv)
    if args.kills < 1 or args.every < 1 or args.step_s <= 0:
        p.error("--kills, --every and --step-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    cluster = Cluster(args)
    try:
        return run(args, cluster)
    except RuntimeError as exc:
        print(f"failover benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())

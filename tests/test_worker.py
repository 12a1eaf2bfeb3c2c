"""The worker as a real process against a real orchestrator, running a real engine subprocess."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from relaymd.client import Client
from relaymd.models import CheckpointInfo, CheckpointReport, JobCreate, JobDetail
from relaymd.storage.bundle import pack_directory

from .conftest import RunningOrchestrator, make_settings, s3_settings

ENGINE = Path(__file__).parent / "engines" / "stepper.py"
A, M = 1103515245, 2**31


def expected_result(total: int) -> int:
    x = 1
    for n in range(total):
        x = (A * x + n) % M
    return x


@pytest.fixture(params=["file", "s3"])
def orch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningOrchestrator]:
    """Every worker test runs on file:// storage and on s3:// (a moto server on loopback)."""
    timing = {"heartbeat_interval": 0.3, "heartbeat_timeout": 2.0}
    if request.param == "s3":
        settings = s3_settings(request.getfixturevalue("moto_server"), tmp_path / "home", **timing)
    else:
        settings = make_settings(tmp_path / "home", **timing)
    settings.reap_interval = 0.3
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def no_leftover_processes(orch: RunningOrchestrator, tmp_path: Path) -> Iterator[None]:
    yield
    end_started(tmp_path)


def end_started(tmp_path: Path) -> None:
    """End every worker this test started and every engine running in its directories (a
    worker killed with -9 leaves its engine behind, in its own session)."""
    groups: set[int] = set()
    for proc, log in _STARTED:
        group = engine_group(proc)  # before the worker dies and its engine is reparented
        if group:
            groups.add(group)
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)
        log.close()
    _STARTED.clear()
    root = str(tmp_path.resolve())
    for pid in all_pids():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        st = proc_stat(pid)
        if st and cwd.startswith(root) and st[2] != os.getpgrp():
            groups.add(st[2])
    for group in groups:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass


def submit_stepper(orch: RunningOrchestrator, tmp_path: Path, *, total: int = 60,
                   step_s: float = 0.03, every: int = 10, env: dict[str, str] | None = None,
                   max_attempts: int = 3, exec_engine: bool = False,
                   checkpoint: dict[str, Any] | None = None) -> str:
    """exec_engine: the shell execs the engine (as bash does for a simple command) instead of
    staying its parent (as dash, Debian's /bin/sh, does)."""
    job_id = uuid.uuid4().hex
    src = tmp_path / f"job-{job_id[:6]}"
    src.mkdir()
    (src / "stepper.py").write_text(ENGINE.read_text())
    vars_ = {"TOTAL": total, "STEP_S": step_s, "EVERY": every, "STEPS_LOG": str(
        tmp_path / f"steps-{job_id[:6]}.log"), **(env or {})}
    command = " ".join(f"{k}={v}" for k, v in vars_.items()) + \
        f" {'exec ' if exec_engine else ''}{sys.executable} stepper.py"
    (src / "relaymd.yaml").write_text(yaml.safe_dump({
        "command": command, "progress": "progress.json", "max_attempts": max_attempts,
        "checkpoint": {"paths": ["state.json", "result.json"], "poll_seconds": 0.1,
                       **(checkpoint or {})},
        "resources": {"gpus": 0}}))
    bundle = tmp_path / f"{job_id}.tar.gz"
    pack_directory(src, bundle)
    op = orch.operator()
    op.upload_bundle(job_id, bundle)
    op.create_job(JobCreate(id=job_id, title="stepper"))
    return job_id


_STARTED: list[tuple[subprocess.Popen[str], IO[str]]] = []  # ended after each test


def start_worker(orch: RunningOrchestrator, tmp_path: Path, name: str = "w",
                 **env: str) -> subprocess.Popen[str]:
    full = {**os.environ, **orch.settings.storage_env(), "RELAYMD_HOME": str(orch.settings.home),
            "RELAYMD_URL": orch.url,
            "RELAYMD_WORKER_WORKDIR": str(tmp_path / f"work-{name}"),
            "RELAYMD_WORKER_IDLE": "immediate_exit", **env}
    full.pop("RELAYMD_CONFIG", None)
    if "SLURM_JOB_ID" not in env:
        full.pop("SLURM_JOB_ID", None)  # running the tests inside an allocation changes nothing
    log = open(tmp_path / f"worker-{name}.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "relaymd", "worker"], env=full,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    _STARTED.append((proc, log))
    return proc


def wait_for(predicate: Any, timeout: float = 30,
             what: str | Callable[[], str] = "condition") -> Any:
    """Poll predicate until it is truthy; `what` may be a callable, read only on a timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for "
                         f"{what() if callable(what) else what}")


def final_result(orch: RunningOrchestrator, job_id: str, tmp_path: Path) -> dict[str, int]:
    detail = orch.operator().get_job(job_id)
    latest = detail.checkpoint_list[-1]
    dest = tmp_path / f"final-{job_id[:6]}.tar.gz"
    orch.settings.open_storage().get_file(latest.key, dest, expected_sha256=latest.sha256)
    with tarfile.open(dest) as tar:
        member = tar.extractfile("result.json")
        assert member is not None
        return dict(json.load(member))


def worker_log(tmp_path: Path, name: str = "w") -> str:
    return (tmp_path / f"worker-{name}.log").read_text()


def test_job_runs_to_completion_with_the_uninterrupted_result(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    job_id = submit_stepper(orch, tmp_path)
    proc = start_worker(orch, tmp_path)
    assert proc.wait(60) == 0, why(tmp_path)
    job = orch.operator().get_job(job_id)
    assert job.status == "completed", f"job is {job.status} ({why(tmp_path)})"
    assert final_result(orch, job_id, tmp_path) == {"x": expected_result(60), "n": 60}
    assert job.checkpoints >= 2  # periodic ones and the final one
    steps = (tmp_path / f"steps-{job_id[:6]}.log").read_text().split()
    assert len(steps) == 60
    logs = orch.settings.open_storage().list(f"jobs/{job_id}/logs/")
    assert logs == [f"jobs/{job_id}/logs/attempt-1.log.gz"]
    # the worker said goodbye
    assert {w.status for w in orch.operator().workers()} == {"gone"}


def test_an_engine_checkpointing_faster_than_the_poll_still_gets_its_sets_uploaded(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    """A checkpoint every 0.4 s, a look every 2 s: two looks a poll apart would never agree.
    The second look comes a moment (`settle_seconds`) after the first instead."""
    job_id = long_job(orch, tmp_path, step_s=0.02, every=20,
                      checkpoint={"poll_seconds": 2.0, "settle_seconds": 0.05})
    op = orch.operator()
    proc = start_worker(orch, tmp_path)
    first = wait_accepted(op, job_id, tmp_path, timeout=30)
    second = wait_accepted(op, job_id, tmp_path, after=first.latest_checkpoint, timeout=15)
    assert second.status == "running", f"job is {second.status} ({why(tmp_path)})"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, why(tmp_path)


# --------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def engine_group(worker: subprocess.Popen[str]) -> int | None:
    """The process group of the worker's running engine (a child leading its own session)."""
    for pid in all_pids():
        st = proc_stat(pid)
        if st and st[1] == worker.pid and st[2] == pid and st[0] != "Z":
            return pid
    return None


def group_alive(group: int) -> bool:
    return any((st := proc_stat(pid)) and st[2] == group and st[0] != "Z" for pid in all_pids())


def kill_node(worker: subprocess.Popen[str], group: int) -> None:
    """A node dies: the worker and its engine, both with SIGKILL."""
    os.kill(worker.pid, signal.SIGKILL)
    os.killpg(group, signal.SIGKILL)
    worker.wait(10)
    wait_for(lambda: not group_alive(group), 5, "the killed engine to be gone")


# --------------------------------------------------------------------------- job accounting


def steps_log(tmp_path: Path, job_id: str) -> Path:
    return tmp_path / f"steps-{job_id[:6]}.log"


def steps_done(tmp_path: Path, job_id: str) -> int:
    """Steps computed so far, across every attempt (the stepper appends one line a step)."""
    try:
        return len(steps_log(tmp_path, job_id).read_text().split())
    except FileNotFoundError:
        return 0


def checkpoint_state(orch: RunningOrchestrator, info: CheckpointInfo,
                     tmp_path: Path) -> dict[str, int]:
    """state.json inside an accepted checkpoint (the step it resumes from)."""
    dest = tmp_path / f"ckpt-{uuid.uuid4().hex[:8]}.tar.gz"
    orch.settings.open_storage().get_file(info.key, dest, expected_sha256=info.sha256)
    with tarfile.open(dest) as tar:
        member = tar.extractfile("state.json")
        assert member is not None, f"checkpoint {info.seq} has no state.json"
        return dict(json.load(member))


def latest(detail: JobDetail) -> CheckpointInfo:
    assert detail.latest_checkpoint is not None, f"job {detail.id[:8]} has no checkpoint"
    return next(c for c in detail.checkpoint_list if c.seq == detail.latest_checkpoint)


def engine_log(orch: RunningOrchestrator, job_id: str, attempt: int) -> str:
    key = f"jobs/{job_id}/logs/attempt-{attempt}.log.gz"
    return gzip.decompress(orch.settings.open_storage().get_bytes(key)).decode()


def why(tmp_path: Path, name: str = "w") -> str:
    """The worker's last few log messages, on one line, for failure messages."""
    try:
        lines = worker_log(tmp_path, name).strip().splitlines()[-4:]
    except FileNotFoundError:
        return "(no worker log)"
    msgs = []
    for line in lines:
        try:
            msgs.append(str(json.loads(line).get("msg")))
        except ValueError:
            msgs.append(line[:160])
    return f"worker {name}: " + " | ".join(msgs)


def wait_accepted(op: Client, job_id: str, tmp_path: Path, name: str = "w",
                  after: int | None = None, timeout: float = 20) -> JobDetail:
    """Wait for a checkpoint newer than `after` to be accepted."""
    def accepted() -> JobDetail | None:
        d = op.get_job(job_id)
        return d if d.latest_checkpoint and d.latest_checkpoint > (after or 0) else None
    return wait_for(accepted, timeout,
                    lambda: f"an accepted checkpoint ({why(tmp_path, name)})")


POLLING = {"RELAYMD_WORKER_IDLE": "poll_then_exit", "RELAYMD_WORKER_POLL_INTERVAL": "0.2",
           "RELAYMD_WORKER_POLL_MAX": "60"}  # a worker that waits for the job to come back


def long_job(orch: RunningOrchestrator, tmp_path: Path, **kw: Any) -> str:
    """A job that runs far longer than any test waits: only hand-offs and stops end it here."""
    return submit_stepper(orch, tmp_path, total=100_000, **kw)


# --------------------------------------------------------------------------- node loss


def test_kill_9_requeues_after_the_stale_timeout_and_a_second_worker_resumes(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    total, every = 150, 10  # long enough that a loaded machine still finds a moment to kill
    job_id = submit_stepper(orch, tmp_path, total=total, every=every, step_s=0.04)
    op = orch.operator()
    w1 = start_worker(orch, tmp_path, "w1")
    # Kill early in a checkpoint interval, so that the newest checkpoint the engine wrote is
    # the accepted one: then the work lost is exactly the steps since that checkpoint.
    seq = 0
    while True:
        d = wait_accepted(op, job_id, tmp_path, "w1", after=seq, timeout=15)
        seq = d.latest_checkpoint or 0
        done = latest(d).progress
        if done is not None and steps_done(tmp_path, job_id) - done.done <= every // 2:
            break
        assert d.status == "running", f"job finished before the kill could be placed: {d.status}"
    group = engine_group(w1)
    assert group, f"no engine under worker w1 ({why(tmp_path, 'w1')})"
    killed_at = time.time()
    kill_node(w1, group)
    ran = steps_done(tmp_path, job_id)
    resume = checkpoint_state(orch, latest(op.get_job(job_id)), tmp_path)["n"]
    w2 = start_worker(orch, tmp_path, "w2", **POLLING)  # starts while the lease runs out

    d = wait_for(lambda: (d := op.get_job(job_id)).attempt == 2 and d.status == "running" and d,
                 10, lambda: f"the job to run again on worker w2 ({why(tmp_path, 'w2')})")
    lose = [e for e in d.events if e.kind == "lose"]
    assert len(lose) == 1 and d.failures == 0, \
        f"events {[e.kind for e in d.events]}, failures={d.failures}: want one lose, 0"
    requeued = lose[0].at.timestamp() - killed_at
    hb, timeout = orch.settings.heartbeat_interval, orch.settings.heartbeat_timeout
    assert timeout - hb - 0.2 <= requeued <= timeout + 2 * orch.settings.reap_interval + 1.5, \
        f"requeued {requeued:.2f}s after the kill; stale timeout is {timeout}s"
    assert d.worker_id != lose[0].worker_id, "the job went back to the dead worker"

    d = wait_for(lambda: (d := op.get_job(job_id)).status in ("completed", "failed") and d, 20,
                 lambda: f"the job to finish ({why(tmp_path, 'w2')})")
    assert d.status == "completed", f"job is {d.status} ({why(tmp_path, 'w2')})"
    w2.send_signal(signal.SIGTERM)
    assert w2.wait(10) == 0, f"second worker exit status {w2.returncode} ({why(tmp_path, 'w2')})"
    assert final_result(orch, job_id, tmp_path) == {"x": expected_result(total), "n": total}
    assert f"resumed at step {resume}" in engine_log(orch, job_id, 2), \
        f"attempt 2 did not resume from the accepted checkpoint at step {resume}"
    redone = steps_done(tmp_path, job_id) - total
    assert redone == ran - resume, f"{redone} steps redone, expected {ran} - {resume}"
    assert redone <= every, f"{redone} steps redone: more than one checkpoint interval ({every})"


# --------------------------------------------------------------------------- SIGTERM hand-off


@pytest.mark.parametrize("term_exit", [0, 1], ids=["engine-exits-0", "engine-exits-1"])
def test_sigterm_uploads_a_fresh_checkpoint_and_releases_the_job(
        orch: RunningOrchestrator, tmp_path: Path, term_exit: int) -> None:
    job_id = long_job(orch, tmp_path, every=10, step_s=0.03, env={"TERM_EXIT": str(term_exit)},
                      exec_engine=True)
    op = orch.operator()
    w = start_worker(orch, tmp_path)
    before = wait_accepted(op, job_id, tmp_path)
    step_before = checkpoint_state(orch, latest(before), tmp_path)["n"]
    signalled = time.monotonic()
    w.send_signal(signal.SIGTERM)
    wait_for(lambda: op.get_job(job_id).status == "queued", 5,
             lambda: f"the job to be released within 5 s of SIGTERM ({why(tmp_path)})")
    client, _ = orch.worker(gpus=0)
    again = client.claim()
    reclaimed = time.monotonic() - signalled
    assert again is not None and again.job.id == job_id, "the released job was not claimable"
    assert reclaimed <= 5, f"re-claimable {reclaimed:.1f}s after SIGTERM, want <= 5 s"
    assert w.wait(10) == 0, f"worker exit status {w.returncode} after SIGTERM"

    d = op.get_job(job_id)
    release = [e for e in d.events if e.kind == "release"]
    assert len(release) == 1, f"events {[e.kind for e in d.events]}: want one release"
    assert d.failures == 0, f"a hand-off counted as a failure (failures={d.failures})"
    assert release[0].seq is not None and release[0].seq > (before.latest_checkpoint or 0), \
        f"release carried checkpoint {release[0].seq}, not one newer than {before.latest_checkpoint}"
    handed = next(c for c in d.checkpoint_list if c.seq == release[0].seq)
    assert again.checkpoint_key == handed.key, "the next claim does not resume from the hand-off"
    step_after = checkpoint_state(orch, handed, tmp_path)["n"]
    assert step_after > step_before, \
        f"hand-off checkpoint is at step {step_after}, not past step {step_before}"
    assert "SIGTERM at step" in engine_log(orch, job_id, 1), "the engine never saw SIGTERM"
    stopped = [json.loads(line) for line in worker_log(tmp_path).splitlines()
               if "engine stopped for hand-off" in line]
    assert stopped and stopped[0]["exit_code"] == term_exit, \
        f"engine exit after SIGTERM: {stopped}; want {term_exit}"


def test_sigterm_hand_off_waits_for_an_engine_run_under_a_shell(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    job_id = long_job(orch, tmp_path, every=1, step_s=1.0)  # `VAR=.. python ..` under sh -c
    op = orch.operator()
    w = start_worker(orch, tmp_path)
    before = wait_accepted(op, job_id, tmp_path)
    n = steps_done(tmp_path, job_id)
    wait_for(lambda: steps_done(tmp_path, job_id) > n, 3, "the next step to begin")
    # the engine sleeps ~1 s before it can write its last checkpoint: the worker must wait
    w.send_signal(signal.SIGTERM)
    assert w.wait(10) == 0, f"worker exit status {w.returncode} after SIGTERM"
    release = [e for e in op.get_job(job_id).events if e.kind == "release"]
    assert release, f"no release ({why(tmp_path)})"
    assert release[0].seq is not None and release[0].seq > (before.latest_checkpoint or 0), \
        f"hand-off carried checkpoint {release[0].seq}: the engine was killed before its last one"


# --------------------------------------------------------------------------- engine failure


def test_engine_failure_is_reported_with_its_log_and_only_failures_count(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    job_id = submit_stepper(orch, tmp_path, total=100, every=5, step_s=0.02, max_attempts=2,
                            env={"FAIL_AT": "25"})
    op = orch.operator()
    # first an interruption (a hand-off): it must not use up the failure budget
    client, _ = orch.worker(gpus=0)
    a = client.claim()
    assert a is not None, "stand-in worker could not claim the job"
    client.release(job_id, a.attempt, "stand-in hand-off")
    d = op.get_job(job_id)
    assert (d.status, d.failures) == ("queued", 0), f"after hand-off: {d.status}, {d.failures}"

    # A worker is not given a job it failed on: each failure is a different worker's.
    w = start_worker(orch, tmp_path, "w1")
    assert w.wait(30) == 0, f"worker exit status {w.returncode} ({why(tmp_path, 'w1')})"
    d = op.get_job(job_id)
    assert (d.status, d.failures) == ("queued", 1), f"after w1: {d.status}, {d.failures}"
    w = start_worker(orch, tmp_path, "w2")
    assert w.wait(30) == 0, f"worker exit status {w.returncode} ({why(tmp_path, 'w2')})"
    d = op.get_job(job_id)
    fails = [e.worker_id for e in d.events if e.kind == "fail"]
    assert len(set(fails)) == 2, f"one worker failed the job twice: {fails}"
    assert (d.status, d.failures, d.attempt) == ("failed", 2, 3), \
        f"job {d.status} failures={d.failures} attempt={d.attempt}; want failed, 2, 3"
    assert d.last_failure is not None and d.last_failure.exit_code == 3, \
        f"last failure {d.last_failure}"
    assert "failing at step 25" in d.last_failure.log_tail, "log tail lacks the engine's error"
    assert [e.kind for e in d.events if e.kind in ("release", "fail")] == \
        ["release", "fail", "fail"], f"events {[e.kind for e in d.events]}"
    logs = orch.settings.open_storage().list(f"jobs/{job_id}/logs/")
    assert logs == [f"jobs/{job_id}/logs/attempt-{n}.log.gz" for n in (2, 3)], f"logs {logs}"
    assert "failing at step 25" in engine_log(orch, job_id, 3), "uploaded log lacks the error"


# --------------------------------------------------------------------------- cancel


def test_cancel_stops_the_engine_within_a_heartbeat(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    job_id = long_job(orch, tmp_path, step_s=0.02)
    op = orch.operator()
    w = start_worker(orch, tmp_path)
    group = wait_for(lambda: op.get_job(job_id).status == "running" and engine_group(w), 15,
                     lambda: f"the engine to run ({why(tmp_path)})")
    cancelled = time.monotonic()
    op.cancel(job_id)
    wait_for(lambda: not group_alive(group), 5, "the engine to stop after cancel")
    took = time.monotonic() - cancelled
    limit = orch.settings.heartbeat_interval + 0.5
    assert took <= limit, f"engine stopped {took:.2f}s after cancel, want <= {limit:.2f}s"
    assert w.wait(10) == 0, f"worker exit status {w.returncode} ({why(tmp_path)})"
    assert "no claimable job" in worker_log(tmp_path), "worker did not go on to claim again"
    d = op.get_job(job_id)
    assert d.status == "cancelled" and d.failures == 0, f"job {d.status} failures={d.failures}"


# --------------------------------------------------------------------------- zombie worker


def test_zombie_worker_gets_409_stops_its_engine_and_cannot_move_the_pointer_back(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    total = 100
    job_id = submit_stepper(orch, tmp_path, total=total, every=10, step_s=0.02)
    op = orch.operator()
    a = start_worker(orch, tmp_path, "a")
    wait_accepted(op, job_id, tmp_path, "a")
    group = engine_group(a)
    assert group, f"no engine under worker a ({why(tmp_path, 'a')})"

    pointers: list[int] = []
    watching = threading.Event()

    def watch() -> None:
        with orch.operator() as client:
            while not watching.is_set():
                pointers.append(client.get_job(job_id).latest_checkpoint or 0)
                time.sleep(0.03)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        os.killpg(group, signal.SIGSTOP)  # the whole node freezes (VM pause, partition)
        a.send_signal(signal.SIGSTOP)
        b = start_worker(orch, tmp_path, "b", **POLLING)
        wait_for(lambda: any(c.attempt == 2 for c in op.get_job(job_id).checkpoint_list), 15,
                 lambda: f"worker b to take over and checkpoint ({why(tmp_path, 'b')})")
        os.killpg(group, signal.SIGCONT)  # the engine first: it writes a checkpoint of its own
        time.sleep(0.4)
        woke = time.monotonic()
        a.send_signal(signal.SIGCONT)
        wait_for(lambda: not group_alive(group), 5, "the zombie's engine to stop")
        took = time.monotonic() - woke
        assert took <= orch.settings.heartbeat_interval + 1.0, \
            f"zombie stopped its engine {took:.2f}s after waking"
        assert a.wait(10) == 0, f"zombie exit status {a.returncode} ({why(tmp_path, 'a')})"
        wait_for(lambda: op.get_job(job_id).status in ("completed", "failed"), 20,
                 lambda: f"the job to finish ({why(tmp_path, 'b')})")
        b.send_signal(signal.SIGTERM)
        assert b.wait(10) == 0, f"worker b exit status {b.returncode} ({why(tmp_path, 'b')})"
    finally:
        watching.set()
        watcher.join(5)
    assert "lease lost" in worker_log(tmp_path, "a"), \
        f"the zombie never saw its lease lost ({why(tmp_path, 'a')})"
    d = op.get_job(job_id)
    assert d.status == "completed", f"job is {d.status} ({why(tmp_path, 'b')})"
    backwards = [(x, y) for x, y in zip(pointers, pointers[1:], strict=False) if y < x]
    assert not backwards, f"latest_checkpoint moved backwards: {backwards[:3]}"
    attempts = [c.attempt for c in d.checkpoint_list]
    assert attempts == sorted(attempts), f"a stale attempt's checkpoint was accepted: {attempts}"
    assert final_result(orch, job_id, tmp_path) == {"x": expected_result(total), "n": total}


# --------------------------------------------------------------------------- idle strategy


def test_poll_then_exit_picks_up_a_late_job_and_exits_after_idling(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    op = orch.operator()
    w = start_worker(orch, tmp_path, RELAYMD_WORKER_IDLE="poll_then_exit",
                     RELAYMD_WORKER_POLL_INTERVAL="0.2", RELAYMD_WORKER_POLL_MAX="3")
    wait_for(lambda: op.workers(), 15, "the worker to register")
    time.sleep(0.5)
    job_id = submit_stepper(orch, tmp_path, total=10, every=5, step_s=0.02)
    done = wait_for(lambda: (d := op.get_job(job_id)).status == "completed" and d, 10,
                    lambda: f"the late job to complete ({why(tmp_path)})")
    assert w.wait(10) == 0, f"worker exit status {w.returncode}"
    idle = time.time() - done.finished_at.timestamp()
    assert 2.9 <= idle <= 4.5, f"exited {idle:.2f}s after its job ended; poll max is 3 s"


# --------------------------------------------------------------------------- corrupt resume


def plant_checkpoint(orch: RunningOrchestrator, job_id: str, state: dict[str, int]) -> str:
    """Claim the job as a stand-in worker, upload and report a checkpoint, release it."""
    client, _ = orch.worker(gpus=0)
    a = client.claim()
    assert a is not None and a.job.id == job_id, "stand-in worker could not claim the job"
    reserved = client.reserve_checkpoint(job_id, a.attempt)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        data = json.dumps(state).encode()
        info = tarfile.TarInfo("state.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob = raw.getvalue()
    orch.settings.open_storage().put_bytes(reserved.key, blob, overwrite=True)
    client.release(job_id, a.attempt, "stand-in hand-off", CheckpointReport(
        attempt=a.attempt, seq=reserved.seq, sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob)))
    return reserved.key


def test_corrupt_resume_checkpoint_fails_the_attempt_never_a_fresh_start(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    job_id = submit_stepper(orch, tmp_path, total=30, every=5, max_attempts=1)
    op = orch.operator()
    key = plant_checkpoint(orch, job_id, {"n": 10, "x": expected_result(10)})
    storage = orch.settings.open_storage()
    blob = bytearray(storage.get_bytes(key))
    blob[len(blob) // 2] ^= 0xFF  # same size, different sha256
    storage.put_bytes(key, bytes(blob), overwrite=True)
    w = start_worker(orch, tmp_path)
    wait_for(lambda: op.get_job(job_id).status == "failed", 4,
             lambda: f"the job to fail on its corrupt checkpoint ({why(tmp_path)})")
    assert w.wait(10) == 0, f"worker exit status {w.returncode}"
    d = op.get_job(job_id)
    assert d.last_failure is not None and key in d.last_failure.reason, \
        f"failure reason does not name {key}: {d.last_failure}"
    assert steps_done(tmp_path, job_id) == 0, "the engine started anyway (a silent fresh start)"


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_good_one(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    total = 30
    job_id = submit_stepper(orch, tmp_path, total=total, every=5, max_attempts=1)
    op = orch.operator()
    plant_checkpoint(orch, job_id, {"n": 10, "x": expected_result(10)})
    newest = plant_checkpoint(orch, job_id, {"n": 20, "x": expected_result(20)})
    storage = orch.settings.open_storage()
    blob = bytearray(storage.get_bytes(newest))
    blob[len(blob) // 2] ^= 0xFF  # same size, different sha256: corrupt at rest
    storage.put_bytes(newest, bytes(blob), overwrite=True)
    w = start_worker(orch, tmp_path)
    assert w.wait(60) == 0, why(tmp_path)
    d = op.get_job(job_id)
    assert (d.status, d.failures) == ("completed", 0), f"{d.status}: {d.last_failure}"
    assert final_result(orch, job_id, tmp_path) == {"x": expected_result(total), "n": total}
    assert steps_done(tmp_path, job_id) == total - 10, "did not resume from the good checkpoint"
    rejected = [e for e in d.events if e.kind == "checkpoint_rejected"]
    assert [e.seq for e in rejected] == [2] and "sha256" in rejected[0].reason, \
        [(e.kind, e.seq, e.reason) for e in d.events]
    assert 2 not in [c.seq for c in d.checkpoint_list], "the corrupt checkpoint is still listed"


# --------------------------------------------------------------------------- allocation end


def fake_squeue(tmp_path: Path, end: int) -> str:
    """A PATH whose `squeue` prints the allocation's end as SLURM does (local time)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\ndate -d @{end} +%Y-%m-%dT%H:%M:%S\n")
    script.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_worker_hands_off_by_itself_before_the_allocation_ends(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    job_id = long_job(orch, tmp_path, every=10, step_s=0.03, exec_engine=True)
    op = orch.operator()
    end = int(time.time()) + 7
    w = start_worker(orch, tmp_path, PATH=fake_squeue(tmp_path, end), SLURM_JOB_ID="4242",
                     RELAYMD_HANDOFF_MARGIN="3.5", RELAYMD_MIN_SEGMENT="1")
    assert w.wait(15) == 0, f"worker exit status {w.returncode} ({why(tmp_path)})"
    exited = time.time()
    assert exited < end, f"worker exited {exited - end:.1f}s after the allocation's end"
    workers = op.workers()
    assert [(x.provider_id, x.wall_time_end and x.wall_time_end.timestamp()) for x in workers] \
        == [("4242", end)], f"registered as {[(x.provider_id, x.wall_time_end) for x in workers]}"
    d = op.get_job(job_id)
    assert (d.status, d.attempt, d.failures) == ("queued", 1, 0), \
        f"job {d.status} attempt={d.attempt} failures={d.failures}; want queued, 1, 0"
    release = [e for e in d.events if e.kind == "release"]
    assert release and "allocation ends" in release[0].reason, \
        f"events {[(e.kind, e.reason) for e in d.events]}"
    assert release[0].seq is not None, "the hand-off carried no checkpoint"


def test_worker_does_not_claim_with_too_little_allocation_left(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    job_id = long_job(orch, tmp_path)
    end = int(time.time()) + 6
    w = start_worker(orch, tmp_path, PATH=fake_squeue(tmp_path, end), SLURM_JOB_ID="4243",
                     RELAYMD_HANDOFF_MARGIN="3", RELAYMD_MIN_SEGMENT="10")
    assert w.wait(15) == 0, f"worker exit status {w.returncode} ({why(tmp_path)})"
    d = orch.operator().get_job(job_id)
    assert (d.status, d.attempt) == ("queued", 0), f"job {d.status} attempt={d.attempt}: claimed"
    assert "too little for a useful segment" in worker_log(tmp_path), why(tmp_path)


def test_unreachable_orchestrator_stops_the_engine_after_the_stale_timeout(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    """Past the stale timeout its lease may be someone else's: stop rather than run unfenced."""
    job_id = long_job(orch, tmp_path, step_s=0.02)
    op = orch.operator()
    w = start_worker(orch, tmp_path)
    group = wait_for(lambda: op.get_job(job_id).status == "running" and engine_group(w), 15,
                     lambda: f"the engine to run ({why(tmp_path)})")
    orch.stop()  # the orchestrator vanishes; nothing answers on its port any more
    gone = time.monotonic()
    timeout = orch.settings.heartbeat_timeout
    time.sleep(timeout * 0.5)
    assert group_alive(group), "the engine was stopped before the stale timeout ran out"
    wait_for(lambda: not group_alive(group), timeout + 5,
             lambda: f"the engine to stop without its orchestrator ({why(tmp_path)})")
    took = time.monotonic() - gone
    assert took >= timeout, f"engine stopped {took:.1f}s after the orchestrator went away"
    assert "unreachable" in worker_log(tmp_path), why(tmp_path)


def test_an_engine_finishing_while_the_orchestrator_is_down_keeps_its_result(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    """The engine exits 0 while the orchestrator restarts (down longer than the heartbeat
    timeout): the final checkpoint, which holds the result, waits for it to come back instead of
    the job being completed without it (found by bench/chaos.py --refill)."""
    job_id = submit_stepper(orch, tmp_path, total=60, step_s=0.05, every=10)
    w = start_worker(orch, tmp_path)
    steps = steps_log(tmp_path, job_id)
    wait_for(lambda: steps.exists() and len(steps.read_text().split()) >= 40, 30,
             lambda: f"the engine to reach step 40 ({why(tmp_path)})")
    orch.stop()  # ~1 s before the engine ends
    wait_for(lambda: len(steps.read_text().split()) == 60, 10, "the engine to finish")
    time.sleep(orch.settings.heartbeat_timeout + 1.5)  # past what a checkpoint reservation waited
    port = int(orch.url.rsplit(":", 1)[1])  # the worker knows it there
    again = RunningOrchestrator(orch.settings.model_copy(update={"port": port})).start()
    try:
        assert w.wait(90) == 0, why(tmp_path)
        job = again.operator().get_job(job_id)
        assert job.status == "completed", f"job is {job.status} ({why(tmp_path)})"
        assert final_result(again, job_id, tmp_path) == {"x": expected_result(60), "n": 60}, \
            why(tmp_path)
    finally:
        again.stop()


def test_an_engine_killed_by_the_signal_that_stops_its_worker_is_handed_back_not_failed(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    """SLURM's scancel and time limit (and container runtimes) signal every process at once: the
    engine may die of SIGTERM a moment before the worker's own handler runs. That is a hand-off
    with the engine's last checkpoint, not a failure (a fresh-clone run of test_slurm saw the
    job failed with 'engine exited with code -15')."""
    # Under a shell that stays its parent (dash, as in the SLURM test): the shell dies of the
    # signal at once (-15) while the engine writes its last checkpoint and exits.
    job_id = long_job(orch, tmp_path, every=10, step_s=0.03)
    op = orch.operator()
    w = start_worker(orch, tmp_path)
    before = wait_accepted(op, job_id, tmp_path)
    group = engine_group(w)
    assert group, why(tmp_path)
    os.killpg(group, signal.SIGTERM)  # the engine first, as when the signal reaches it first
    wait_for(lambda: not group_alive(group), 10, "the engine to exit on SIGTERM")
    w.send_signal(signal.SIGTERM)
    assert w.wait(30) == 0, f"worker exit status {w.returncode} ({why(tmp_path)})"
    d = op.get_job(job_id)
    kinds = [(e.kind, e.reason) for e in d.events]
    assert d.status == "queued" and d.failures == 0, f"{d.status}, failures {d.failures}: {kinds}"
    release = [e for e in d.events if e.kind == "release"]
    assert [e.reason for e in release] == ["signal SIGTERM"], kinds
    assert release[0].seq is not None and release[0].seq > (before.latest_checkpoint or 0), \
        f"released with checkpoint {release[0].seq}, not the engine's last ({kinds})"

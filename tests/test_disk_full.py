"""A worker whose scratch disk fills up (a real 4 MiB tmpfs as its workdir): the engine dies with
ENOSPC, the worker reports it and stays up, nothing accepted is lost, and the job finishes on
another worker from its last good checkpoint with the uninterrupted result."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RunningOrchestrator, make_settings
from .test_worker import (
    expected_result,
    final_result,
    start_worker,
    steps_done,
    submit_stepper,
    wait_for,
    why,
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[RunningOrchestrator]:
    settings = make_settings(tmp_path / "home", heartbeat_interval=0.3, heartbeat_timeout=2.0)
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()


def test_a_full_worker_disk_fails_the_attempt_and_the_job_resumes_elsewhere(
        orch: RunningOrchestrator, tmp_path: Path, small_disk: Path) -> None:
    total, pad_at = 40, 22
    job_id = submit_stepper(orch, tmp_path, total=total, every=5, step_s=0.05,
                            env={"PAD_AT": str(pad_at), "PAD_MB": "6"})
    op = orch.operator()
    w1 = start_worker(orch, tmp_path, "w1", RELAYMD_WORKER_WORKDIR=str(small_disk / "work"))
    assert w1.wait(60) == 0, f"the worker on the full disk crashed: {why(tmp_path, 'w1')}"
    d = op.get_job(job_id)
    assert (d.status, d.failures) == ("queued", 1), f"{d.status} {d.failures} {d.last_failure}"
    # The engine's own log may not have room for its traceback: the worker says why.
    assert d.last_failure is not None and "disk holding" in d.last_failure.reason \
        and "is full" in d.last_failure.reason, d.last_failure
    good = d.latest_checkpoint
    assert good, "no checkpoint was accepted before the disk filled"
    w2 = start_worker(orch, tmp_path, "w2")
    assert w2.wait(60) == 0, why(tmp_path, "w2")
    d = op.get_job(job_id)
    assert d.status == "completed", f"{d.status}: {d.last_failure}"
    assert final_result(orch, job_id, tmp_path) == {"x": expected_result(total), "n": total}
    # Attempt 1 computed pad_at steps; attempt 2 resumed from a checkpoint, not from step 0.
    assert steps_done(tmp_path, job_id) < pad_at + total, "attempt 2 started from scratch"
    wait_for(lambda: not list((small_disk / "work").glob("*")), 5,
             "the full worker to clean its job dir")


def test_a_full_orchestrator_disk_refuses_writes_with_503_keeps_reads_and_recovers(
        tmp_path: Path, small_disk: Path) -> None:
    """The database on a 4 MiB tmpfs filled to the last byte: every write is refused with a 503
    that says why (never a 500, never half-recorded), reads keep working, the file is never
    corrupted, and writes work again once there is room."""
    import sqlite3

    from relaymd.client import ApiError

    from .conftest import submit

    settings = make_settings(small_disk / "home", storage_url=f"file://{tmp_path / 'storage'}")
    running = RunningOrchestrator(settings).start()
    filler = small_disk / "filler"
    try:
        op = running.operator()
        first = submit(op, tmp_path, title="before")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * (64 << 10))
        except OSError:
            pass
        finally:
            os.close(fd)
        refused = None
        for i in range(200):  # the WAL may have a little room left in its last page
            try:
                submit(op, tmp_path, title=f"during-{i}")
            except ApiError as exc:
                refused = exc
                break
        assert refused is not None, "200 jobs created on a full disk"
        assert (refused.status, refused.code) == (503, "database_unavailable"), refused
        assert "free space" in refused.message
        jobs = op.all_jobs()  # reads keep working
        assert first in {j.id for j in jobs} and op.get_job(first).title == "before"
        filler.unlink()
        after = submit(op, tmp_path, title="after")
        assert op.get_job(after).status == "queued"
        with sqlite3.connect(settings.database_path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        filler.unlink(missing_ok=True)
        running.stop()

"""A storage outage in the middle of a job (s3:// through a link we cut): the engine keeps
running, the worker retries its uploads, the orchestrator keeps answering, and once the link is
back the job completes with exactly its uninterrupted result."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import test_worker
from .conftest import RunningOrchestrator, s3_settings
from .s3servers import CuttableTcpProxy, S3Server
from .test_worker import (
    expected_result,
    final_result,
    start_worker,
    steps_done,
    submit_stepper,
    wait_accepted,
    wait_for,
    why,
    worker_log,
)

no_leftover_processes = test_worker.no_leftover_processes  # autouse: ends what a test started


@pytest.fixture
def link(moto_server: S3Server) -> Iterator[CuttableTcpProxy]:
    proxy = CuttableTcpProxy(moto_server.url)
    yield proxy
    proxy.close()


@pytest.fixture
def orch(moto_server: S3Server, link: CuttableTcpProxy,
         tmp_path: Path) -> Iterator[RunningOrchestrator]:
    settings = s3_settings(moto_server, tmp_path / "home", heartbeat_interval=0.3,
                           heartbeat_timeout=2.0, s3_max_attempts=2)
    settings.s3_endpoint_url = link.url  # everyone reaches the bucket through the cuttable link
    settings.reap_interval = 0.3
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()


def test_a_storage_outage_mid_job_loses_nothing(orch: RunningOrchestrator, link: CuttableTcpProxy,
                                                tmp_path: Path) -> None:
    total = 100
    job_id = submit_stepper(orch, tmp_path, total=total, every=10, step_s=0.04)
    op = orch.operator()
    w = start_worker(orch, tmp_path)
    first = wait_accepted(op, job_id, tmp_path, timeout=30)
    link.cut()
    cut_at, steps_at_cut = time.time(), steps_done(tmp_path, job_id)
    wait_for(lambda: "upload checkpoint failed" in worker_log(tmp_path), 30,
             lambda: f"an upload to fail ({why(tmp_path)})")
    # the orchestrator keeps serving while storage is down
    during = op.get_job(job_id)
    assert during.status == "running", f"job is {during.status} during the outage"
    assert [j.id for j in op.all_jobs()] == [job_id]
    time.sleep(max(0.0, cut_at + 3 - time.time()))
    assert steps_done(tmp_path, job_id) > steps_at_cut, "the engine stopped during the outage"
    link.restore()
    done = wait_for(lambda: (d := op.get_job(job_id)).status in ("completed", "failed") and d, 90,
                    lambda: f"the job to finish after the outage ({why(tmp_path)})")
    assert done.status == "completed", f"{done.status}: {done.last_failure} ({why(tmp_path)})"
    assert (done.attempt, done.failures) == (1, 0), "the outage cost an attempt"
    assert done.latest_checkpoint is not None and first.latest_checkpoint is not None
    assert done.latest_checkpoint > first.latest_checkpoint
    assert final_result(orch, job_id, tmp_path) == {"x": expected_result(total), "n": total}
    assert w.wait(30) == 0, why(tmp_path)
    assert "Traceback" not in worker_log(tmp_path), "the outage produced a traceback"


def test_a_storage_outage_during_the_resume_download_waits_and_loses_nothing(
        orch: RunningOrchestrator, link: CuttableTcpProxy, tmp_path: Path) -> None:
    total = 40
    job_id = submit_stepper(orch, tmp_path, total=total, every=10, step_s=0.02)
    op = orch.operator()
    w1 = start_worker(orch, tmp_path, "w1")
    wait_accepted(op, job_id, tmp_path, "w1", timeout=30)
    w1.terminate()  # a hand-off: the next worker must download bundle + checkpoint
    assert w1.wait(30) == 0
    released = op.get_job(job_id)
    assert released.status == "queued" and released.latest_checkpoint, released.status
    link.cut()
    w2 = start_worker(orch, tmp_path, "w2")
    wait_for(lambda: "download bundle failed" in worker_log(tmp_path, "w2")
             or "download checkpoint failed" in worker_log(tmp_path, "w2"), 30,
             lambda: f"a download to fail while storage is down ({why(tmp_path, 'w2')})")
    assert op.get_job(job_id).status in ("assigned", "running")
    time.sleep(1.0)
    link.restore()
    assert w2.wait(90) == 0, why(tmp_path, "w2")
    done = op.get_job(job_id)
    assert (done.status, done.failures) == ("completed", 0), f"{done.status}: {done.last_failure}"
    assert final_result(orch, job_id, tmp_path) == {"x": expected_result(total), "n": total}
    assert steps_done(tmp_path, job_id) < 2 * total, "the second attempt started from scratch"

"""A job's whole life driven over HTTP by a scripted worker against the real server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from relaymd.client import ApiError
from relaymd.models import CheckpointReport, Progress
from relaymd.storage import open_storage

from .conftest import RunningOrchestrator, submit


def upload_checkpoint(server: RunningOrchestrator, key: str, data: bytes) -> CheckpointReport:
    storage = open_storage(server.settings.storage)
    info = storage.put_bytes(key, data)
    return info


def test_claim_heartbeat_checkpoint_complete(server: RunningOrchestrator, tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path, title="villin")
    assert op.get_job(job_id[:6]).status == "queued"

    w, wid = server.worker()
    assignment = w.claim()
    assert assignment is not None and assignment.job.id == job_id
    assert assignment.attempt == 1 and assignment.checkpoint_key is None
    assert op.get_job(job_id).status == "assigned"

    assert w.heartbeat(wid, job_id, 1, Progress(done=1, total=10, unit="ns")).directive == "continue"
    assert op.get_job(job_id).status == "running"

    reserved = w.reserve_checkpoint(job_id, 1)
    data = b"checkpoint-1"
    upload_checkpoint(server, reserved.key, data)
    job = w.report_checkpoint(job_id, CheckpointReport(
        attempt=1, seq=reserved.seq, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
        progress=Progress(done=2, total=10, unit="ns")))
    assert job.latest_checkpoint == reserved.seq and job.checkpoints == 1

    done = w.complete(job_id, 1)
    assert done.status == "completed"
    detail = op.get_job(job_id)
    kinds = [e.kind for e in detail.events]
    assert kinds == ["submit", "claim", "start", "checkpoint", "complete"]
    assert [c.seq for c in detail.checkpoint_list] == [reserved.seq]
    assert {wk.id: wk.status for wk in op.workers()}[wid] == "idle"
    assert w.claim() is None


def test_release_hands_back_checkpoint_and_next_claim_resumes(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    w1, _ = server.worker()
    a1 = w1.claim()
    assert a1 is not None
    r = w1.reserve_checkpoint(job_id, 1)
    data = b"state at 3 ns"
    upload_checkpoint(server, r.key, data)
    rep = CheckpointReport(attempt=1, seq=r.seq, sha256=hashlib.sha256(data).hexdigest(),
                           size=len(data))
    job = w1.release(job_id, 1, "allocation ending", rep)
    assert job.status == "queued" and job.failures == 0 and job.latest_checkpoint == r.seq

    w2, _ = server.worker()
    a2 = w2.claim()
    assert a2 is not None and a2.attempt == 2
    assert a2.checkpoint_key == r.key and a2.checkpoint_sha256 == rep.sha256

    # the first worker's lease is gone: any callback with attempt 1 is a typed 409
    with pytest.raises(ApiError) as err:
        w1.complete(job_id, 1)
    assert err.value.status == 409
    assert err.value.body == {
        "error": "job_transition_conflict", "job_id": job_id, "from": "assigned",
        "to": "completed", "attempt": 2, "message": err.value.body["message"]}


def test_job_listing_follows_every_change(server: RunningOrchestrator, tmp_path: Path) -> None:
    """The listing serves cached per-job JSON: each change of row or progress must show."""
    op = server.operator()
    job_id = submit(op, tmp_path, title="listed")
    other = submit(op, tmp_path, title="untouched")

    def listed() -> dict[str, object]:
        return {j.id: j for j in op.list_jobs().jobs}

    first = listed()
    assert first[job_id].status == "queued" and first[job_id].progress is None
    w, wid = server.worker()
    assignment = w.claim()
    assert assignment is not None
    claimed = assignment.job.id
    assert listed()[claimed].status == "assigned" and listed()[claimed].worker_id == wid
    w.heartbeat(wid, claimed, 1, Progress(done=1, total=10, unit="ns"))
    now = listed()[claimed]
    assert now.status == "running" and now.progress is not None and now.progress.done == 1
    w.heartbeat(wid, claimed, 1, Progress(done=2, total=10, unit="ns"))
    assert listed()[claimed].progress.done == 2, "listing kept stale progress"
    op.cancel(claimed)
    assert listed()[claimed].status == "cancelled"
    untouched = other if claimed == job_id else job_id
    assert listed()[untouched].model_dump() == first[untouched].model_dump()

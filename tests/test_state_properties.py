"""Property test: any interleaving of worker and operator actions keeps the job/worker books
consistent — no job held by two workers, every lease mirrored on its worker, attempts only grow."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaymd.models import CheckpointReport
from relaymd.server.store import Store
from relaymd.server.transitions import (
    InvalidCheckpoint,
    JobNotFound,
    StateMachine,
    TransitionConflict,
    WorkerConflict,
)

WORKERS = [c * 32 for c in "wxyz"]
JOBS = [c * 32 for c in "abc"]
ACTIONS = ["claim", "start", "checkpoint", "release", "complete", "fail", "cancel", "requeue",
           "lose", "stale", "revive"]
op = st.tuples(st.sampled_from(ACTIONS), st.integers(0, len(WORKERS) - 1),
               st.integers(0, len(JOBS) - 1), st.integers(0, 3))


async def run_ops(path: Path, ops: list[tuple[str, int, int, int]]) -> None:
    store = Store(path)
    await store.open()
    m = StateMachine(store, clock=lambda: 1.0, quarantine_after=2)
    try:
        for w in WORKERS:
            await store.run(store.insert_worker, {"id": w, "status": "idle", "gpus": 1,
                                                  "registered_at": 1.0, "token_hash": w}, {})
        for j in JOBS:
            await store.run(store.insert_job, {
                "id": j, "title": "", "status": "queued", "command": "x", "spec": "{}",
                "gpus": 1, "max_attempts": 2, "created_at": 1.0, "bundle_sha256": "",
                "bundle_size": 0}, {})
        attempts = {j: 0 for j in JOBS}
        for action, wi, ji, delta in ops:
            w, j = WORKERS[wi], JOBS[ji]
            job = await store.run(store.get_job, j)
            attempt = max(1, job["attempt"] - (delta == 3))  # sometimes a stale attempt
            try:
                if action == "claim":
                    await m.claim(w, 1)
                elif action == "start":
                    await m.start(j, w, attempt)
                elif action == "checkpoint":
                    seq = await m.reserve_checkpoint(j, w, attempt)
                    await m.accept_checkpoint(j, w, CheckpointReport(
                        attempt=attempt, seq=seq, sha256="0" * 64, size=1))
                elif action == "release":
                    await m.release(j, w, attempt, "handoff")
                elif action == "complete":
                    await m.complete(j, w, attempt)
                elif action == "fail":
                    await m.fail(j, w, attempt, 1, "boom", "")
                elif action == "cancel":
                    await m.cancel(j)
                elif action == "requeue":
                    await m.requeue(j)
                elif action == "lose":
                    await m.lose(j, w, attempt, "silent")
                elif action == "stale":
                    await m.change_worker(w, "stale", "silent", job_id=None)
                elif action == "revive":
                    await m.change_worker(w, "revive", "back")
            except (TransitionConflict, InvalidCheckpoint, JobNotFound, WorkerConflict):
                pass
            await check(store, attempts)
    finally:
        await store.close()


async def check(store: Store, attempts: dict[str, int]) -> None:
    jobs = {j["id"]: j for j in (await store.run(store.list_jobs, None, 100, None))[0]}
    workers = {w["id"]: w for w in await store.run(store.list_workers)}
    holders: dict[str, str] = {}
    for w in workers.values():
        if w["status"] == "busy":
            job = jobs[w["job_id"]]
            assert job["worker_id"] == w["id"], f"busy worker {w['id'][:1]} not mirrored"
            assert w["job_id"] not in holders, "job held by two workers"
            holders[w["job_id"]] = w["id"]
        else:
            assert w["job_id"] is None or jobs[w["job_id"]]["status"] not in (
                "assigned", "running") or w["status"] == "stale", "idle worker holds a lease"
    for j in jobs.values():
        assert j["attempt"] >= attempts[j["id"]], "attempt went backwards"
        attempts[j["id"]] = j["attempt"]
        assert j["failures"] <= j["max_attempts"]
        if j["status"] == "queued":
            assert j["worker_id"] is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=40))
def test_any_interleaving_keeps_books_consistent(ops: list[tuple[str, int, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run_ops(Path(tmp) / "p.db", ops))

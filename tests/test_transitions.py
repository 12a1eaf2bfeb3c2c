"""Every allowed and every forbidden job transition, applied to a real SQLite store."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from relaymd.models import CheckpointReport, JobStatus, WorkerStatus
from relaymd.server.store import JobChange, Store
from relaymd.server.transitions import (
    JOB_ACTIONS,
    JOB_EDGES,
    WORKER_ACTIONS,
    WORKER_EDGES,
    StateMachine,
    TransitionConflict,
    job_transition_allowed,
)

S = JobStatus
# Written out by hand so that a change to the table in transitions.py must be a deliberate one.
EXPECTED_EDGES = {
    (S.queued, S.assigned), (S.assigned, S.running), (S.running, S.running),
    (S.assigned, S.queued), (S.running, S.queued), (S.failed, S.queued),
    (S.cancelled, S.queued), (S.assigned, S.completed), (S.running, S.completed),
    (S.assigned, S.failed), (S.running, S.failed), (S.queued, S.cancelled),
    (S.assigned, S.cancelled), (S.running, S.cancelled),
}
JOB = "a" * 32
WORKER = "w" * 32


def test_edge_table_is_exactly_the_design() -> None:
    assert set(JOB_EDGES) == EXPECTED_EDGES
    for src, dst in itertools.product(S, S):
        assert job_transition_allowed(src, dst) == ((src, dst) in EXPECTED_EDGES)
    # nothing leaves completed; terminal states only go back to the queue
    assert not any(src == S.completed for src, _ in JOB_EDGES)
    assert {dst for src, dst in JOB_EDGES if src in (S.failed, S.cancelled)} == {S.queued}


def test_worker_edges() -> None:
    W = WorkerStatus
    assert (W.idle, W.busy) in WORKER_EDGES and (W.busy, W.idle) in WORKER_EDGES
    assert (W.stale, W.idle) in WORKER_EDGES and (W.gone, W.idle) not in WORKER_EDGES
    assert not any(src == W.gone for src, _ in WORKER_EDGES)
    assert WORKER_ACTIONS["activate"] == (frozenset({W.provisioning}), W.idle)


@pytest.fixture
async def machine(tmp_path: Path):
    store = Store(tmp_path / "t.db")
    await store.open()
    yield StateMachine(store, clock=lambda: 1000.0, quarantine_after=3)
    await store.close()


async def seed(m: StateMachine, status: S, *, attempt: int = 1, failures: int = 0,
               max_attempts: int = 3, next_seq: int = 1) -> None:
    leased = status in (S.assigned, S.running)
    await m.store.run(m.store.insert_worker, {
        "id": WORKER, "status": "busy" if leased else "idle", "registered_at": 1.0,
        "job_id": JOB if leased else None, "gpus": 1, "token_hash": "h"}, {})
    await m.store.run(m.store.insert_job, {
        "id": JOB, "title": "", "status": str(status), "command": "x", "spec": "{}",
        "gpus": 0, "max_attempts": max_attempts, "attempt": attempt, "failures": failures,
        "worker_id": WORKER if status != S.queued else None, "created_at": 1.0,
        "bundle_sha256": "", "bundle_size": 0, "next_seq": next_seq}, {})


async def act(m: StateMachine, action: str) -> dict[str, Any] | None:
    cp = CheckpointReport(attempt=1, seq=1, sha256="0" * 64, size=1)
    calls = {
        "claim": lambda: m.claim(WORKER, 1),
        "start": lambda: m.start(JOB, WORKER, 1),
        "checkpoint": lambda: m.accept_checkpoint(JOB, WORKER, cp),
        "release": lambda: m.release(JOB, WORKER, 1, "handoff"),
        "lose": lambda: m.lose(JOB, WORKER, 1, "silent"),
        "requeue": lambda: m.requeue(JOB),
        "complete": lambda: m.complete(JOB, WORKER, 1),
        "fail": lambda: m.fail(JOB, WORKER, 1, 1, "boom", "tail"),
        "cancel": lambda: m.cancel(JOB),
    }
    return await calls[action]()


@pytest.mark.parametrize("action", sorted(JOB_ACTIONS))
@pytest.mark.parametrize("src", list(S))
async def test_every_action_from_every_state(machine: StateMachine, action: str, src: S) -> None:
    await seed(machine, src, next_seq=2)
    before = await machine.store.run(machine.store.get_job, JOB)
    events_before = await machine.store.run(machine.store.list_events, JOB)
    allowed_from, allowed_to = JOB_ACTIONS[action]
    if action == "claim":
        # claim picks a queued job for an idle worker; the worker is idle only when unleased
        row = await act(machine, action)
        assert (row is not None) == (src == S.queued)
        if row is not None:
            assert row["status"] == S.assigned and row["attempt"] == 2
        return
    if src in allowed_from:
        row = await act(machine, action)
        assert row is not None and row["status"] in allowed_to
        events = await machine.store.run(machine.store.list_events, JOB)
        assert len(events) == len(events_before) + 1
        assert events[-1]["from_status"] == src and events[-1]["to_status"] == row["status"]
    else:
        with pytest.raises(TransitionConflict) as err:
            await act(machine, action)
        assert err.value.current == src and err.value.attempt == 1
        after = await machine.store.run(machine.store.get_job, JOB)
        assert after == before  # nothing written
        assert await machine.store.run(machine.store.list_events, JOB) == events_before


@pytest.mark.parametrize("action", ["start", "checkpoint", "release", "complete", "fail", "lose"])
async def test_stale_attempt_is_fenced(machine: StateMachine, action: str) -> None:
    await seed(machine, S.assigned if action == "start" else S.running, attempt=2, next_seq=2)
    with pytest.raises(TransitionConflict) as err:
        # every worker callback here carries attempt 1 while the job is on attempt 2
        await act(machine, action)
    assert err.value.attempt == 2 and "stale" in err.value.message
    assert (await machine.store.run(machine.store.get_job, JOB))["attempt"] == 2


async def test_losing_a_job_whose_worker_still_looks_busy_marks_that_worker_stale(
        machine: StateMachine) -> None:
    """lose() on a lease whose worker row still says busy (found by the property test): the
    worker must not stay busy with a job that no longer names it."""
    await seed(machine, S.running)
    row = await machine.lose(JOB, WORKER, 1, "silent")
    assert row["status"] == S.queued and row["worker_id"] is None
    worker = await machine.store.run(machine.store.get_worker, WORKER)
    assert (worker["status"], worker["job_id"]) == ("stale", None), dict(worker)


async def test_other_worker_is_fenced(machine: StateMachine) -> None:
    await seed(machine, S.running)
    with pytest.raises(TransitionConflict):
        await machine.complete(JOB, "x" * 32, 1)


async def test_fail_requeues_until_budget_spent(machine: StateMachine) -> None:
    await seed(machine, S.running, failures=1, max_attempts=3)
    row = await machine.fail(JOB, WORKER, 1, 2, "exit 2", "")
    assert row["status"] == S.queued and row["failures"] == 2 and row["worker_id"] is None
    worker = await machine.store.run(machine.store.get_worker, WORKER)
    assert worker["status"] == "idle" and worker["job_id"] is None
    assert worker["consecutive_failures"] == 1


async def test_last_failure_fails_the_job_for_good(machine: StateMachine) -> None:
    await seed(machine, S.running, failures=2, max_attempts=3)
    row = await machine.fail(JOB, WORKER, 1, 2, "exit 2", "Traceback")
    assert row["status"] == S.failed and row["failures"] == 3 and row["finished_at"] == 1000.0


async def test_interruptions_do_not_use_the_failure_budget(machine: StateMachine) -> None:
    await seed(machine, S.running, failures=2, max_attempts=3)
    row = await machine.release(JOB, WORKER, 1, "wall time")
    assert row["status"] == S.queued and row["failures"] == 2


async def test_requeue_of_failed_job_grants_fresh_budget(machine: StateMachine) -> None:
    await seed(machine, S.failed, failures=3)
    row = await machine.requeue(JOB)
    assert row["status"] == S.queued and row["failures"] == 0


async def test_checkpoint_seq_must_be_reserved_and_newer(machine: StateMachine) -> None:
    from relaymd.server.transitions import InvalidCheckpoint

    await seed(machine, S.running)
    seq = await machine.reserve_checkpoint(JOB, WORKER, 1)
    assert seq == 1
    report = CheckpointReport(attempt=1, seq=2, sha256="0" * 64, size=1)
    with pytest.raises(InvalidCheckpoint):  # 2 was never reserved
        await machine.accept_checkpoint(JOB, WORKER, report)
    ok = await machine.accept_checkpoint(JOB, WORKER, report.model_copy(update={"seq": 1}))
    assert ok["latest_checkpoint"] == 1 and ok["checkpoints"] == 1
    with pytest.raises(InvalidCheckpoint):  # not newer than the latest accepted
        await machine.accept_checkpoint(JOB, WORKER, report.model_copy(update={"seq": 1}))


async def test_quarantine_after_repeated_failures(machine: StateMachine) -> None:
    await seed(machine, S.running, max_attempts=100)
    for i in range(3):
        await machine.store.run(machine.store.change_job, JobChange(
            job_id=JOB, from_states=["queued"], to_status="running",
            set_fields={"worker_id": WORKER, "attempt": i + 1}))
        await machine.store.run(machine.store.change_worker, WORKER, ["idle"],
                                {"status": "busy", "job_id": JOB}, {})
        await machine.fail(JOB, WORKER, i + 1, 1, "boom", "")
    worker = await machine.store.run(machine.store.get_worker, WORKER)
    assert worker["status"] == "quarantined" and worker["consecutive_failures"] == 3

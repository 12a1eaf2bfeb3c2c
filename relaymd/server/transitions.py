"""The job and worker state machine: the single authority for every state change.

Each change is one conditional UPDATE (status, and for worker callbacks the (worker, attempt)
lease) executed by the store together with an event row. A change whose conditions do not hold
writes nothing and raises `TransitionConflict`, which the API turns into a typed 409.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from relaymd.models import (
    LEASED_JOB_STATES,
    CheckpointReport,
    JobStatus,
    WorkerStatus,
)
from relaymd.server.errors import InvalidCheckpoint, JobNotFound, TransitionConflict, WorkerConflict
from relaymd.server.scheduling import Rival
from relaymd.server.store import (
    KEEP,
    ClaimMove,
    IfNull,
    Increment,
    JobChange,
    OnLimit,
    Store,
    Swap,
    WorkerUpdate,
    dumps,
)
from relaymd.storage import checkpoint_key

Q, A, R = JobStatus.queued, JobStatus.assigned, JobStatus.running
DONE, FAILED, CANCELLED = JobStatus.completed, JobStatus.failed, JobStatus.cancelled

# action -> (states it may start from, states it may end in)
JOB_ACTIONS: dict[str, tuple[frozenset[JobStatus], frozenset[JobStatus]]] = {
    "claim": (frozenset({Q}), frozenset({A})),
    "start": (frozenset({A}), frozenset({R})),
    "checkpoint": (frozenset({A, R}), frozenset({R})),
    "release": (frozenset({A, R}), frozenset({Q})),  # handoff before the allocation ends
    "lose": (frozenset({A, R}), frozenset({Q})),  # worker silent, deregistered or gone
    "requeue": (frozenset({A, R, FAILED, CANCELLED}), frozenset({Q})),  # operator
    "complete": (frozenset({A, R}), frozenset({DONE})),
    "fail": (frozenset({A, R}), frozenset({Q, FAILED})),  # requeued while budget remains
    "cancel": (frozenset({Q, A, R}), frozenset({CANCELLED})),
}
JOB_EDGES: frozenset[tuple[JobStatus, JobStatus]] = frozenset(
    (f, t) for froms, tos in JOB_ACTIONS.values() for f in froms for t in tos
)

W = WorkerStatus
WORKER_ACTIONS: dict[str, tuple[frozenset[WorkerStatus], WorkerStatus]] = {
    "activate": (frozenset({W.provisioning}), W.idle),  # a placeholder's worker registered
    "claim": (frozenset({W.idle}), W.busy),
    "free": (frozenset({W.busy}), W.idle),
    "stale": (frozenset({W.idle, W.busy}), W.stale),
    "revive": (frozenset({W.stale}), W.idle),
    "quarantine": (frozenset({W.idle, W.busy}), W.quarantined),
    "deregister": (frozenset({W.provisioning, W.idle, W.busy, W.stale, W.quarantined}), W.gone),
}
WORKER_EDGES: frozenset[tuple[WorkerStatus, WorkerStatus]] = frozenset(
    (f, t) for froms, t in WORKER_ACTIONS.values() for f in froms
)


def job_transition_allowed(src: JobStatus, dst: JobStatus) -> bool:
    return (src, dst) in JOB_EDGES


def _states(states: frozenset[Any]) -> list[str]:
    return sorted(str(s) for s in states)


# The claim moves a queued job to assigned and its idle worker to busy, in one write.
(_claim_from,), (_claim_to,) = JOB_ACTIONS["claim"]
CLAIM = ClaimMove(job_from=str(_claim_from), job_to=str(_claim_to),
                  worker_from=tuple(_states(WORKER_ACTIONS["claim"][0])),
                  worker_to=str(WORKER_ACTIONS["claim"][1]))


class StateMachine:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time,
                 quarantine_after: int = 3) -> None:
        self.store = store
        self.clock = clock
        self.quarantine_after = quarantine_after

    # ------------------------------------------------------------------ core

    async def _change(self, action: str, change: JobChange, to_label: str | None = None) -> dict[str, Any]:
        ok, row = await self.store.aio.change_job(change)
        if ok:
            assert row is not None
            return row
        raise self._conflict(action, change, row, to_label)

    @staticmethod
    def _conflict(action: str, change: JobChange, row: dict[str, Any] | None,
                  to_label: str | None = None) -> Exception:
        """Why `change` did not apply to the job as it is now (`row`): the typed 409."""
        if row is None:
            return JobNotFound(change.job_id)
        to = to_label or "/".join(_states(JOB_ACTIONS[action][1]))
        status = row["status"]
        if status not in {str(s) for s in JOB_ACTIONS[action][0]}:
            why = f"job {change.job_id[:8]} is {status}; cannot {action} it"
        elif change.attempt is not None and row["attempt"] != change.attempt:
            why = (f"job {change.job_id[:8]}: attempt {change.attempt} is stale "
                   f"(current attempt is {row['attempt']}); stop working on it")
        elif change.worker_id is not None and row["worker_id"] != change.worker_id:
            why = f"job {change.job_id[:8]} is not held by worker {change.worker_id[:8]}"
        else:
            why = f"job {change.job_id[:8]}: {action} refused"
        return TransitionConflict(change.job_id, status, to, row["attempt"], why)

    def _event(self, kind: str, reason: str = "", worker_id: str | None = None,
               **extra: Any) -> dict[str, Any]:
        return {"kind": kind, "reason": reason, "worker_id": worker_id, "at": self.clock(), **extra}

    def _leased(self, action: str, job_id: str, worker_id: str, attempt: int,
                to_status: str | OnLimit, **kw: Any) -> JobChange:
        return JobChange(job_id=job_id, from_states=_states(JOB_ACTIONS[action][0]),
                         to_status=to_status, attempt=attempt, worker_id=worker_id, **kw)

    def _free_worker(self, worker_id: str, job_id: str, **fields: Any) -> WorkerUpdate:
        """The job's worker is idle again (unless `fields` say otherwise), if it still holds it."""
        free = str(WORKER_ACTIONS["free"][1])
        return WorkerUpdate(worker_id, {"status": free, "job_id": None, **fields},
                            holding=job_id)

    # ------------------------------------------------------------------ worker-driven

    async def claim(self, worker_id: str, gpus: int, cluster: str = "",
                    better: Sequence[Rival] = (),
                    trusted: bool = True) -> dict[str, Any] | None:
        now = self.clock()
        return await self.store.aio.claim_next(
            worker_id, gpus, CLAIM,
            {"attempt": Increment(), "worker_id": worker_id, "updated_at": now,
             "progress": None, "blocked_reason": None},
            now, {"kind": "claim", "worker_id": worker_id, "from_status": CLAIM.job_from,
                  "to_status": CLAIM.job_to, "reason": "claimed"},
            {}, cluster, better, trusted,
        )

    async def start(self, job_id: str, worker_id: str, attempt: int) -> dict[str, Any]:
        now = self.clock()
        return await self._change("start", self._leased(
            "start", job_id, worker_id, attempt, str(R),
            set_fields={"updated_at": now, "started_at": IfNull(now)},
            event=self._event("start", "engine started", worker_id, attempt=attempt)))

    def _checkpoint_parts(
            self, job_id: str, worker_id: str, report: CheckpointReport, trusted: bool = True,
    ) -> tuple[dict[str, Any], tuple[str, dict[str, Any]]]:
        now = self.clock()
        fields = {
            "latest_checkpoint": report.seq, "checkpoints": Increment(),
            "last_checkpoint_at": now, "updated_at": now,
        }
        if report.progress is not None:
            fields["progress"] = dumps(report.progress.model_dump())
        insert = ("checkpoints", {
            "job_id": job_id, "seq": report.seq, "key": checkpoint_key(job_id, report.seq),
            "sha256": report.sha256, "size": report.size, "attempt": report.attempt,
            "worker_id": worker_id, "created_at": now,
            "progress": dumps(report.progress.model_dump()) if report.progress else None,
            "untrusted": 0 if trusted else 1,
        })
        return fields, insert

    async def _with_checkpoint(self, action: str, job_id: str, worker_id: str,
                               report: CheckpointReport | None, change: JobChange,
                               trusted: bool = True) -> dict[str, Any]:
        if report is not None:
            if report.attempt != change.attempt:
                raise InvalidCheckpoint("checkpoint attempt differs from the request's attempt")
            fields, insert = self._checkpoint_parts(job_id, worker_id, report, trusted)
            change.set_fields = {**fields, **change.set_fields}
            change.checkpoint_seq = report.seq
            change.inserts.append(insert)
            change.event["seq"] = report.seq
        try:
            return await self._change(action, change)
        except TransitionConflict as exc:
            if report is not None and exc.current in {str(s) for s in LEASED_JOB_STATES} \
                    and exc.attempt == report.attempt:
                row = await self.store.aio.get_job(job_id)
                if row and row["worker_id"] == worker_id:
                    raise InvalidCheckpoint(
                        f"job {job_id[:8]}: checkpoint {report.seq} was not reserved or is not "
                        f"newer than the latest accepted ({row['latest_checkpoint']})") from None
            raise

    async def reserve_checkpoint(self, job_id: str, worker_id: str, attempt: int) -> int:
        seq = await self.store.aio.reserve_checkpoint_seq(job_id, worker_id, attempt,
                                                        _states(LEASED_JOB_STATES))
        if seq is not None:
            return seq
        row = await self.store.aio.get_job(job_id)  # say why, from the job as it is now
        raise self._conflict("checkpoint", self._leased(
            "checkpoint", job_id, worker_id, attempt, str(R)), row)

    async def accept_checkpoint(self, job_id: str, worker_id: str,
                                report: CheckpointReport, trusted: bool = True) -> dict[str, Any]:
        change = self._leased("checkpoint", job_id, worker_id, report.attempt, str(R),
                              event=self._event("checkpoint", f"checkpoint {report.seq} accepted",
                                                worker_id, attempt=report.attempt))
        return await self._with_checkpoint("checkpoint", job_id, worker_id, report, change,
                                           trusted)

    async def release(self, job_id: str, worker_id: str, attempt: int, reason: str,
                      report: CheckpointReport | None = None,
                      trusted: bool = True) -> dict[str, Any]:
        now = self.clock()
        change = self._leased(
            "release", job_id, worker_id, attempt, str(Q),
            set_fields={"worker_id": None, "updated_at": now},
            worker_update=self._free_worker(worker_id, job_id),
            event=self._event("release", reason, worker_id, attempt=attempt))
        return await self._with_checkpoint("release", job_id, worker_id, report, change, trusted)

    async def complete(self, job_id: str, worker_id: str, attempt: int,
                       report: CheckpointReport | None = None,
                       trusted: bool = True) -> dict[str, Any]:
        now = self.clock()
        change = self._leased(
            "complete", job_id, worker_id, attempt, str(DONE),
            set_fields={"updated_at": now, "finished_at": now},
            worker_update=self._free_worker(worker_id, job_id, consecutive_failures=0),
            event=self._event("complete", "engine finished", worker_id, attempt=attempt))
        return await self._with_checkpoint("complete", job_id, worker_id, report, change,
                                           trusted)

    async def fail(self, job_id: str, worker_id: str, attempt: int, exit_code: int | None,
                   reason: str, log_tail: str) -> dict[str, Any]:
        now = self.clock()
        failure = {"attempt": attempt, "exit_code": exit_code, "reason": reason,
                   "log_tail": log_tail, "at": now}
        # The failure that exhausts the job's budget fails it (keeping its worker on record);
        # any other requeues it. The worker's own failure streak may quarantine it.
        failed, requeued = FAILED, Q  # the two ends JOB_ACTIONS["fail"] allows
        budget_spent = partial(OnLimit, "failures", "max_attempts")
        streak_over = partial(OnLimit, "consecutive_failures", int(self.quarantine_after))
        return await self._change("fail", self._leased(
            "fail", job_id, worker_id, attempt, budget_spent(str(failed), str(requeued)),
            set_fields={
                "failures": Increment(), "last_failure": dumps(failure),
                "worker_id": budget_spent(KEEP, None), "updated_at": now,
                "finished_at": budget_spent(now, None),
            },
            worker_update=self._free_worker(
                worker_id, job_id, consecutive_failures=Increment(),
                status=streak_over(str(WORKER_ACTIONS["quarantine"][1]),
                                   str(WORKER_ACTIONS["free"][1]))),
            event=self._event("fail", reason, worker_id, attempt=attempt)))

    # ------------------------------------------------------------------ operator / reaper

    async def cancel(self, job_id: str, reason: str = "cancelled by operator") -> dict[str, Any]:
        now = self.clock()
        job = await self._get(job_id)
        holder = job["worker_id"] if job["status"] in LEASED_JOB_STATES else None
        return await self._change("cancel", JobChange(
            job_id=job_id, from_states=_states(JOB_ACTIONS["cancel"][0]), to_status=str(CANCELLED),
            attempt=job["attempt"],
            set_fields={"updated_at": now, "finished_at": now},
            worker_update=self._free_worker(holder, job_id) if holder else None,
            event=self._event("cancel", reason, holder, attempt=job["attempt"])))

    async def requeue(self, job_id: str, reason: str = "requeued by operator") -> dict[str, Any]:
        now = self.clock()
        job = await self._get(job_id)
        holder = job["worker_id"] if job["status"] in LEASED_JOB_STATES else None
        fields: dict[str, Any] = {"worker_id": None, "updated_at": now, "finished_at": None}
        if job["status"] in (FAILED, CANCELLED):
            fields["failures"] = 0  # an operator's requeue grants a fresh failure budget
        return await self._change("requeue", JobChange(
            job_id=job_id, from_states=_states(JOB_ACTIONS["requeue"][0]), to_status=str(Q),
            attempt=job["attempt"], set_fields=fields,
            worker_update=self._free_worker(holder, job_id) if holder else None,
            event=self._event("requeue", reason, holder, attempt=job["attempt"])))

    async def lose(self, job_id: str, worker_id: str, attempt: int, reason: str) -> dict[str, Any]:
        """A worker vanished: its job goes back to the queue, failure budget untouched."""
        now = self.clock()
        return await self._change("lose", self._leased(
            "lose", job_id, worker_id, attempt, str(Q),
            set_fields={"worker_id": None, "updated_at": now},
            # a worker still marked busy with this job is the one that vanished: stale, not busy
            worker_update=self._free_worker(
                worker_id, job_id,
                status=Swap(str(W.busy), str(WORKER_ACTIONS["stale"][1]))),
            event=self._event("lose", reason, worker_id, attempt=attempt)))

    async def reject_checkpoint(self, job_id: str, worker_id: str, attempt: int, seq: int,
                                reason: str) -> dict[str, Any]:
        """The lease holder found accepted checkpoint `seq` corrupt: forget it (the job's state
        is unchanged; its resume point falls back to the newest good checkpoint)."""
        row = await self.store.aio.reject_checkpoint(job_id, worker_id, attempt, seq,
                                   self._event("checkpoint_rejected", reason, worker_id,
                                               attempt=attempt))
        if row is not None:
            return row
        job = await self._get(job_id)
        raise TransitionConflict(job_id, job["status"], job["status"], job["attempt"],
                                 f"job {job_id[:8]}: attempt {attempt} of worker {worker_id[:8]} "
                                 "does not hold it; cannot reject its checkpoints")

    async def _get(self, job_id: str) -> dict[str, Any]:
        job = await self.store.aio.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def create_job(self, row: dict[str, Any]) -> dict[str, Any]:
        """A submitted job: born queued."""
        return await self.store.aio.insert_job(
            {**row, "status": str(Q)},
            {"job_id": row["id"], "kind": "submit", "to_status": str(Q), "reason": "submitted",
             "at": row["created_at"], "attempt": 0})

    async def register_worker(self, row: dict[str, Any], reason: str,
                              cap: int | None = None) -> dict[str, Any]:
        """A new worker, born `idle` (the target of `activate`), or its placeholder activated
        (`provisioning` -> `idle`) when one of its cluster has its provider id."""
        froms, to = WORKER_ACTIONS["activate"]
        (placeholder,) = froms
        return await self.store.aio.register_worker(
            {**row, "status": str(to)},
            {"kind": "worker_register", "to_status": str(to), "reason": reason,
             "at": row["registered_at"]}, cap, str(placeholder))

    async def add_placeholder(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        """A requested worker (an sbatch job, a Salad replica): `provisioning` until its worker
        registers and activates it."""
        (placeholder,) = WORKER_ACTIONS["activate"][0]
        return await self.store.aio.insert_worker(
            {**row, "status": str(placeholder)},
            {"kind": "worker_provision", "worker_id": row["id"], "to_status": str(placeholder),
             "reason": reason, "at": row["registered_at"]})

    async def change_worker(self, worker_id: str, action: str, reason: str,
                            **fields: Any) -> dict[str, Any]:
        froms, to = WORKER_ACTIONS[action]
        row = await self.store.aio.change_worker(worker_id, _states(froms), {"status": str(to), **fields},
            self._event(f"worker_{action}", reason, worker_id, to_status=str(to)))
        if row is None:
            raise WorkerConflict(f"worker {worker_id[:8]}: cannot {action} it now")
        return row

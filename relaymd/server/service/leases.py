"""Leases, for workers: heartbeat, claim, checkpoints, and settling a job (release,
complete, fail)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from relaymd.config import DEFAULT_CLUSTER_PRIORITY
from relaymd.models import (
    LEASED_JOB_STATES,
    Assignment,
    BundleSpec,
    CheckpointRef,
    CheckpointReport,
    CheckpointReserved,
    HeartbeatReply,
    Job,
    JobStatus,
    WorkerStatus,
)
from relaymd.server import scheduling
from relaymd.server.service.base import BadRequest, Forbidden, NotFound, ServiceBase
from relaymd.server.transitions import JobNotFound, TransitionConflict, WorkerConflict
from relaymd.server.views import job_from_row
from relaymd.storage import ObjectNotFound, bundle_key, checkpoint_key, manifest_key
from relaymd.storage.checkpoints import checkpoint_refusal, manifest_files

log = logging.getLogger(__name__)


class LeaseOps(ServiceBase):
    async def heartbeat(self, worker_id: str, job_id: str | None, attempt: int | None,
                        progress: dict[str, Any] | None) -> HeartbeatReply:
        self.last_seen[worker_id] = self.clock()
        if job_id is not None and attempt is None:
            raise BadRequest("heartbeat with job_id needs its attempt")
        status, job = self.store.heartbeat_view(worker_id, job_id)
        if status is None or status == WorkerStatus.gone:
            return HeartbeatReply(directive="exit", reason="worker is deregistered")
        if status == WorkerStatus.quarantined:
            return HeartbeatReply(directive="exit",
                                  reason="worker quarantined after repeated job failures")
        if status == WorkerStatus.stale:
            await self.machine.change_worker(worker_id, "revive", "heartbeat after silence")
            self.changed("workers", worker_id)
        if job_id is None:
            if status == WorkerStatus.busy:
                await self._drop_forgotten_job(worker_id)
            return HeartbeatReply()
        if job is None:
            raise NotFound(f"no job {job_id}")
        holds = job["worker_id"] == worker_id and job["attempt"] == attempt
        if holds and job["status"] == JobStatus.cancelled:
            return HeartbeatReply(directive="stop", reason="job cancelled by operator")
        if holds and job["status"] == JobStatus.assigned:
            await self.machine.start(job_id, worker_id, attempt)
            self.changed("jobs", job_id)
        elif not (holds and job["status"] == JobStatus.running):
            await self._check_holder(worker_id, job_id)
            raise TransitionConflict(
                job_id, job["status"], JobStatus.running, job["attempt"],
                f"job {job_id[:8]}: attempt {attempt} of worker {worker_id[:8]} no longer holds "
                f"it (job is {job['status']}, attempt {job['attempt']}); stop working on it")
        if progress is not None:
            self._progress[job_id] = (worker_id, attempt, progress)
        return HeartbeatReply()

    async def _drop_forgotten_job(self, worker_id: str) -> None:
        """A busy worker heartbeats without a job: it gave the job up (say, it stopped its
        engine while the orchestrator was unreachable for longer than the heartbeat timeout).
        Put the job back in the queue and let the worker claim again, instead of leaving the job
        held by someone who is not working on it. A job claimed moments ago is left alone: a
        heartbeat sent while that claim was in flight says nothing about it."""
        worker = await self.store.aio.get_worker(worker_id)
        if worker is None or worker["status"] != WorkerStatus.busy or not worker["job_id"]:
            return
        job = await self.store.aio.get_job(worker["job_id"])
        if job is None or job["worker_id"] != worker_id or job["status"] not in LEASED_JOB_STATES:
            return
        if self.clock() - (job["updated_at"] or 0) < 2 * self.settings.heartbeat_interval:
            return
        await self._lose(job, "its worker reports it no longer runs it (lease given up)")
        try:
            await self.machine.change_worker(worker_id, "revive", "reports no job: idle again")
        except WorkerConflict:
            pass  # not stale: the job had moved on by itself and freed the worker
        self.changed("jobs", job["id"])
        self.changed("workers", worker_id)

    async def claim(self, worker_id: str, gpus: int | None = None) -> Assignment | None:
        worker = await self.store.aio.get_worker(worker_id)
        self.last_seen[worker_id] = self.last_claim[worker_id] = self.clock()  # a sign of life
        if worker is not None and worker["status"] == WorkerStatus.stale:
            worker = await self.machine.change_worker(worker_id, "revive", "claimed after silence")
            self.changed("workers", worker_id)
        if worker is None or worker["status"] != WorkerStatus.idle:
            state = worker["status"] if worker else "unknown"
            raise BadRequest(f"worker {worker_id[:8]} is {state}; only an idle worker may claim "
                             "(finish, release or fail its job first)", "worker_not_idle", 409)
        capacity = worker["gpus"] if gpus is None else min(gpus, worker["gpus"])
        row = await self.machine.claim(worker_id, capacity, worker["cluster"] or "",
                                       self._better_idle(worker),
                                       self.cluster_trusted(worker["cluster"] or ""))
        if row is None:
            return None
        self.changed("jobs", row["id"])
        self.changed("workers", worker_id)
        seq = row["latest_checkpoint"]
        cp = await self.store.aio.get_checkpoint(row["id"], seq) if seq else None
        older = [] if cp is None else [
            CheckpointRef(seq=c["seq"], key=c["key"], sha256=c["sha256"])
            for c in reversed(await self.store.aio.list_checkpoints(row["id"]))
            if c["seq"] < seq]
        return Assignment(job=job_from_row(row), attempt=row["attempt"],
                          bundle_key=bundle_key(row["id"]),
                          checkpoint_key=cp["key"] if cp else None,
                          checkpoint_sha256=cp["sha256"] if cp else None,
                          checkpoint_seq=cp["seq"] if cp else None, older_checkpoints=older)

    async def reject_checkpoint(self, worker_id: str, job_id: str, seq: int, attempt: int,
                                reason: str) -> Job:
        await self._check_holder(worker_id, job_id)
        row = await self.machine.reject_checkpoint(job_id, worker_id, attempt, seq, reason)
        log.warning("job %s: checkpoint %d rejected by worker %s (%s); resuming from %s",
                    job_id[:8], seq, worker_id[:8], reason,
                    row["latest_checkpoint"] or "no checkpoint")
        self.changed("jobs", job_id)
        return job_from_row(row)

    def cluster_priority(self, cluster: str, provider: str) -> int:
        """The configured cluster's priority; for others, its provider's default."""
        configured = self._priorities.get(cluster)
        if configured is not None:
            return configured
        return DEFAULT_CLUSTER_PRIORITY.get(provider, 0)

    def _rank(self, w: Any) -> tuple[int, int, float]:
        return scheduling.rank(w["gpus"] or 0,
                               self.cluster_priority(w["cluster"] or "", w["provider"] or ""),
                               w["vram_gb"] or 0.0)

    def claiming(self, worker: Any) -> bool:
        """Whether an idle worker is really after work (`scheduling.claiming`): it asked for
        some, or registered, within a poll interval and a half."""
        window = 1.5 * max(self.settings.heartbeat_interval, self.settings.worker_poll_interval)
        last = self.last_claim.get(worker["id"], worker["registered_at"] or 0.0)
        return scheduling.claiming(last, self.clock(), window)

    def _better_idle(self, worker: dict[str, Any]) -> list[scheduling.Rival]:
        """Idle workers ranked above this one that are alive (heard from within a heartbeat
        interval and a half) and claiming, best first: the claim sets work aside for them."""
        rivals = self.store.idle_rivals(worker["id"], worker["gpus"] or 0,
                                        worker["vram_gb"] or 0.0, worker["cluster"] or "")
        if not rivals:
            return []
        mine = self._rank(worker)
        fresh = self.clock() - 1.5 * self.settings.heartbeat_interval
        better = [w for w in rivals if self._rank(w) < mine
                  and self.last_seen.get(w["id"], 0) >= fresh and self.claiming(w)]
        better.sort(key=self._rank)
        return [scheduling.Rival(w["gpus"] or 0, w["cluster"] or "",
                                 self.cluster_trusted(w["cluster"] or "")) for w in better]

    async def _worker_trusted(self, worker_id: str) -> bool:
        worker = await self.store.aio.get_worker(worker_id)
        return worker is not None and self.cluster_trusted(worker["cluster"] or "")

    async def _check_holder(self, worker_id: str, job_id: str) -> None:
        """403 for a job this worker never held; a lease it lost is a 409 further on."""
        if not self.store.worker_held(job_id, worker_id):
            if await self.store.aio.get_job(job_id) is None:
                raise NotFound(f"no job {job_id}")
            raise Forbidden(f"job {job_id[:8]} was never assigned to worker {worker_id[:8]}")

    async def reserve_checkpoint(self, worker_id: str, job_id: str,
                                 attempt: int) -> CheckpointReserved:
        await self._check_holder(worker_id, job_id)
        seq = await self.machine.reserve_checkpoint(job_id, worker_id, attempt)
        return CheckpointReserved(seq=seq, key=checkpoint_key(job_id, seq),
                                  manifest_key=manifest_key(job_id, seq))

    async def _verify_uploaded(self, job_id: str, report: CheckpointReport) -> None:
        key = checkpoint_key(job_id, report.seq)
        try:
            size = await self._storage(self.storage.size, key)
        except ObjectNotFound:
            raise BadRequest(f"job {job_id[:8]}: checkpoint {report.seq} is not in storage at "
                             f"{key}; upload it before reporting", "checkpoint_missing",
                             422) from None
        if size != report.size:
            raise BadRequest(f"job {job_id[:8]}: checkpoint {report.seq} is {size} bytes in "
                             f"storage but the report says {report.size}",
                             "checkpoint_size_mismatch", 422)
        await self._check_manifest(job_id, report.seq)

    async def _check_manifest(self, job_id: str, seq: int) -> None:
        """Refuse at once a checkpoint whose manifest lists files the job's checkpoint globs do
        not name (an honest mistake, or a worker trying to plant code). A lying manifest is
        caught later by the restoring worker, which judges the archive itself; that is the
        guarantee, this is the early warning."""
        row = await self.store.aio.get_job(job_id)
        if row is None:
            return
        spec = BundleSpec.model_validate_json(row["spec"]).checkpoint
        try:
            raw = await self._storage(self.storage.get_bytes, manifest_key(job_id, seq))
        except ObjectNotFound:
            return  # the worker's restore checks the archive itself
        try:
            names = manifest_files(raw)
        except ValueError as exc:
            raise BadRequest(f"job {job_id[:8]}: checkpoint {seq}'s manifest is {exc}",
                             "invalid_checkpoint", 422) from None
        for name in names:
            why = checkpoint_refusal(name, spec.paths, spec.sentinel)
            if why is not None:
                log.warning("job %s: refused checkpoint %d: %s", job_id[:8], seq, why)
                raise BadRequest(f"job {job_id[:8]}: {why}", "invalid_checkpoint", 422)

    async def report_checkpoint(self, worker_id: str, job_id: str,
                                report: CheckpointReport) -> Job:
        await self._check_holder(worker_id, job_id)
        await self._verify_uploaded(job_id, report)
        row = await self.machine.accept_checkpoint(job_id, worker_id, report,
                                                   await self._worker_trusted(worker_id))
        if report.progress is not None:  # newer than the last heartbeat's, until the next one
            self._progress[job_id] = (worker_id, report.attempt,
                                      report.progress.model_dump(exclude_none=True))
        self.changed("jobs", job_id)
        self.prune_soon(job_id)
        return job_from_row(row)

    async def release(self, worker_id: str, job_id: str, attempt: int, reason: str,
                      report: CheckpointReport | None) -> Job:
        return await self._settle_with(worker_id, job_id, report, lambda trusted: (
            self.machine.release(job_id, worker_id, attempt, reason, report, trusted)))

    async def complete(self, worker_id: str, job_id: str, attempt: int,
                       report: CheckpointReport | None) -> Job:
        return await self._settle_with(worker_id, job_id, report, lambda trusted: (
            self.machine.complete(job_id, worker_id, attempt, report, trusted)))

    async def _settle_with(self, worker_id: str, job_id: str, report: CheckpointReport | None,
                           settle: Callable[[bool], Awaitable[dict[str, Any]]]) -> Job:
        """Release or complete: the holder hands the job in, with its last checkpoint (checked
        in storage first, and marked by its worker's trust)."""
        await self._check_holder(worker_id, job_id)
        self.last_claim[worker_id] = self.clock()  # idle again and about to claim
        if report is not None:
            await self._verify_uploaded(job_id, report)
        row = await settle(await self._worker_trusted(worker_id))
        self._progress.pop(job_id, None)
        self.changed("jobs", job_id)
        self.changed("workers", worker_id)
        if report is not None:
            self.prune_soon(job_id)
        return job_from_row(row)

    async def fail(self, worker_id: str, job_id: str, attempt: int, exit_code: int | None,
                   reason: str, log_tail: str) -> Job:
        await self._check_holder(worker_id, job_id)
        self.last_claim[worker_id] = self.clock()  # idle again and about to claim
        row = await self.machine.fail(job_id, worker_id, attempt, exit_code, reason, log_tail)
        self._progress.pop(job_id, None)
        if row["status"] == JobStatus.failed:
            log.warning("job %s failed for good after %s failures: %s", job_id[:8],
                        row["failures"], reason)
        self.changed("jobs", job_id)
        self.changed("workers", worker_id)  # maybe quarantined now
        return job_from_row(row)


    # ------------------------------------------------------------------ maintenance

    async def _lose(self, job: dict[str, Any], reason: str) -> None:
        try:
            await self.machine.lose(job["id"], job["worker_id"], job["attempt"], reason)
            log.info("job %s back to the queue: %s", job["id"][:8], reason)
        except (TransitionConflict, JobNotFound):
            pass  # it moved on by itself meanwhile: nothing to recover
        self._progress.pop(job["id"], None)

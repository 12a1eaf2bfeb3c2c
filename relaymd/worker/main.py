"""The worker's main loop: register, claim, run one job at a time, hand back before the end.

One asyncio loop runs the heartbeat (for the worker's whole life), the engine's supervision and
the checkpoint watch. Anything that ends an attempt — the engine exiting, a `stop` directive, a
lost lease, SIGTERM or the allocation's end — goes through `JobRun.stop()` and is then settled in
exactly one callback: complete, fail, release, or nothing when the lease is already gone.

Over 400 lines because the loop, the engine's supervision and the checkpoint and hand-in
protocol share one JobRun and one lease; moving files to and from storage is in transfer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaymd.client import ApiError, Client
from relaymd.config import WorkerSettings
from relaymd.fsutil import private_dir
from relaymd.models import (
    Assignment,
    CheckpointReport,
    Progress,
    WorkerRegister,
    to_datetime,
)
from relaymd.secrets import RedactSecrets, environment_secrets, redact_logs
from relaymd.storage import Storage
from relaymd.worker.checkpoint import Signature, Watcher
from relaymd.worker.engine import Engine
from relaymd.worker.gateway import Gateway
from relaymd.worker.hardware import detect_gpus, hostname, slurm_end_time
from relaymd.worker.outputs import OutputStream
from relaymd.worker.progress import ProgressReader
from relaymd.worker.tailscale import join_tailnet
from relaymd.worker.transfer import JobFiles, PrepareError

log = logging.getLogger("relaymd.worker")
LOW_DISK = 64 << 20  # bytes free below which a failure is blamed on the disk too
STOP_GRACE = 10.0  # for a cancelled job or a lost lease: nobody waits for its checkpoint
# An engine killed by SIGTERM, SIGINT or SIGHUP (directly, or under a shell: 128 + signal).
TERMINATION_CODES = frozenset({-15, -2, -1, 143, 130, 129})
SIGNAL_RACE = 2.0  # how long such an engine's exit waits for the worker's own signal
SETTLE_LOOKS = 5  # looks, `settle_seconds` apart, before a moving set waits for the next poll


@dataclass
class JobRun:
    assignment: Assignment
    job_dir: Path
    stop_reason: str | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    outputs: OutputStream | None = None  # the job's `outputs:`, streamed as they grow
    progress: ProgressReader | None = None

    @property
    def job_id(self) -> str:
        return self.assignment.job.id

    @property
    def attempt(self) -> int:
        return self.assignment.attempt

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:  # the first reason wins
            self.stop_reason = reason
            self.stopped.set()


class Worker:
    def __init__(self, settings: WorkerSettings, client: Client, storage: Storage,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.client = client
        self.storage = storage
        self.gateway = Gateway(client, settings.retry_max_delay)
        self.time = wall_clock  # deadlines are wall-clock epochs: compare with time.time()
        self.worker_id = ""
        # The orchestrator's figures, told at registration; these stand in until then.
        self.heartbeat_interval = 15.0
        self.heartbeat_timeout = 45.0
        self.wall_time_end: float | None = None
        self.current: JobRun | None = None
        self.shutting_down = asyncio.Event()
        self.shutdown_reason = ""
        self.exit_now = False
        # Every secret this worker knows, scrubbed from the engine's log before it leaves.
        self.redactor = RedactSecrets([*settings.secret_values(), *environment_secrets(),
                                       client.initial_token])
        self.files = JobFiles(settings.workdir, storage, self.gateway, client, self.redactor,
                              wall_clock)

    # ------------------------------------------------------------------ life

    def request_shutdown(self, reason: str) -> None:
        if not self.shutting_down.is_set():
            log.info("shutting down: %s", reason)
            self.shutdown_reason = reason
            self.shutting_down.set()
        if self.current is not None:
            self.current.stop("handoff")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.request_shutdown, f"signal {sig.name}")
        await self.register()
        beat = asyncio.create_task(self.heartbeat_loop(), name="heartbeat")
        try:
            await self.claim_loop()
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            with contextlib.suppress(Exception):
                await self.gateway.call("deregister", self.client.deregister, self.worker_id,
                                        give_up_after=10)
            log.info("worker exits", extra={"worker_id": self.worker_id})
        return 0

    async def register(self) -> None:
        s = self.settings
        gpus = await asyncio.to_thread(detect_gpus)
        slurm_id = os.environ.get("SLURM_JOB_ID") or None
        self.wall_time_end = await asyncio.to_thread(slurm_end_time, slurm_id)
        # The id its provider knows it by: a placeholder keyed by it becomes this worker.
        provider_id = slurm_id or os.environ.get("SALAD_MACHINE_ID") or None
        req = WorkerRegister(
            hostname=hostname(), cluster=s.cluster, provider_id=provider_id,
            compute_platform="CUDA" if gpus.count else "CPU", gpus=gpus.count, gpu_model=gpus.model,
            vram_gb=gpus.vram_gb, wall_time_end=to_datetime(self.wall_time_end))
        reg = await self.gateway.call("register", self.client.register, req)
        self.client.set_token(reg.token)
        redact_logs([reg.token])
        self.redactor.add(reg.token)
        self.worker_id = reg.worker_id
        self.heartbeat_interval = reg.heartbeat_interval
        self.heartbeat_timeout = reg.heartbeat_timeout
        log.info("registered", extra={"worker_id": reg.worker_id, "gpus": gpus.count,
                                      "wall_time_end": self.wall_time_end})

    def time_left(self) -> float | None:
        return None if self.wall_time_end is None else self.wall_time_end - self.time()

    async def claim_loop(self) -> None:
        s = self.settings
        idle_since: float | None = None
        while not self.shutting_down.is_set() and not self.exit_now:
            left = self.time_left()
            if left is not None and left - s.handoff_margin < s.min_segment:
                log.info("%.0fs of allocation left: too little for a useful segment", left)
                return
            try:
                assignment = await self.gateway.call("claim", self.client.claim)
            except ApiError as exc:
                if exc.status == 401 or exc.code != "worker_not_idle":
                    raise
                log.warning("claim refused (%s); trying again after a heartbeat", exc.message)
                await asyncio.sleep(self.heartbeat_interval)
                continue
            if assignment is not None:
                idle_since = None
                await self.run_job(assignment)
                continue
            if s.worker_idle == "immediate_exit":
                log.info("no claimable job; exiting (idle strategy immediate_exit)")
                return
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since >= s.worker_poll_max:
                log.info("idle for %.0fs; exiting (poll_then_exit)", now - idle_since)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutting_down.wait(), s.worker_poll_interval)

    async def heartbeat_loop(self) -> None:
        while True:
            run = self.current
            try:
                reply = await self.gateway.call(
                    "heartbeat", self.client.heartbeat, self.worker_id,
                    run.job_id if run else None, run.attempt if run else None,
                    self.read_progress(run) if run else None,
                    give_up_after=self.heartbeat_interval)
                if reply.directive == "stop" and run is not None:
                    log.info("orchestrator says stop: %s", reply.reason)
                    run.stop("cancelled")
                elif reply.directive == "exit":
                    log.warning("orchestrator says exit: %s", reply.reason)
                    self.exit_now = True
                    if run is not None:
                        run.stop("lease_lost")
                    self.shutting_down.set()
            except ApiError as exc:
                if exc.status in (401, 403, 409) and run is not None:
                    log.warning("lease lost: %s", exc.message)
                    run.stop("lease_lost")
                if exc.status == 401:
                    self.exit_now = True
                    self.shutting_down.set()
                elif exc.status == 0 and run is not None \
                        and self.gateway.silent_for() > self.heartbeat_timeout:
                    log.error("orchestrator unreachable for %.0fs: the lease is lost; stopping "
                              "the engine rather than run unfenced", self.gateway.silent_for())
                    run.stop("lease_lost")
            left = self.time_left()
            if left is not None and left <= self.settings.handoff_margin:
                self.request_shutdown(f"allocation ends in {max(left, 0):.0f}s")
            await asyncio.sleep(self.heartbeat_interval)

    # ------------------------------------------------------------------ one job

    def read_progress(self, run: JobRun) -> Progress | None:
        if run.progress is None:
            run.progress = ProgressReader(run.assignment.job.spec, run.job_dir)
        return run.progress.read()

    async def run_job(self, a: Assignment) -> None:
        job = a.job
        work = self.settings.workdir
        private_dir(work)  # 0700: job dirs hold inputs and checkpoints, on shared nodes too
        job_dir = work / f"{job.id[:12]}-attempt{a.attempt}"
        shutil.rmtree(job_dir, ignore_errors=True)
        run = JobRun(a, job_dir)
        self.current = run
        log.info("claimed job", extra={"job_id": job.id, "attempt": a.attempt,
                                        "resume_from": a.checkpoint_key})
        try:
            try:
                resumed = await self.files.prepare(a, job_dir)
            except PrepareError as exc:
                log.error("%s", exc)
                await self.settle("fail", run, exit_code=None, reason=str(exc), log_tail="")
                return
            if job.spec.outputs:
                run.outputs = OutputStream(job.id, a.attempt, job_dir, job.spec.outputs,
                                           self.storage, self.gateway, work, resumed,
                                           job.spec.checkpoint.sentinel)
            if run.stopped.is_set():  # told to go while preparing: hand it straight back
                await self.settle("release", run, reason=self.shutdown_reason or "worker stopping")
                return
            await self.supervise(run)
        finally:
            self.current = None
            if run.outputs is not None:
                run.outputs.close()
            shutil.rmtree(job_dir, ignore_errors=True)

    async def supervise(self, run: JobRun) -> None:
        spec = run.assignment.job.spec
        watcher = Watcher(run.job_dir, spec.checkpoint.paths, spec.checkpoint.sentinel)
        if run.assignment.checkpoint_key:
            watcher.mark_restored()
        log_path = run.job_dir.parent / f"{run.job_dir.name}.log"
        engine = Engine(spec.command, run.job_dir, log_path, env={
            **spec.env, "RELAYMD_JOB_ID": run.job_id, "RELAYMD_ATTEMPT": str(run.attempt),
            "RELAYMD_JOB_DIR": str(run.job_dir)})
        await engine.start()
        exited = asyncio.create_task(engine.wait())
        stopped = asyncio.create_task(run.stopped.wait())
        try:
            while not exited.done() and not run.stopped.is_set():
                await asyncio.wait({exited, stopped}, timeout=spec.checkpoint.poll_seconds,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not exited.done() and not run.stopped.is_set():
                    await self.maybe_checkpoint(run, watcher)
            if run.stopped.is_set():
                await self.end_stopped(run, watcher, engine)
            else:
                await self.end_exited(run, watcher, engine, exited.result())
        finally:
            stopped.cancel()
            if engine.running:
                await engine.stop(STOP_GRACE)
            await self.files.upload_log(run.job_id, run.attempt, engine)

    def disk_note(self) -> str:
        """Why an engine may really have died: the worker's own disk is (nearly) full."""
        try:
            free = shutil.disk_usage(self.settings.workdir).free
        except OSError:
            return ""
        if free >= LOW_DISK:
            return ""
        return (f"; the worker's disk holding {self.settings.workdir} is full "
                f"({free / (1 << 20):.1f} MiB free)")

    async def end_exited(self, run: JobRun, watcher: Watcher, engine: Engine, code: int) -> None:
        log.info("engine exited", extra={"job_id": run.job_id, "exit_code": code})
        if code == 0:
            # Nothing else is left to do: the orchestrator and storage get as long as the
            # hand-in itself (an orchestrator restarting is no reason to lose the result).
            report, unshipped = await self.final_checkpoint(run, watcher, None,
                                                            self.settle_patience())
            if run.outputs is not None and not unshipped:  # the completing attempt: whole
                unshipped = not await run.outputs.ship_rest(final=True,
                                                            patience=self.settle_patience())
            if unshipped:
                # The engine's final state is only on this node: completing now would record a
                # job whose result nobody can fetch. Hand it back instead; the next attempt
                # resumes from the last accepted checkpoint and redoes the rest.
                log.error("final checkpoint not shipped; handing the job back rather than "
                          "completing it without its result", extra={"job_id": run.job_id})
                await self.settle("release", run, reason="final checkpoint could not be shipped")
                return
            await self.settle("complete", run, checkpoint=report)
        elif await self.stopped_with_the_worker(code):
            log.info("engine stopped by the signal that stops the worker",
                     extra={"job_id": run.job_id, "exit_code": code})
            await self.hand_back(run, watcher, newer_than=None)
        else:
            await self.settle("fail", run, exit_code=code,
                              reason=f"engine exited with code {code}{self.disk_note()}",
                              log_tail=self.redactor.redact(engine.tail()))

    async def stopped_with_the_worker(self, code: int) -> bool:
        """Did the engine die of the signal that is stopping this worker too? SLURM (scancel,
        the time limit) and container runtimes signal every process at once, so the engine may
        exit a moment before the worker's own handler runs: that is a hand-off, not a failure."""
        if code not in TERMINATION_CODES:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.shutting_down.wait(), SIGNAL_RACE)
        return self.shutting_down.is_set()

    async def end_stopped(self, run: JobRun, watcher: Watcher, engine: Engine) -> None:
        reason = run.stop_reason
        if reason != "handoff":  # cancelled or lease lost: nothing to hand back
            await engine.stop(STOP_GRACE)
            log.info("engine stopped", extra={"job_id": run.job_id, "why": reason})
            return
        baseline = watcher.baseline()  # before the engine is asked to write its last one
        code = await engine.stop(self.settings.shutdown_wait)
        log.info("engine stopped for hand-off", extra={"job_id": run.job_id, "exit_code": code})
        # Whatever the engine's exit code after our SIGTERM, this is a hand-off, not a failure.
        await self.hand_back(run, watcher, newer_than=baseline)

    async def hand_back(self, run: JobRun, watcher: Watcher, newer_than: int | None) -> None:
        """Ship the engine's last checkpoint (newer than `newer_than`, if given) and release."""
        report, _ = await self.final_checkpoint(run, watcher, newer_than=newer_than)
        if run.outputs is not None:  # past the checkpoint: cut off when stitched, kept to see
            await run.outputs.ship_rest(final=False, patience=self.settle_patience())
        await self.settle("release", run, checkpoint=report, reason=self.shutdown_reason
                          or "worker handing back")

    # ------------------------------------------------------------------ checkpoints

    async def stable_set(self, watcher: Watcher, settle: float,
                         newer_than: int | None = None) -> Signature | None:
        """Look, and while the look finds a new set not yet confirmed, look again `settle`
        seconds later (a few times: the engine may be mid-way through its writes)."""
        sig = watcher.candidate(newer_than)
        for _ in range(SETTLE_LOOKS):
            if sig is not None or not watcher.awaiting_second_look:
                break
            await asyncio.sleep(settle)
            sig = watcher.candidate(newer_than)
        return sig

    async def final_checkpoint(self, run: JobRun, watcher: Watcher, newer_than: int | None,
                               patience: float | None = None
                               ) -> tuple[CheckpointReport | None, bool]:
        """The last set's report (None: nothing new since the last upload), and whether a new
        set was left unshipped. After the engine exited its files are still: two looks a moment
        apart suffice."""
        sig = await self.stable_set(watcher, 0.2, newer_than)
        if sig is None:
            return None, False
        report = await self.upload_checkpoint(run, watcher, sig, patience)
        return report, report is None

    async def maybe_checkpoint(self, run: JobRun, watcher: Watcher) -> None:
        ckpt = run.assignment.job.spec.checkpoint
        sig = await self.stable_set(watcher, min(ckpt.settle_seconds, ckpt.poll_seconds))
        if sig is None:
            return
        report = await self.upload_checkpoint(run, watcher, sig)
        if report is None:
            return
        try:
            await self.gateway.call("report checkpoint", self.client.report_checkpoint,
                                    run.job_id, report, give_up_after=self.heartbeat_timeout)
            log.info("checkpoint accepted", extra={"job_id": run.job_id, "seq": report.seq})
        except ApiError as exc:
            if exc.status == 409 or exc.status == 403:
                run.stop("lease_lost")
            log.warning("checkpoint %s not accepted: %s", report.seq, exc.message)

    async def upload_checkpoint(self, run: JobRun, watcher: Watcher, sig: Signature,
                                patience: float | None = None) -> CheckpointReport | None:
        try:
            reserved = await self.gateway.call("reserve checkpoint",
                                               self.client.reserve_checkpoint, run.job_id,
                                               run.attempt,
                                               give_up_after=patience or self.heartbeat_timeout)
        except ApiError as exc:
            if exc.status in (403, 409):
                run.stop("lease_lost")
            log.warning("cannot reserve a checkpoint: %s", exc.message)
            return None
        try:
            return await self.files.pack_and_upload(run.job_id, run.attempt, watcher, sig,
                                                    reserved, self.worker_id,
                                                    self.read_progress(run), run.outputs,
                                                    patience or 600)
        except OSError as exc:  # ENOSPC and friends on the worker's own disk: not fatal
            log.error("checkpoint %s not packed: %s (is %s full?); the last accepted checkpoint "
                      "stands", reserved.seq, exc, self.settings.workdir,
                      extra={"job_id": run.job_id})
            return None

    # ------------------------------------------------------------------ settling

    def settle_patience(self) -> float:
        """How long a hand-in (and the final checkpoint before it) keeps retrying."""
        return max(self.heartbeat_timeout, 60)

    async def settle(self, how: str, run: JobRun, **kw: Any) -> None:
        """complete / fail / release, retried until the orchestrator answers. A 409 after a
        retried network error means an earlier try already landed."""
        fn: Callable[..., Any] = {"complete": self.client.complete, "fail": self.client.fail,
                                  "release": self.client.release}[how]
        try:
            await self.gateway.call(how, fn, run.job_id, run.attempt, **kw,
                                    give_up_after=self.settle_patience())
            log.info("job %s", how, extra={"job_id": run.job_id, "attempt": run.attempt})
        except ApiError as exc:
            log.warning("%s of job %s refused: %s", how, run.job_id[:8], exc.message)


async def run_worker(settings: WorkerSettings, url: str, token: str) -> int:
    redact_logs([*settings.secret_values(), token])
    storage = settings.open_storage()
    key = settings.tailscale_auth_key
    tailnet = await asyncio.to_thread(
        join_tailnet, key.get_secret_value() if key else None, settings.tailscale_proxy_port,
        settings.tailscale_hostname)
    try:
        with Client(url, token, proxy=tailnet.proxy if tailnet else None) as client:
            return await Worker(settings, client, storage).run()
    finally:
        if tailnet is not None:
            await asyncio.to_thread(tailnet.close)

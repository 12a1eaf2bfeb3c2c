"""The worker's main loop: register, claim, run one job at a time, hand back before the end.

One asyncio loop runs the heartbeat (for the worker's whole life), the engine's supervision and
the checkpoint watch. Anything that ends an attempt — the engine exiting, a `stop` directive, a
lost lease, SIGTERM or the allocation's end — goes through `JobRun.stop()` and is then settled in
exactly one callback: complete, fail, release, or nothing when the lease is already gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaymd.client import ApiError, Client
from relaymd.config import Settings
from relaymd.fsutil import private_dir
from relaymd.models import (
    Assignment,
    CheckpointReport,
    CheckpointReserved,
    Progress,
    WorkerRegister,
    to_datetime,
)
from relaymd.secrets import RedactSecrets, environment_secrets, redact_logs
from relaymd.storage import IntegrityError, ObjectNotFound, Storage, log_key, manifest_key
from relaymd.storage.bundle import BundleError, extract_bundle, extract_checkpoint, manifest_files
from relaymd.worker.checkpoint import IncompleteCheckpoint, Signature, Watcher
from relaymd.worker.engine import Engine
from relaymd.worker.gateway import Gateway
from relaymd.worker.hardware import detect_gpus, hostname, slurm_end_time
from relaymd.worker.tailscale import join_tailnet

log = logging.getLogger("relaymd.worker")
LOW_DISK = 64 << 20  # bytes free below which a failure is blamed on the disk too
STOP_GRACE = 10.0  # for a cancelled job or a lost lease: nobody waits for its checkpoint
SETTLE_LOOKS = 5  # looks, `settle_seconds` apart, before a moving set waits for the next poll
RESTORE_MARGIN = 1 << 20  # bytes a checkpoint may unpack past its manifest's sum (plus 1%)
RESTORE_DISK_RESERVE = 64 << 20  # a restore never leaves the disk with less free than this


class PrepareError(Exception):
    """The job could not be set up here; reported as a failure with this reason."""


@dataclass
class JobRun:
    assignment: Assignment
    job_dir: Path
    stop_reason: str | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

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
    def __init__(self, settings: Settings, client: Client, storage: Storage,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.client = client
        self.storage = storage
        self.gateway = Gateway(client, settings.retry_max_delay)
        self.time = wall_clock  # deadlines are wall-clock epochs: compare with time.time()
        self.worker_id = ""
        self.heartbeat_interval = settings.heartbeat_interval
        self.heartbeat_timeout = settings.heartbeat_timeout
        self.wall_time_end: float | None = None
        self.current: JobRun | None = None
        self.shutting_down = asyncio.Event()
        self.shutdown_reason = ""
        self.exit_now = False
        # Every secret this worker knows, scrubbed from the engine's log before it leaves.
        self.redactor = RedactSecrets([*settings.secret_values(), *environment_secrets(),
                                       client.initial_token])

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
        name = run.assignment.job.spec.progress
        if not name:
            return None
        try:
            return Progress.model_validate_json((run.job_dir / name).read_bytes())
        except (OSError, ValueError):
            return None

    async def prepare(self, a: Assignment, job_dir: Path) -> None:
        job = a.job
        with tempfile.TemporaryDirectory(dir=self.settings.workdir) as tmp:
            bundle = Path(tmp) / "bundle.tar.gz"
            try:
                await self.gateway.call("download bundle", self.storage.get_file, a.bundle_key,
                                        bundle, expected_sha256=job.bundle_sha256,
                                        give_up_after=300)
                await asyncio.to_thread(extract_bundle, bundle, job_dir)
            except (BundleError, Exception) as exc:  # any cause: reported, never a crash
                raise PrepareError(f"cannot prepare bundle {a.bundle_key}: {exc}") from None
            if a.checkpoint_key is None:
                return
            await self.restore(a, job_dir, Path(tmp) / "checkpoint.tar.gz")

    async def restore(self, a: Assignment, job_dir: Path, ckpt: Path) -> None:
        """Unpack the newest accepted checkpoint; one that is corrupt in storage (sha256
        mismatch, gone, not a valid archive) or hostile (anything but files the job's
        checkpoint globs name, bigger than its manifest says) is reported and the next older one
        is tried. Never a silent fresh start: with no usable checkpoint left the attempt fails."""
        assert a.checkpoint_key is not None and a.checkpoint_sha256 is not None
        candidates = [(a.checkpoint_seq, a.checkpoint_key, a.checkpoint_sha256)]
        candidates += [(c.seq, c.key, c.sha256) for c in a.older_checkpoints]
        spec = a.job.spec.checkpoint
        rejected = []
        for seq, key, sha in candidates:
            try:
                await self.gateway.call("download checkpoint", self.storage.get_file, key, ckpt,
                                        expected_sha256=sha, give_up_after=300)
                limit = await self.restore_limit(a.job.id, seq, job_dir)
                staging = ckpt.with_name(f"restore-{seq}")
                await asyncio.to_thread(extract_checkpoint, ckpt, job_dir, staging, spec.paths,
                                        spec.sentinel, limit)
            except (IntegrityError, ObjectNotFound, BundleError) as exc:
                log.error("checkpoint %s is unusable: %s", key, exc,
                          extra={"job_id": a.job.id})
                rejected.append(key)
                # Forget it only when an older one is left to try: the last resume point is
                # kept, so the job fails (for an operator to look at) rather than later
                # restarting from scratch with nothing to resume from.
                if seq is not None and len(rejected) < len(candidates):
                    with contextlib.suppress(ApiError):
                        await self.gateway.call("reject checkpoint", self.client.reject_checkpoint,
                                                a.job.id, seq, a.attempt, str(exc)[:500],
                                                give_up_after=60)
                continue
            except Exception as exc:  # storage unreachable for minutes: not the checkpoint's fault
                raise PrepareError(f"cannot restore checkpoint {key}: {exc}") from None
            if rejected:
                log.warning("resumed from older checkpoint %s (newer unusable: %s)", key,
                            ", ".join(rejected), extra={"job_id": a.job.id})
            return
        raise PrepareError(f"no usable checkpoint for job {a.job.id[:8]} (unusable: "
                           f"{', '.join(rejected)}); refusing to start it from scratch")

    async def restore_limit(self, job_id: str, seq: int | None, job_dir: Path) -> int:
        """How many bytes a checkpoint may unpack to: what its manifest declares plus a margin
        (tar headers, a file grown between the look and the pack), and never more than the
        disk holds. Without a readable manifest, the disk alone bounds it."""
        free = shutil.disk_usage(job_dir).free - RESTORE_DISK_RESERVE
        if seq is None:
            return free
        try:
            raw = await self.gateway.call("download manifest", self.storage.get_bytes,
                                          manifest_key(job_id, seq), give_up_after=60)
            declared = sum(manifest_files(raw).values())
        except ObjectNotFound:
            log.warning("checkpoint %d of job %s has no manifest; bounding it by the free disk",
                        seq, job_id[:8])
            return free
        except ValueError as exc:
            raise BundleError(f"checkpoint {seq} has an unreadable manifest: {exc}") from None
        return min(declared + RESTORE_MARGIN + declared // 100, free)

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
                await self.prepare(a, job_dir)
            except PrepareError as exc:
                log.error("%s", exc)
                await self.settle("fail", run, exit_code=None, reason=str(exc), log_tail="")
                return
            if run.stopped.is_set():  # told to go while preparing: hand it straight back
                await self.settle("release", run, reason=self.shutdown_reason or "worker stopping")
                return
            await self.supervise(run)
        finally:
            self.current = None
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
            await self.upload_log(run, engine)

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
            report = await self.final_checkpoint(run, watcher, newer_than=None)
            await self.settle("complete", run, checkpoint=report)
        else:
            await self.settle("fail", run, exit_code=code,
                              reason=f"engine exited with code {code}{self.disk_note()}",
                              log_tail=self.redactor.redact(engine.tail()))

    async def end_stopped(self, run: JobRun, watcher: Watcher, engine: Engine) -> None:
        reason = run.stop_reason
        if reason != "handoff":  # cancelled or lease lost: nothing to hand back
            await engine.stop(STOP_GRACE)
            log.info("engine stopped", extra={"job_id": run.job_id, "why": reason})
            return
        baseline = watcher.baseline()  # before the engine is asked to write its last one
        code = await engine.stop(self.settings.shutdown_wait)
        log.info("engine stopped for hand-off", extra={"job_id": run.job_id, "exit_code": code})
        report = await self.final_checkpoint(run, watcher, newer_than=baseline)
        # Whatever the engine's exit code after our SIGTERM, this is a hand-off, not a failure.
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

    async def final_checkpoint(self, run: JobRun, watcher: Watcher,
                               newer_than: int | None) -> CheckpointReport | None:
        """After the engine exited its files are still: two looks a moment apart suffice."""
        sig = await self.stable_set(watcher, 0.2, newer_than)
        if sig is None:
            return None
        return await self.upload_checkpoint(run, watcher, sig)

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

    async def upload_checkpoint(self, run: JobRun, watcher: Watcher,
                                sig: Signature) -> CheckpointReport | None:
        try:
            reserved = await self.gateway.call("reserve checkpoint",
                                               self.client.reserve_checkpoint, run.job_id,
                                               run.attempt, give_up_after=self.heartbeat_timeout)
        except ApiError as exc:
            if exc.status in (403, 409):
                run.stop("lease_lost")
            log.warning("cannot reserve a checkpoint: %s", exc.message)
            return None
        try:
            return await self._pack_and_upload(run, watcher, sig, reserved)
        except OSError as exc:  # ENOSPC and friends on the worker's own disk: not fatal
            log.error("checkpoint %s not packed: %s (is %s full?); the last accepted checkpoint "
                      "stands", reserved.seq, exc, self.settings.workdir,
                      extra={"job_id": run.job_id})
            return None

    async def _pack_and_upload(self, run: JobRun, watcher: Watcher, sig: Signature,
                               reserved: CheckpointReserved) -> CheckpointReport | None:
        with tempfile.TemporaryDirectory(dir=self.settings.workdir) as tmp:
            try:
                packed = await asyncio.to_thread(watcher.pack, sig, Path(tmp) / "ckpt.tar.gz")
            except IncompleteCheckpoint as exc:
                log.info("checkpoint set moved while packing (%s); next look", exc)
                return None
            progress = self.read_progress(run)
            manifest = {
                "job_id": run.job_id, "seq": reserved.seq, "sha256": packed.sha256,
                "size": packed.size, "attempt": run.attempt, "worker_id": self.worker_id,
                "time": self.time(), "files": packed.files,
                "progress": progress.model_dump() if progress else None,
            }
            try:
                await self.gateway.call("upload checkpoint", self.storage.put_file, reserved.key,
                                        packed.path, overwrite=True, give_up_after=600)
                await self.gateway.call("upload manifest", self.storage.put_bytes,
                                        reserved.manifest_key, json.dumps(manifest).encode(),
                                        overwrite=True, give_up_after=120)
            except Exception as exc:
                log.error("checkpoint %s upload failed: %s", reserved.seq, exc)
                return None
            watcher.mark_uploaded(sig)
        return CheckpointReport(attempt=run.attempt, seq=reserved.seq, sha256=packed.sha256,
                                size=packed.size, progress=progress)

    async def upload_log(self, run: JobRun, engine: Engine) -> None:
        try:
            text = engine.log_path.read_bytes()[-(8 << 20):].decode(errors="replace")
            data = gzip.compress(self.redactor.redact(text).encode())
            await self.gateway.call("upload log", self.storage.put_bytes,
                                    log_key(run.job_id, run.attempt), data, overwrite=True,
                                    give_up_after=60)
        except Exception as exc:
            log.warning("engine log not uploaded: %s", exc)
        finally:
            engine.log_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ settling

    async def settle(self, how: str, run: JobRun, **kw: Any) -> None:
        """complete / fail / release, retried until the orchestrator answers. A 409 after a
        retried network error means an earlier try already landed."""
        fn: Callable[..., Any] = {"complete": self.client.complete, "fail": self.client.fail,
                                  "release": self.client.release}[how]
        try:
            await self.gateway.call(how, fn, run.job_id, run.attempt, **kw,
                                    give_up_after=max(self.heartbeat_timeout, 60))
            log.info("job %s", how, extra={"job_id": run.job_id, "attempt": run.attempt})
        except ApiError as exc:
            log.warning("%s of job %s refused: %s", how, run.job_id[:8], exc.message)


class JsonLines(logging.Formatter):
    """One JSON object per line on stderr: easy to grep in SLURM output, easy to ship."""

    _standard = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_worker_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def run_worker(settings: Settings, url: str, token: str) -> int:
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

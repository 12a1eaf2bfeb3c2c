"""A job's files between storage and its directory on this node: the bundle and the newest
usable checkpoint in (bounded, verified, never a silent fresh start), checkpoints and the engine's
log out. The orchestrator's side of a checkpoint (reserve, report) stays with the worker loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relaymd.client import ApiError, Client
from relaymd.models import Assignment, CheckpointReport, CheckpointReserved, Progress
from relaymd.secrets import RedactSecrets
from relaymd.storage import IntegrityError, ObjectNotFound, Storage, log_key, manifest_key
from relaymd.storage.bundle import BundleError, extract_bundle
from relaymd.storage.checkpoints import extract_checkpoint, manifest_files
from relaymd.worker.checkpoint import IncompleteCheckpoint, Signature, Watcher
from relaymd.worker.engine import Engine
from relaymd.worker.gateway import Gateway
from relaymd.worker.outputs import OutputStream, remove_outputs

log = logging.getLogger("relaymd.worker")
RESTORE_MARGIN = 1 << 20  # bytes a checkpoint may unpack past its manifest's sum (plus 1%)
RESTORE_DISK_RESERVE = 64 << 20  # a restore never leaves the disk with less free than this


class PrepareError(Exception):
    """The job could not be set up here; reported as a failure with this reason."""


class JobFiles:
    def __init__(self, workdir: Path, storage: Storage, gateway: Gateway, client: Client,
                 redactor: RedactSecrets, clock: Callable[[], float]) -> None:
        self.workdir = workdir
        self.storage = storage
        self.gateway = gateway
        self.client = client
        self.redactor = redactor
        self.time = clock

    async def prepare(self, a: Assignment, job_dir: Path) -> dict[str, Any] | None:
        """Bundle and checkpoint in; the checkpoint resumed from (seq, attempt and the output
        lengths its manifest recorded), None for a fresh start."""
        job = a.job
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            bundle = Path(tmp) / "bundle.tar.gz"
            try:
                await self.gateway.call("download bundle", self.storage.get_file, a.bundle_key,
                                        bundle, expected_sha256=job.bundle_sha256,
                                        give_up_after=300)
                await asyncio.to_thread(extract_bundle, bundle, job_dir)
            except (BundleError, Exception) as exc:  # any cause: reported, never a crash
                raise PrepareError(f"cannot prepare bundle {a.bundle_key}: {exc}") from None
            resumed = None
            if a.checkpoint_key is not None:
                resumed = await self.restore(a, job_dir, Path(tmp) / "checkpoint.tar.gz")
            remove_outputs(job_dir, job.spec.outputs)
            return resumed

    async def restore(self, a: Assignment, job_dir: Path, ckpt: Path) -> dict[str, Any]:
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
                limit, manifest = await self.restore_limit(a.job.id, seq, job_dir)
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
            return {"seq": seq, "attempt": manifest.get("attempt"),
                    "outputs": manifest.get("outputs")}
        raise PrepareError(f"no usable checkpoint for job {a.job.id[:8]} (unusable: "
                           f"{', '.join(rejected)}); refusing to start it from scratch")

    async def restore_limit(self, job_id: str, seq: int | None,
                            job_dir: Path) -> tuple[int, dict[str, Any]]:
        """How many bytes a checkpoint may unpack to: what its manifest declares plus a margin
        (tar headers, a file grown between the look and the pack), and never more than the
        disk holds. Without a readable manifest, the disk alone bounds it. Also the manifest
        ({} without one)."""
        free = shutil.disk_usage(job_dir).free - RESTORE_DISK_RESERVE
        if seq is None:
            return free, {}
        try:
            raw = await self.gateway.call("download manifest", self.storage.get_bytes,
                                          manifest_key(job_id, seq), give_up_after=60)
            declared = sum(manifest_files(raw).values())
            manifest = json.loads(raw)
        except ObjectNotFound:
            log.warning("checkpoint %d of job %s has no manifest; bounding it by the free disk",
                        seq, job_id[:8])
            return free, {}
        except ValueError as exc:
            raise BundleError(f"checkpoint {seq} has an unreadable manifest: {exc}") from None
        return min(declared + RESTORE_MARGIN + declared // 100, free), manifest

    async def pack_and_upload(self, job_id: str, attempt: int, watcher: Watcher, sig: Signature,
                              reserved: CheckpointReserved, worker_id: str,
                              progress: Progress | None, outputs: OutputStream | None = None,
                              patience: float = 600) -> CheckpointReport | None:
        """Pack the checkpoint set `sig` and upload it with its manifest under the reserved
        keys; None (logged) when the set moved meanwhile or storage would not take it. The
        outputs' lengths are taken first, so they never run past the checkpoint, and their new
        bytes are shipped before the checkpoint: an accepted manifest's lengths are in storage."""
        lengths, mark, generation = outputs.at_checkpoint() if outputs is not None \
            else (None, None, 0)
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            try:
                packed = await asyncio.to_thread(watcher.pack, sig, Path(tmp) / "ckpt.tar.gz")
            except IncompleteCheckpoint as exc:
                log.info("checkpoint set moved while packing (%s); next look", exc)
                return None
            if outputs is not None and outputs.checkpoint_began_since(generation):
                log.info("the engine began another checkpoint while this one was packed; "
                         "next look")
                return None
            manifest = {
                "job_id": job_id, "seq": reserved.seq, "sha256": packed.sha256,
                "size": packed.size, "attempt": attempt, "worker_id": worker_id,
                "time": self.time(), "files": packed.files,
                "progress": progress.model_dump() if progress else None,
            }
            if lengths is not None:
                manifest["outputs"] = lengths
            try:
                if outputs is not None and lengths is not None:
                    await outputs.ship(lengths, patience=patience)
                await self.gateway.call("upload checkpoint", self.storage.put_file, reserved.key,
                                        packed.path, overwrite=True, give_up_after=600)
                await self.gateway.call("upload manifest", self.storage.put_bytes,
                                        reserved.manifest_key, json.dumps(manifest).encode(),
                                        overwrite=True, give_up_after=120)
            except Exception as exc:
                log.error("checkpoint %s upload failed: %s", reserved.seq, exc)
                return None
            watcher.mark_uploaded(sig)
            if outputs is not None:
                outputs.shipped(mark)
        return CheckpointReport(attempt=attempt, seq=reserved.seq, sha256=packed.sha256,
                                size=packed.size, progress=progress)

    async def upload_log(self, job_id: str, attempt: int, engine: Engine) -> None:
        try:
            text = engine.log_path.read_bytes()[-(8 << 20):].decode(errors="replace")
            data = gzip.compress(self.redactor.redact(text).encode())
            await self.gateway.call("upload log", self.storage.put_bytes,
                                    log_key(job_id, attempt), data, overwrite=True,
                                    give_up_after=60)
        except Exception as exc:
            log.warning("engine log not uploaded: %s", exc)
        finally:
            engine.log_path.unlink(missing_ok=True)

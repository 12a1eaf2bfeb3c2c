"""Jobs, for the operator: bundles, creation, listing, cancel, requeue, purge."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relaymd.models import BundleUploaded, Job, JobCreate, JobDetail, JobStatus, Worker
from relaymd.server.service.base import (
    PENDING_BUNDLES,
    BadRequest,
    ConflictError,
    NotFound,
    ServiceBase,
    parse_bundle_spec,
)
from relaymd.server.store import dumps
from relaymd.server.views import job_detail, job_from_row, worker_from_row
from relaymd.storage import ObjectNotFound, bundle_key, job_prefix
from relaymd.storage.bundle import BundleError, inspect_bundle, read_member

log = logging.getLogger(__name__)


class JobOps(ServiceBase):
    # ------------------------------------------------------------------ operator: jobs

    async def resolve(self, ref: str) -> str:
        ref = ref.strip().lower()
        if not ref or len(ref) > 32 or any(c not in "0123456789abcdef" for c in ref):
            raise NotFound(f"no job {ref!r}: job ids are hexadecimal")
        ids = await self.store.aio.job_ids_with_prefix(ref)
        if not ids:
            raise NotFound(f"no job matches {ref!r}")
        if len(ids) > 1:
            raise BadRequest(f"job prefix {ref!r} is ambiguous; give more characters",
                             "ambiguous_job", 409)
        return ids[0]

    async def upload_bundle(self, job_id: str, path: Path) -> BundleUploaded:
        if await self.store.aio.get_job(job_id) is not None:
            raise BadRequest(f"job {job_id} already exists; bundles are immutable",
                             "job_exists", 409)
        try:
            info = await asyncio.to_thread(inspect_bundle, path)
            raw = await asyncio.to_thread(read_member, path, "relaymd.yaml")
        except BundleError as exc:
            raise BadRequest(f"job {job_id[:8]}: {exc}", "invalid_bundle", 422) from None
        spec = parse_bundle_spec(raw, f"job {job_id[:8]}")
        await self._storage(lambda: self.storage.put_file(bundle_key(job_id), path,
                                                          overwrite=True))
        uploaded = BundleUploaded(job_id=job_id, sha256=info.sha256, size=info.size, spec=spec)
        self._pending_bundles[job_id] = uploaded
        while len(self._pending_bundles) > PENDING_BUNDLES:
            self._pending_bundles.popitem(last=False)
        return uploaded

    async def _bundle_for(self, job_id: str) -> BundleUploaded:
        pending = self._pending_bundles.get(job_id)
        if pending is not None:
            return pending
        # Restarted since the upload: read the spec back from storage.
        with tempfile.TemporaryDirectory(prefix="relaymd-bundle-") as tmp:
            local = Path(tmp) / "bundle.tar.gz"
            try:
                info = await self._storage(self.storage.get_file, bundle_key(job_id), local)
            except ObjectNotFound:
                raise BadRequest(f"job {job_id[:8]}: no bundle uploaded; "
                                 f"PUT /api/v1/jobs/{job_id}/bundle first",
                                 "bundle_missing", 409) from None
            raw = await asyncio.to_thread(read_member, local, "relaymd.yaml")
        spec = parse_bundle_spec(raw, f"job {job_id[:8]}")
        return BundleUploaded(job_id=job_id, sha256=info.sha256, size=info.size, spec=spec)

    async def create_job(self, req: JobCreate) -> Job:
        if await self.store.aio.get_job(req.id) is not None:
            raise BadRequest(f"job {req.id} already exists", "job_exists", 409)
        bundle = await self._bundle_for(req.id)
        spec = bundle.spec
        now = self.clock()
        row = {
            "id": req.id, "title": req.title,
            "command": spec.command, "spec": dumps(spec.model_dump()),
            "gpus": req.gpus if req.gpus is not None else spec.resources.gpus,
            "priority": req.priority,
            "max_attempts": req.max_attempts or spec.max_attempts,
            "preferred_clusters": dumps(req.preferred_clusters) if req.preferred_clusters else None,
            "trusted_only": int(req.trusted_only if req.trusted_only is not None
                                else spec.trusted_only),
            "bundle_sha256": bundle.sha256, "bundle_size": bundle.size,
            "created_at": now, "updated_at": now,
        }
        created = await self.machine.create_job(row)
        self._pending_bundles.pop(req.id, None)
        self.changed("jobs", req.id)
        return job_from_row(created)

    async def list_jobs_json(self, statuses: Sequence[str] | None, limit: int,
                             cursor: str | None) -> bytes:
        """One page of jobs as the JSON of a `JobPage`, built from cached per-job JSON."""
        after = None
        if cursor:
            try:
                after = int(cursor)
            except ValueError:
                after = -1
            if not 0 <= after < 1 << 62:
                raise BadRequest(f"invalid cursor {cursor[:40]!r}: pass back a next_cursor")
        rows, nxt = self.store.list_jobs(statuses, limit, after)
        live = self._progress
        render = self._job_json.render
        parts: list[bytes] = []
        for i, r in enumerate(rows):
            if i and i % 100 == 0:
                await asyncio.sleep(0)  # let heartbeats through between slices of a big page
            parts.append(render(r, live[r["id"]][2] if r["id"] in live else None))
        jobs = b",".join(parts)
        return b'{"jobs":[' + jobs + b'],"next_cursor":' + json.dumps(
            None if nxt is None else str(nxt)).encode() + b"}"

    async def get_job(self, ref: str) -> JobDetail:
        job_id = await self.resolve(ref)
        row = await self.store.aio.get_job(job_id)
        if row is None:
            raise NotFound(f"no job {job_id}")
        cps = await self.store.aio.list_checkpoints(job_id)
        events = await self.store.aio.list_events(job_id)
        live = self._progress.get(job_id)
        figures = await self.job_figures(row, cps)
        return job_detail(job_from_row(row, live[2] if live else None), cps, events, figures)

    async def cancel(self, ref: str) -> Job:
        row = await self.machine.cancel(await self.resolve(ref))
        self.changed("jobs", row["id"])
        self.changed("workers", row["worker_id"])
        return job_from_row(row)

    async def requeue(self, ref: str) -> Job:
        row = await self.machine.requeue(await self.resolve(ref))
        self.changed("jobs", row["id"])
        self.changed("workers")  # its worker, if any, was freed
        return job_from_row(row)

    async def list_workers(self, statuses: Sequence[str] | None = None) -> list[Worker]:
        rows = await self.store.aio.list_workers(statuses)
        return [worker_from_row(r, self.last_seen.get(r["id"])) for r in rows]

    async def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        jobs = await self.store.aio.count_jobs_by_status()
        workers = await self.store.aio.count_workers_by_status()
        return jobs, workers

    async def purge(self, ref: str) -> dict[str, Any]:
        """Delete a finished job everywhere: its rows, then every stored object under its prefix.
        A job id no longer in the database still gets its leftover objects deleted."""
        text = ref.strip().lower()
        try:
            job_id = await self.resolve(ref)
        except NotFound:
            if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
                raise
            job_id = text  # rows already gone (an earlier purge whose storage part failed)
            removed = False
        else:
            row = await self.store.aio.get_job(job_id)
            terminal = [str(s) for s in (JobStatus.completed, JobStatus.failed,
                                         JobStatus.cancelled)]
            removed = await self.store.aio.purge_job(job_id, terminal)
            if not removed:
                raise ConflictError(f"job {job_id[:8]} is {row['status'] if row else 'gone'}; only "
                               "completed, failed or cancelled jobs can be purged (cancel it first)")
            self._job_json.forget(job_id)
            self._progress.pop(job_id, None)
            self.changed("jobs", job_id)
        try:
            objects = await self._storage(self.storage.delete_prefix, job_prefix(job_id))
        except Exception as exc:
            raise BadRequest(
                f"job {job_id[:8]} is purged from the database but its stored objects under "
                f"{job_prefix(job_id)} could not all be deleted ({exc}); run the purge again "
                f"with the full id {job_id}", "storage_unavailable", 503) from None
        if not removed and objects == 0:
            raise NotFound(f"no job {job_id} and nothing stored for it")
        log.info("job %s purged (%d stored objects deleted)", job_id[:8], objects)
        return {"job_id": job_id, "objects_deleted": objects, "database": removed}

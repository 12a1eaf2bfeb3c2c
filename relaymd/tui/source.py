"""Where the console's data comes from: the orchestrator in this process (`ServiceSource`) or
one elsewhere over the API (`HttpSource`, `relaymd --connect URL`). Both hand the console light
row tuples, so a 10,000-job table is diffed and patched, never rebuilt per change; clusters and
usage come as the API's models (a few rows, read only while their view is shown)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from relaymd.models import ClusterInfo, Job, JobDetail, Usage, Worker


@dataclass(frozen=True)
class JobRow:
    id: str
    title: str
    status: str
    done: float | None  # progress fraction 0..1, None when unknown
    progress: str
    checkpoints: int
    worker: str
    created_at: float
    last_checkpoint_at: float | None
    ns_per_day: float | None = None  # the engine's latest rate
    eta: float | None = None  # seconds left at that rate (progress in ns with a total)


@dataclass(frozen=True)
class WorkerRow:
    id: str
    cluster: str
    provider: str  # where it comes from: slurm, salad or local
    gpu: str
    status: str
    job: str
    last_heartbeat_at: float | None
    wall_time_end: float | None
    provider_id: str = ""  # e.g. the SLURM job id of an allocation
    note: str = ""  # a placeholder's provider state, e.g. "PENDING (Priority)"
    registered_at: float | None = None


def progress_of(p: dict[str, Any] | None) -> tuple[float | None, str]:
    if not p or p.get("done") is None:
        return None, ""
    done, total, unit = float(p["done"]), p.get("total"), p.get("unit") or ""
    if total:
        text = f"{100 * done / float(total):.1f}%" if unit == "%" else \
            f"{done:g}/{float(total):g} {unit}".strip()
        return max(0.0, min(1.0, done / float(total))), text
    return None, f"{done:g} {unit}".strip()


def rate_of(p: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """ns/day and seconds left from a progress report: the engine's own rate, and the ns still
    to run at that rate when progress counts ns towards a total (else None)."""
    if not p or p.get("ns_per_day") is None:
        return None, None
    rate = float(p["ns_per_day"])
    if not math.isfinite(rate) or rate < 0:
        return None, None
    total, unit = p.get("total"), str(p.get("unit") or "").lower()
    if rate == 0 or not total or unit != "ns" or p.get("done") is None:
        return rate, None
    return rate, max(0.0, float(total) - float(p["done"])) / rate * 86400


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def job_row(job: Job) -> JobRow:
    p = job.progress.model_dump() if job.progress else None
    done, text = progress_of(p)
    return JobRow(job.id, job.title, str(job.status), done, text, job.checkpoints,
                  job.worker_id or "", job.created_at.timestamp(), _ts(job.last_checkpoint_at),
                  *rate_of(p))


def worker_row(w: Worker) -> WorkerRow:
    gpu = f"{w.gpus}x {w.gpu_model}".strip() if w.gpus else "cpu"
    return WorkerRow(w.id, w.cluster, w.provider or "-", gpu, str(w.status), w.job_id or "",
                     _ts(w.last_heartbeat_at), _ts(w.wall_time_end), w.provider_id or "",
                     w.note or "", _ts(w.registered_at))


class Source(Protocol):
    address: str

    async def jobs(self, ids: Collection[str] | None = None) -> list[JobRow]:
        """All jobs, or only those of `ids` that still exist."""

    def live_progress(self) -> dict[str, dict[str, Any]] | None:
        """Heartbeat-borne progress by job id (it moves without change events), or None when
        the source has no pushed changes and the console must poll `jobs()` instead."""

    async def workers(self) -> list[WorkerRow]: ...

    async def job(self, job_id: str) -> JobDetail: ...

    async def cancel(self, job_id: str) -> Job: ...

    async def requeue(self, job_id: str) -> Job: ...

    async def submit(self, directory: Path, title: str, command: str, checkpoint: list[str],
                     gpus: int | None) -> Job: ...

    async def clusters(self) -> list[ClusterInfo]:
        """Every configured cluster, as `relaymd clusters` lists them."""

    async def set_cluster_enabled(self, name: str, enabled: bool) -> ClusterInfo:
        """Let the orchestrator request workers from cluster `name` again, or stop it."""

    async def usage(self) -> Usage:
        """GPU-hours per job and per cluster, useful and redone (`relaymd usage`)."""

    def subscribe(self, callback: Callable[[str, str | None], None]) -> None: ...

    def local_workers_alive(self) -> int:
        """Worker processes this console's own orchestrator started that are still alive."""


class ServiceSource:
    """The orchestrator running in this event loop: reads straight from its store."""

    def __init__(self, orchestrator: Any) -> None:
        self.orch = orchestrator
        self.service = orchestrator.service
        self.address = orchestrator.url

    async def jobs(self, ids: Collection[str] | None = None) -> list[JobRow]:
        store, live = self.service.store, self.service._progress
        if ids is None:
            rows, _ = store.list_jobs(None, 10**9, None)
        else:
            rows = store.jobs_by_ids(list(ids))
        out = []
        for r in rows:
            p = live[r["id"]][2] if r["id"] in live else _load(r["progress"])
            done, text = progress_of(p)
            out.append(JobRow(r["id"], r["title"] or "", r["status"], done, text,
                              r["checkpoints"] or 0, r["worker_id"] or "", r["created_at"],
                              r["last_checkpoint_at"], *rate_of(p)))
        return out

    def live_progress(self) -> dict[str, dict[str, Any]] | None:
        return {job_id: p for job_id, (_, _, p) in self.service._progress.items()}

    async def workers(self) -> list[WorkerRow]:
        return [worker_row(w) for w in await self.service.list_workers()]

    async def job(self, job_id: str) -> JobDetail:
        return await self.service.get_job(job_id)  # type: ignore[no-any-return]

    async def cancel(self, job_id: str) -> Job:
        return await self.service.cancel(job_id)  # type: ignore[no-any-return]

    async def requeue(self, job_id: str) -> Job:
        return await self.service.requeue(job_id)  # type: ignore[no-any-return]

    async def submit(self, directory: Path, title: str, command: str, checkpoint: list[str],
                     gpus: int | None) -> Job:
        from relaymd.client import Client
        from relaymd.server.auth import read_tokens_file
        from relaymd.submitting import build_spec, submit_directory

        spec = build_spec(directory, command or None, checkpoint, gpus, None)
        # The file always holds the operator token in force (configured or generated).
        token = read_tokens_file(self.service.settings.tokens_path)["operator"]

        def run() -> Job:
            with Client(self.address, token) as client:
                return submit_directory(client, directory, spec, title or None, gpus=gpus)
        return await asyncio.to_thread(run)  # the upload goes through our own API: same checks

    async def clusters(self) -> list[ClusterInfo]:
        provisioner = getattr(self.orch, "provisioner", None)
        return [] if provisioner is None else await provisioner.overview()  # type: ignore[no-any-return]

    async def set_cluster_enabled(self, name: str, enabled: bool) -> ClusterInfo:
        provisioner = getattr(self.orch, "provisioner", None)
        if provisioner is None:
            raise RuntimeError(f"no cluster {name!r}: provisioning is not running")
        return await provisioner.switch(name, enabled)  # type: ignore[no-any-return]

    async def usage(self) -> Usage:
        return await self.service.usage_report()  # type: ignore[no-any-return]

    def subscribe(self, callback: Callable[[str, str | None], None]) -> None:
        self.service.listeners.append(callback)

    def local_workers_alive(self) -> int:
        provider = getattr(self.orch, "provider", None)
        if provider is None:
            return 0
        return sum(1 for w in provider.workers if w.proc.poll() is None)


class HttpSource:
    """An orchestrator elsewhere, over its API (polled; there are no pushed changes)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.address = str(client.http.base_url).rstrip("/")

    async def jobs(self, ids: Collection[str] | None = None) -> list[JobRow]:
        if ids is None:
            return [job_row(j) for j in await asyncio.to_thread(self.client.all_jobs)]
        out = []
        for job_id in ids:
            try:
                out.append(job_row(await asyncio.to_thread(self.client.get_job, job_id)))
            except Exception:  # purged meanwhile: it leaves the table
                continue
        return out

    def live_progress(self) -> dict[str, dict[str, Any]] | None:
        return None

    async def workers(self) -> list[WorkerRow]:
        return [worker_row(w) for w in await asyncio.to_thread(self.client.workers)]

    async def job(self, job_id: str) -> JobDetail:
        return await asyncio.to_thread(self.client.get_job, job_id)  # type: ignore[no-any-return]

    async def cancel(self, job_id: str) -> Job:
        return await asyncio.to_thread(self.client.cancel, job_id)  # type: ignore[no-any-return]

    async def requeue(self, job_id: str) -> Job:
        return await asyncio.to_thread(self.client.requeue, job_id)  # type: ignore[no-any-return]

    async def submit(self, directory: Path, title: str, command: str, checkpoint: list[str],
                     gpus: int | None) -> Job:
        from relaymd.submitting import build_spec, submit_directory

        spec = build_spec(directory, command or None, checkpoint, gpus, None)
        return await asyncio.to_thread(submit_directory, self.client, directory, spec,
                                       title or None, gpus)

    async def clusters(self) -> list[ClusterInfo]:
        return await asyncio.to_thread(self.client.clusters)  # type: ignore[no-any-return]

    async def set_cluster_enabled(self, name: str, enabled: bool) -> ClusterInfo:
        return await asyncio.to_thread(  # type: ignore[no-any-return]
            self.client.set_cluster_enabled, name, enabled)

    async def usage(self) -> Usage:
        return await asyncio.to_thread(self.client.usage)  # type: ignore[no-any-return]

    def subscribe(self, callback: Callable[[str, str | None], None]) -> None:
        pass  # polled

    def local_workers_alive(self) -> int:
        return 0


def _load(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    import json

    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


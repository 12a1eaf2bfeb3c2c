"""The fleet: worker registration and identity, placeholders, clusters, bootstrap tokens,
liveness (flush and reap)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from relaymd.models import (
    LEASED_JOB_STATES,
    WorkerRegister,
    WorkerRegistered,
    WorkerStatus,
)
from relaymd.secrets import redact_logs
from relaymd.server.auth import hash_token, mask, new_token, write_tokens_file
from relaymd.server.service.base import (
    LIVE,
    REGISTRATION_MARGIN,
    BadRequest,
    ConflictError,
    Forbidden,
    NotFound,
    ServiceBase,
)
from relaymd.server.store import RegistrationCapped
from relaymd.server.transitions import WorkerConflict

log = logging.getLogger(__name__)


class FleetOps(ServiceBase):
    # ------------------------------------------------------------------ workers

    def cluster_trusted(self, cluster: str) -> bool:
        """Whether a cluster's machines run under the operator's own account. This machine's
        workers are; a configured cluster says (salad: not by default); anything else is not."""
        config = self.cluster_configs.get(cluster)
        if config is not None:
            return bool(config.trusted)
        return cluster == self.auth.tokens.local

    def registration_cap(self, cluster: str) -> int | None:
        """Live registrations a cluster may hold: its max_workers and a margin (a worker that
        restarts registers before its old row is reaped). None: this machine's own workers."""
        config = self.cluster_configs.get(cluster)
        if config is None or cluster == self.auth.tokens.local:
            return None
        return config.max_workers + max(REGISTRATION_MARGIN, config.max_workers // 4)

    async def register(self, req: WorkerRegister, cluster: str) -> WorkerRegistered:
        """Register a worker of `cluster`: the cluster its bootstrap token was issued for. The
        request body may repeat the cluster's name but never claim another; the provider is the
        cluster's, whatever the body says."""
        if req.cluster is not None and req.cluster != cluster:
            log.warning("refused a registration claiming cluster %r with the token of cluster "
                        "%r (host %r)", req.cluster[:100], cluster, req.hostname[:100])
            raise Forbidden(f"this bootstrap token belongs to cluster {cluster!r}, not "
                            f"{req.cluster[:100]!r}; unset RELAYMD_CLUSTER or use that "
                            "cluster's token (`relaymd tokens show CLUSTER`)")
        config = self.cluster_configs.get(cluster)
        provider = config.provider if config is not None else "local"
        now = self.clock()
        token = new_token()
        worker_id = uuid.uuid4().hex
        row = {
            "id": worker_id, "name": req.name, "hostname": req.hostname,
            "cluster": cluster, "provider": provider, "provider_id": req.provider_id,
            "compute_platform": req.compute_platform, "gpus": req.gpus, "gpu_model": req.gpu_model,
            "vram_gb": req.vram_gb, "job_id": None,
            "token_hash": hash_token(token), "registered_at": now, "last_heartbeat_at": now,
            "wall_time_end": req.wall_time_end.timestamp() if req.wall_time_end else None,
        }
        cap = self.registration_cap(cluster)
        try:
            stored = await self.machine.register_worker(
                row, f"{cluster}/{provider} {req.hostname}".strip(), cap)
        except RegistrationCapped as exc:
            if now - self._flood_logged.get(cluster, -1e9) > 60:  # once a minute, not per try
                self._flood_logged[cluster] = now
                log.warning("cluster %s: refused registrations past its cap of %d live workers "
                            "(a flood, or max_workers too low)", cluster, exc.cap)
            raise BadRequest(f"cluster {cluster!r} already has {exc.cap} live workers (its "
                             "max_workers and a margin); try again later",
                             "too_many_workers", 429) from None
        worker_id = stored["id"]  # its placeholder's id when it had one
        self.auth.add_session(row["token_hash"], worker_id)
        self.last_seen[worker_id] = now
        self.changed("workers", worker_id)
        return WorkerRegistered(worker_id=worker_id, token=token,
                                heartbeat_interval=self.settings.heartbeat_interval,
                                heartbeat_timeout=self.settings.heartbeat_timeout)

    async def deregister(self, worker_id: str, reason: str = "worker exited") -> None:
        worker = await self.store.aio.get_worker(worker_id)
        if worker is None:
            raise NotFound(f"no worker {worker_id}")
        if worker["job_id"]:
            job = await self.store.aio.get_job(worker["job_id"])
            if job and job["worker_id"] == worker_id and job["status"] in LEASED_JOB_STATES:
                await self._lose(job, f"worker deregistered: {reason}")
        if worker["status"] != WorkerStatus.gone:
            await self.machine.change_worker(worker_id, "deregister", reason, job_id=None,
                                             token_hash=None)
        self.auth.drop_worker(worker_id)
        self.last_seen.pop(worker_id, None)
        self.last_claim.pop(worker_id, None)
        self.changed("workers", worker_id)

    # ------------------------------------------------------------------ provisioning

    async def add_placeholder(self, cluster: str, provider: str, provider_id: str, gpus: int,
                              name: str) -> str:
        """Record a request for a worker (an sbatch job) until its worker registers with
        `provider_id`; the provisioning loop counts it as pending, so it never asks twice."""
        now = self.clock()
        worker_id = uuid.uuid4().hex
        await self.machine.add_placeholder({
            "id": worker_id, "name": name, "hostname": "", "cluster": cluster,
            "provider": provider, "provider_id": provider_id, "compute_platform": "", "gpus": gpus,
            "gpu_model": "", "vram_gb": 0.0, "job_id": None, "token_hash": None,
            "registered_at": now, "last_heartbeat_at": None, "wall_time_end": None,
            "note": "submitted",
        }, f"{cluster}: requested {provider} {provider_id}")
        self.changed("workers", worker_id)
        return worker_id

    async def drop_placeholder(self, worker_id: str, reason: str) -> None:
        try:
            await self.machine.change_worker(worker_id, "deregister", reason)
        except WorkerConflict:
            return  # it registered meanwhile: the worker owns the row now
        self.changed("workers", worker_id)

    # ------------------------------------------------------------------ bootstrap tokens

    def _token_clusters(self) -> list[str]:
        """The clusters that have a bootstrap token: the configured ones and this machine's."""
        return sorted({*self.cluster_configs, self.auth.tokens.local})

    def _token_cluster(self, name: str) -> str:
        known = self._token_clusters()
        if name not in known:
            raise NotFound(f"no cluster {name!r} (clusters: {', '.join(known)})")
        return name

    def tokens(self) -> list[dict[str, Any]]:
        """Each cluster's bootstrap token, masked (`relaymd tokens`)."""
        book = self.auth.tokens
        out = []
        for name in self._token_clusters():
            token = book.for_cluster(name)
            config = self.cluster_configs.get(name)
            out.append({"cluster": name, "provider": config.provider if config else "local",
                        "trusted": self.cluster_trusted(name),
                        "token": mask(token) if token else None})
        return out

    def token(self, name: str) -> dict[str, Any]:
        """One cluster's bootstrap token in clear, to paste into Salad or a secrets store."""
        token = self.auth.tokens.for_cluster(self._token_cluster(name))
        if token is None:
            raise NotFound(f"cluster {name!r} has no bootstrap token yet; restart the "
                           "orchestrator after adding it to the config")
        return {"cluster": name, "token": token}

    async def rotate_token(self, name: str) -> dict[str, Any]:
        """A new bootstrap token for a cluster; the old one is refused from now on. Workers
        already registered keep their session tokens; new ones need the new token."""
        self._token_cluster(name)
        if name == self.auth.tokens.local and self.settings.worker_token is not None:
            raise ConflictError(f"cluster {name!r}'s token comes from the configuration "
                                "(worker_token / RELAYMD_WORKER_TOKEN); change it there and restart")
        token = self.auth.rotate(name)
        await asyncio.to_thread(write_tokens_file, self.settings.tokens_path, self.auth.tokens)
        redact_logs([token])
        log.warning("bootstrap token of cluster %s rotated by the operator; the old one is "
                    "refused from now on", name)
        return {"cluster": name, "token": token}

    async def set_worker_note(self, worker_id: str, note: str | None) -> None:
        await self.store.aio.set_worker_note(worker_id, note)

    async def worker_lost(self, worker_id: str, reason: str) -> None:
        """The provider says this worker's allocation is over: its job goes back to the queue
        now (an interruption; no failure counted) rather than after the heartbeat timeout."""
        try:
            await self.deregister(worker_id, reason)
        except (NotFound, WorkerConflict):
            pass

    async def flush(self) -> None:
        """Write buffered liveness and progress to the store."""
        seen = list(self.last_seen.items())
        progress = [(j, w, a, p) for j, (w, a, p) in self._progress.items()]
        await self.store.aio.write_heartbeats(seen)
        await self.store.aio.write_progress(progress)

    async def reap(self) -> int:
        """Mark silent workers stale and put their jobs back in the queue. Returns jobs requeued."""
        await self.flush()
        now = self.clock()
        cutoff = now - self.settings.heartbeat_timeout
        requeued = 0
        for w in await self.store.aio.list_workers(LIVE):
            seen = self.last_seen.setdefault(w["id"], now)
            if seen >= cutoff:
                continue
            silent = now - seen
            try:
                await self.machine.change_worker(w["id"], "stale",
                                                 f"no heartbeat for {silent:.0f}s", job_id=None)
            except Exception:
                continue
            log.warning("worker %s is stale (no heartbeat for %.0fs)", w["id"][:8], silent)
            self.changed("workers", w["id"])
        for job in await self.store.aio.orphaned_jobs():
            await self._lose(job, "its worker stopped heartbeating or is gone")
            requeued += 1
        if requeued:
            self.changed("jobs")
        return requeued

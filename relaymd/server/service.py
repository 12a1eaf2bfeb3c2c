"""The orchestrator's operations: what the API routes, the console and the scheduler call.

Reads go to the store; every state change goes through `StateMachine`; storage calls run in
threads. Worker liveness (heartbeat times) and progress live in memory and are flushed to the
store by the maintenance job: a heartbeat is not a promise that anything was saved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from relaymd.config import DEFAULT_CLUSTER_PRIORITY, ClusterConfig, Settings
from relaymd.models import (
    LEASED_JOB_STATES,
    LIVE_WORKER_STATES,
    Assignment,
    BundleSpec,
    BundleUploaded,
    CheckpointRef,
    CheckpointReport,
    CheckpointReserved,
    ClusterInfo,
    HeartbeatReply,
    Job,
    JobCreate,
    JobDetail,
    JobStatus,
    Worker,
    WorkerRegister,
    WorkerRegistered,
    WorkerStatus,
)
from relaymd.secrets import redact_logs
from relaymd.server import scheduling
from relaymd.server.auth import Authenticator, hash_token, mask, new_token, write_tokens_file
from relaymd.server.store import RegistrationCapped, Store, dumps
from relaymd.server.transitions import (
    JobNotFound,
    StateMachine,
    TransitionConflict,
    WorkerConflict,
)
from relaymd.server.views import JobJsonCache, job_detail, job_from_row, worker_from_row
from relaymd.storage import (
    ObjectNotFound,
    Storage,
    bundle_key,
    checkpoint_key,
    job_prefix,
    manifest_key,
)
from relaymd.storage.bundle import BundleError, checkpoint_refusal, inspect_bundle, read_member

log = logging.getLogger(__name__)
LIVE = sorted(s.value for s in LIVE_WORKER_STATES)
STORAGE_TIMEOUT = 300.0
PENDING_BUNDLES = 1000  # uploaded bundles whose spec is kept in memory until their job exists
REGISTRATION_MARGIN = 2  # live registrations a cluster may hold past its max_workers (at least)


class BadRequest(Exception):
    """The caller sent something unusable; the message says what and how to fix it."""

    def __init__(self, message: str, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.code, self.status = code, status


class Conflict(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, "conflict", 409)


class Forbidden(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, "forbidden", 403)


class NotFound(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, "not_found", 404)


def parse_bundle_spec(raw: bytes | None, where: str) -> BundleSpec:
    if raw is None:
        raise BadRequest(f"{where}: bundle has no relaymd.yaml at its root; "
                         "add one or pass --command to `relaymd submit`", "invalid_bundle", 422)
    try:
        data = yaml.safe_load(raw) or {}
        spec = BundleSpec.model_validate(data)
        spec.model_dump_json()  # text that cannot be written back out (lone surrogates) is refused
        return spec
    except (yaml.YAMLError, RecursionError) as exc:
        raise BadRequest(f"{where}: relaymd.yaml is not valid YAML (or nested too deeply): "
                         f"{str(exc)[:300]}", "invalid_bundle", 422) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise BadRequest(f"{where}: relaymd.yaml: {field}: {first['msg']}", "invalid_bundle",
                         422) from None
    except (ValueError, TypeError, UnicodeError, PydanticSerializationError) as exc:
        # PyYAML raises plain ValueError for values it cannot construct (`2001-13-01`, `!!int x`)
        raise BadRequest(f"{where}: relaymd.yaml has a value that cannot be read: "
                         f"{str(exc)[:300]}", "invalid_bundle", 422) from None


class Service:
    def __init__(self, settings: Settings, store: Store, storage: Storage, auth: Authenticator,
                 clock: Callable[[], float] = time.time,
                 clusters: list[ClusterConfig] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.auth = auth
        self.clock = clock
        self.machine = StateMachine(store, clock, settings.quarantine_after)
        self.last_seen: dict[str, float] = {}
        self._progress: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._job_json = JobJsonCache()
        # Specs of bundles uploaded but not yet turned into jobs, newest last. Bounded: one that
        # falls out is read back from storage if its job is ever created (_bundle_for).
        self._pending_bundles: OrderedDict[str, BundleUploaded] = OrderedDict()
        # The console subscribes here: called with ("jobs", job_id) or ("workers", worker_id)
        # after each committed change, the id None when many rows may have changed.
        self.listeners: list[Callable[[str, str | None], None]] = []
        self._gc_tasks: dict[str, asyncio.Task[None]] = {}  # job id -> its running prune
        self._gc_again: set[str] = set()
        self.started_at = clock()
        self.provisioner: Any = None  # set by the orchestrator: `relaymd clusters` asks it
        # The clusters workers may come from (configured, plus this machine's own).
        self.cluster_configs = {c.name: c for c in (settings.clusters if clusters is None else clusters)}
        self._priorities = {c.name: c.priority or 0 for c in self.cluster_configs.values()}
        self.last_claim: dict[str, float] = {}  # worker id -> when it last asked for work
        self._flood_logged: dict[str, float] = {}  # cluster -> when a refused flood was logged

    def changed(self, what: str, key: str | None = None) -> None:
        for listener in self.listeners:
            try:
                listener(what, key)
            except Exception:  # a broken listener must never break the API
                log.exception("change listener failed")

    async def _storage(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), STORAGE_TIMEOUT)

    async def load(self) -> None:
        """After a (re)start: restore session tokens, give live workers a full timeout."""
        self.auth.set_sessions(await self.store.aio.worker_tokens())
        now = self.clock()
        for w in await self.store.aio.list_workers(LIVE):
            self.last_seen[w["id"]] = now
            self.last_claim[w["id"]] = now  # given the benefit of the doubt, like last_seen

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
        return job_detail(job_from_row(row, live[2] if live else None), cps, events)

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
            "platform": req.platform, "gpus": req.gpus, "gpu_model": req.gpu_model,
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
                job_id, job["status"], "running", job["attempt"],
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
            "provider": provider, "provider_id": provider_id, "platform": "", "gpus": gpus,
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

    async def clusters(self) -> list[ClusterInfo]:
        if self.provisioner is None:
            return []
        workers = await self.store.aio.cluster_workers()
        return list(self.provisioner.info(workers))

    async def switch_cluster(self, name: str, enabled: bool) -> ClusterInfo:
        if self.provisioner is None:
            raise NotFound(f"no cluster {name!r}: provisioning is not running")
        await self.provisioner.set_enabled(name, enabled)
        return next(c for c in await self.clusters() if c.name == name)

    # ------------------------------------------------------------------ bootstrap tokens

    def _token_cluster(self, name: str) -> str:
        known = sorted({*self.cluster_configs, self.auth.tokens.local})
        if name not in known:
            raise NotFound(f"no cluster {name!r} (clusters: {', '.join(known)})")
        return name

    def tokens(self) -> list[dict[str, Any]]:
        """Each cluster's bootstrap token, masked (`relaymd tokens`)."""
        book = self.auth.tokens
        out = []
        for name in sorted({*self.cluster_configs, book.local}):
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
            raise Conflict(f"cluster {name!r}'s token comes from the configuration "
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
        """The configured cluster's priority; for others, its provider's default (a worker
        registers its platform, so `hpc` stands for slurm)."""
        configured = self._priorities.get(cluster)
        if configured is not None:
            return configured
        return DEFAULT_CLUSTER_PRIORITY.get({"hpc": "slurm"}.get(provider, provider), 0)

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
            files = json.loads(raw)["files"]
            names = [str(n) for n in files]
        except (ValueError, TypeError, KeyError):
            raise BadRequest(f"job {job_id[:8]}: checkpoint {seq}'s manifest is not a JSON "
                             "object with a `files` map", "invalid_checkpoint", 422) from None
        for name in names:
            try:
                why = checkpoint_refusal(name, spec.paths, spec.sentinel)
            except BundleError as exc:
                why = str(exc)
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
        await self._check_holder(worker_id, job_id)
        self.last_claim[worker_id] = self.clock()  # idle again and about to claim
        if report is not None:
            await self._verify_uploaded(job_id, report)
        row = await self.machine.release(job_id, worker_id, attempt, reason, report,
                                         await self._worker_trusted(worker_id))
        self._progress.pop(job_id, None)
        self.changed("jobs", job_id)
        self.changed("workers", worker_id)
        if report is not None:
            self.prune_soon(job_id)
        return job_from_row(row)

    async def complete(self, worker_id: str, job_id: str, attempt: int,
                       report: CheckpointReport | None) -> Job:
        await self._check_holder(worker_id, job_id)
        self.last_claim[worker_id] = self.clock()  # idle again and about to claim
        if report is not None:
            await self._verify_uploaded(job_id, report)
        row = await self.machine.complete(job_id, worker_id, attempt, report,
                                          await self._worker_trusted(worker_id))
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

    # ------------------------------------------------------------------ storage upkeep

    def prune_soon(self, job_id: str) -> None:
        """Delete the job's checkpoints older than the newest `checkpoint_keep`, in the
        background (the worker's reply does not wait for storage). One prune per job at a time;
        a checkpoint accepted meanwhile gets one more pass."""
        if job_id in self._gc_tasks:
            self._gc_again.add(job_id)
            return
        task = asyncio.get_running_loop().create_task(self._prune(job_id))
        self._gc_tasks[job_id] = task

    async def _prune(self, job_id: str) -> None:
        try:
            while True:
                self._gc_again.discard(job_id)
                await self.prune(job_id)
                if job_id not in self._gc_again:
                    return
        except Exception as exc:  # storage down: the next checkpoint tries again
            log.warning("job %s: old checkpoints not deleted yet: %s", job_id[:8], exc)
        finally:
            self._gc_tasks.pop(job_id, None)

    async def prune(self, job_id: str) -> int:
        """Keep the newest `checkpoint_keep` accepted checkpoints; delete every stored checkpoint
        object below the oldest kept one (also uploads that were never accepted). Returns the
        number of objects deleted."""
        oldest_kept = await self.store.aio.prune_checkpoints(job_id,
                                           self.settings.checkpoint_keep)
        if oldest_kept is None:
            return 0
        prefix = checkpoint_key(job_id, 0).rpartition("/")[0] + "/"
        deleted = 0
        for key in await self._storage(self.storage.list, prefix):
            seq = key.rpartition("/")[2].partition(".")[0]
            if seq.isdigit() and int(seq) < oldest_kept:
                await self._storage(self.storage.delete, key)
                deleted += 1
        if deleted:
            log.info("job %s: deleted %d stored object(s) of checkpoints before %d", job_id[:8],
                     deleted, oldest_kept)
        return deleted

    async def drain(self) -> None:
        """Wait for background prunes (at shutdown)."""
        while self._gc_tasks:
            await asyncio.gather(*list(self._gc_tasks.values()), return_exceptions=True)

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
                raise Conflict(f"job {job_id[:8]} is {row['status'] if row else 'gone'}; only "
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

    # ------------------------------------------------------------------ maintenance

    async def _lose(self, job: dict[str, Any], reason: str) -> None:
        try:
            await self.machine.lose(job["id"], job["worker_id"], job["attempt"], reason)
            log.info("job %s back to the queue: %s", job["id"][:8], reason)
        except (TransitionConflict, JobNotFound):
            pass  # it moved on by itself meanwhile: nothing to recover
        self._progress.pop(job["id"], None)

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

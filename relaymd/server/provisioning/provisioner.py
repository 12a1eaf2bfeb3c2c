"""The provisioning loop: every cycle, route queued work to clusters and ask them for workers.

One `cycle()` per `provision_interval`:

1. each provider reconciles its requests with what it sees (squeue, Salad instances, local
   processes) and says how many are pending;
2. each queued job is routed to the first enabled cluster, by priority (HPC before Salad by
   default), that can run it (enough GPUs, allowed by `preferred_clusters`) and still has room:
   its idle and pending workers, plus what it may still request. What HPC cannot cover
   overflows to the next cluster. A job no enabled cluster can run gets a `queue_blocked_reason`
   (`blocked.py`) unless an idle registered worker still asking for work can take it;
3. each cluster's strategy decides how many workers to request, and its provider does it. A
   provider's failure is logged and recorded as the cluster's last decision; the loop carries on.
   A cluster with nothing routed to it is asked to give back idle capacity.

Run-time switches (`relaymd clusters enable|disable`) are kept in the database, so they survive
a restart of the orchestrator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaymd.config import LOCAL_CLUSTER, ClusterConfig, OrchestratorSettings
from relaymd.models import LIVE_JOB_STATES, LIVE_WORKER_STATES, ClusterInfo, to_datetime
from relaymd.models import WorkerStatus as W
from relaymd.server.auth import Tokens
from relaymd.server.provisioning.base import Provider, ProviderError, Seen
from relaymd.server.provisioning.blocked import Offer, why_blocked
from relaymd.server.provisioning.local import LocalProvider
from relaymd.server.provisioning.strategies import ClusterView, Decision, decide
from relaymd.server.service import NotFound, Service
from relaymd.server.store import load_json

log = logging.getLogger(__name__)


@dataclass
class ClusterState:
    """What the loop last saw and did for one cluster."""

    config: ClusterConfig
    provider: Provider
    gpus: int
    seen: Seen = field(default_factory=lambda: Seen(pending=0))
    view: ClusterView = field(default_factory=lambda: ClusterView(0, 0, 0, 0))
    decision: Decision = field(default_factory=lambda: Decision(0, "not run yet"))
    decided_at: float | None = None
    error: str | None = None


def group_by_cluster(workers: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for w in workers:
        out.setdefault(w["cluster"], []).append(w)
    return out


def build_provider(cluster: ClusterConfig, settings: OrchestratorSettings, service: Service, url: str,
                   tokens: Tokens) -> Provider:
    """The provider of one cluster; its workers get that cluster's bootstrap token (looked up
    at each request, so a rotated token applies to the next submission)."""
    def token() -> str:
        value = tokens.for_cluster(cluster.name)
        if value is None:
            raise ProviderError(f"cluster {cluster.name}: no bootstrap token")
        return value

    if cluster.provider == "slurm":
        from relaymd.server.provisioning.slurm import SlurmProvider

        return SlurmProvider(cluster, settings, service, url, token)
    if cluster.provider == "salad":
        from relaymd.server.provisioning.salad import SaladProvider

        assert cluster.salad is not None
        key = cluster.salad.api_key or settings.salad_api_key
        if key is None:
            raise ProviderError(f"cluster {cluster.name}: no Salad API key; set salad.api_key "
                                "for the cluster or RELAYMD_SALAD_API_KEY")
        return SaladProvider(cluster, key.get_secret_value())
    return LocalProvider(settings, service, url, cluster, token)


class Provisioner:
    def __init__(self, settings: OrchestratorSettings, service: Service, clusters: list[ClusterConfig],
                 providers: dict[str, Provider], clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.service = service
        self.clock = clock
        self.clusters: dict[str, ClusterState] = {}
        for c in sorted(clusters, key=lambda c: -(c.priority or 0)):
            provider = providers[c.name]
            gpus = provider.gpus if isinstance(provider, LocalProvider) else c.gpus
            self.clusters[c.name] = ClusterState(c, provider, gpus)
        self.switches: dict[str, bool] = {}

    @property
    def local(self) -> LocalProvider | None:
        for state in self.clusters.values():
            if isinstance(state.provider, LocalProvider):
                return state.provider
        return None

    def enabled(self, name: str) -> bool:
        return self.switches.get(name, self.clusters[name].config.enabled)

    async def load(self) -> None:
        """The run-time switches saved by an earlier orchestrator on this database."""
        store = self.service.store
        self.switches = await store.aio.cluster_switches()

    # ------------------------------------------------------------------ the cycle

    async def cycle(self) -> None:
        store = self.service.store
        self.switches = await store.aio.cluster_switches()
        workers = await store.aio.cluster_workers()
        by_cluster = group_by_cluster(workers)
        for name, state in self.clusters.items():
            mine = by_cluster.get(name, [])
            try:
                state.seen = await state.provider.reconcile(mine)
            except Exception as exc:  # a provider bug must not stop the others
                log.exception("cluster %s: reconcile failed", name)
                state.seen = Seen(pending=state.seen.pending, note=f"reconcile failed: {exc}")
        workers = await store.aio.cluster_workers()  # reconcile may have changed rows
        by_cluster = group_by_cluster(workers)
        queued = await store.aio.queued_jobs()
        jobs, _ = await self.service.counts()
        live_jobs = sum(jobs.get(s, 0) for s in LIVE_JOB_STATES)
        waiting, blocked = self.route(queued, workers)
        changed = await store.aio.set_blocked_reasons(blocked)
        for job_id in changed:
            self.service.changed("jobs", job_id)
        now = self.clock()
        for name, state in self.clusters.items():
            mine = by_cluster.get(name, [])
            state.view = ClusterView(
                waiting=waiting.get(name, 0),
                idle=self.spare(mine), busy=sum(w["status"] == W.busy for w in mine),
                pending=state.seen.pending, live_jobs=live_jobs)
            config = state.config.model_copy(update={"enabled": self.enabled(name)})
            decision = decide(config, state.view)
            previous_error, state.error = state.error, None
            if decision.submit > 0:
                try:
                    done = await state.provider.submit(decision.submit)
                    decision = Decision(done, decision.reason)
                except ProviderError as exc:
                    state.error = str(exc)
                    # Once per distinct error: a cluster down for a day must not flood the log.
                    if state.error != previous_error:
                        log.warning("cluster %s: could not request %d worker(s): %s; trying "
                                    "again every cycle", name, decision.submit, exc)
                    decision = Decision(0, f"{decision.reason}; request failed")
                except Exception as exc:
                    state.error = f"{type(exc).__name__}: {exc}"
                    log.exception("cluster %s: request failed", name)
                    decision = Decision(0, f"{decision.reason}; request failed")
                else:
                    if done:
                        log.info("cluster %s: requested %d worker(s): %s", name, done,
                                 decision.reason)
            elif state.view.waiting == 0:
                try:
                    await state.provider.scale_in(mine)
                except Exception as exc:
                    state.error = f"scale in: {exc}"
                    log.warning("cluster %s: scale in failed: %s", name, exc)
            if decision.submit or decision.reason != state.decision.reason:
                self.service.changed("clusters", name)
            state.decision, state.decided_at = decision, now

    def spare(self, workers: list[dict[str, Any]]) -> int:
        """Idle workers that count as capacity: those still asking for work."""
        return sum(w["status"] == W.idle and (self.service is None or self.service.claiming(w))
                   for w in workers)

    def route(self, queued: list[dict[str, Any]], workers: list[dict[str, Any]]
              ) -> tuple[dict[str, int], dict[str, str | None]]:
        """Queued jobs -> clusters, best first while they have room; and why the rest wait."""
        room: dict[str, int] = {}
        by_cluster = group_by_cluster(workers)
        for name, state in self.clusters.items():
            if not self.enabled(name):
                continue
            c = state.config
            mine = by_cluster.get(name, [])
            idle = self.spare(mine)
            alive = sum(w["status"] in LIVE_WORKER_STATES for w in mine) + state.seen.pending
            can_ask = max(0, min(c.max_pending - state.seen.pending, c.max_workers - alive))
            room[name] = idle + state.seen.pending + can_ask
        waiting: dict[str, int] = {}
        blocked: dict[str, str | None] = {}
        reasons: dict[tuple[Any, ...], str | None] = {}  # jobs that want the same share one
        for job in queued:
            allowed = load_json(job["preferred_clusters"])
            trusted_only = bool(job.get("trusted_only"))
            able = [n for n, s in self.clusters.items() if self.enabled(n)
                    and s.gpus >= job["gpus"] and (allowed is None or n in allowed)
                    and (s.config.trusted or not trusted_only)]
            if not able:
                key = (job["gpus"], None if allowed is None else tuple(allowed), trusted_only)
                if key not in reasons:
                    reasons[key] = self.why_blocked(job["gpus"], allowed, trusted_only, workers)
                blocked[job["id"]] = reasons[key]
                continue
            target = next((n for n in able if room[n] > 0), None)
            if target is None:  # everyone able is full: it waits on the best of them
                target = able[0]
                blocked[job["id"]] = ("waiting for capacity: " + ", ".join(
                    f"{n} is at its limits" for n in able))
            else:
                room[target] -= 1
                blocked[job["id"]] = None
            waiting[target] = waiting.get(target, 0) + 1
        return waiting, blocked

    def trusted(self, cluster: str) -> bool:
        """Whether a worker of `cluster` may hold a trusted-only job (the service's rule)."""
        if self.service is not None:
            return self.service.cluster_trusted(cluster)
        state = self.clusters.get(cluster)
        return bool(state.config.trusted) if state is not None else cluster == LOCAL_CLUSTER

    def why_blocked(self, gpus: int, allowed: list[str] | None, trusted_only: bool = False,
                    workers: list[dict[str, Any]] | None = None) -> str | None:
        """Why no enabled cluster can run the job (`blocked.why_blocked`): measured against the
        configured clusters and the registered live `workers`; None when an idle one still
        asking for work can take it."""
        clusters = [Offer(n, s.gpus, bool(s.config.trusted), self.enabled(n))
                    for n, s in self.clusters.items()]
        live = [Offer(w["cluster"] or "", w.get("gpus") or 0, self.trusted(w["cluster"] or ""),
                      busy=w["status"] != W.idle, asking=self.spare([w]) > 0)
                for w in workers or [] if w["status"] in LIVE_WORKER_STATES]
        return why_blocked(gpus, allowed, trusted_only, clusters, live)

    # ------------------------------------------------------------------ operator

    def info(self, workers: list[dict[str, Any]]) -> list[ClusterInfo]:
        out = []
        by_cluster = group_by_cluster(workers)
        for name, s in self.clusters.items():
            mine = by_cluster.get(name, [])
            out.append(ClusterInfo(
                name=name, provider=s.config.provider, strategy=s.config.strategy,
                enabled=self.enabled(name), priority=s.config.priority or 0, gpus=s.gpus,
                max_pending=s.config.max_pending, max_workers=s.config.max_workers,
                pending=s.seen.pending, idle=sum(w["status"] == W.idle for w in mine),
                busy=sum(w["status"] == W.busy for w in mine), waiting=s.view.waiting,
                last_decision=s.decision.reason, last_submitted=s.decision.submit,
                last_decision_at=to_datetime(s.decided_at), last_error=s.error,
                note=s.seen.note, details=s.seen.details))
        return out

    async def overview(self) -> list[ClusterInfo]:
        """Every configured cluster as `relaymd clusters` shows it."""
        return self.info(await self.service.store.aio.cluster_workers())

    async def switch(self, name: str, enabled: bool) -> ClusterInfo:
        """Enable or disable a cluster at run time (kept across restarts)."""
        await self.set_enabled(name, enabled)
        return next(c for c in await self.overview() if c.name == name)

    async def set_enabled(self, name: str, enabled: bool) -> None:
        if name not in self.clusters:
            known = ", ".join(self.clusters) or "none configured"
            raise NotFound(f"no cluster {name!r} (clusters: {known})")
        store = self.service.store
        await store.aio.set_cluster_enabled(name, enabled, self.clock())
        self.switches[name] = enabled
        log.info("cluster %s %s by operator", name, "enabled" if enabled else "disabled")
        self.service.changed("clusters", name)

    async def stop(self) -> None:
        for name, state in self.clusters.items():
            try:
                await state.provider.stop()
            except Exception:
                log.exception("cluster %s: provider stop failed", name)


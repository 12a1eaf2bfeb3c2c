"""Accounting: GPU-hours per job and per cluster (useful and redone), ns/day and ETAs, read from
the store and computed by `relaymd/server/usage.py`.

A job's history is re-read only when its row says something happened to it (a claim, a
checkpoint, an end of lease, a rejection: each changes one of the columns of `_fingerprint`),
and the figures of a job with no attempt running are kept with it, so a scrape of `/metrics`
costs one read of the claimed jobs' rows and a sum. Nothing here runs on the heartbeat path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaymd.models import LEASED_JOB_STATES, ClusterUsage, JobUsage, Usage, to_datetime
from relaymd.server import usage
from relaymd.server.service.base import ServiceBase
from relaymd.server.store import load_json

UNKNOWN_CLUSTER = "unknown"  # an attempt whose worker row is missing


def _fingerprint(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["status"], row["attempt"], row["failures"], row["checkpoints"],
            row["latest_checkpoint"], row["updated_at"])


@dataclass
class Spent:
    """One job's figures: in all, and by the cluster of the workers that ran its attempts."""

    total: usage.Totals = field(default_factory=usage.Totals)
    clusters: dict[str, usage.Totals] = field(default_factory=dict)


@dataclass
class Entry:
    """What is cached of one job: its history, and its figures once no attempt runs."""

    fingerprint: tuple[Any, ...]
    history: usage.History
    spent: Spent | None = None


class AccountingOps(ServiceBase):
    def _live_progress(self, row: dict[str, Any]) -> dict[str, Any] | None:
        live = self._progress.get(row["id"])
        return live[2] if live else load_json(row["progress"])

    async def _entries(self, rows: list[dict[str, Any]], every: bool = False
                       ) -> dict[str, Entry]:
        """Each job's cache entry, rebuilt where its row changed. `every`: `rows` are all the
        claimed jobs, so any other entry was purged and is forgotten."""
        cache: dict[str, Entry] = self._usage_histories
        found: dict[str, Entry] = {}  # kept here: the cache may change across the awaits
        stale = []
        for r in rows:
            entry = cache.get(r["id"])
            if entry is not None and entry.fingerprint == _fingerprint(r):
                found[r["id"]] = entry
            else:
                stale.append(r)
        if stale:
            events: dict[str, list[usage.HistoryEvent]] = {r["id"]: [] for r in stale}
            for e in await self.store.aio.usage_events(list(events), usage.KINDS):
                events[e["job_id"]].append(usage.HistoryEvent(
                    e["kind"], e["at"], e["attempt"], e["worker_id"], e["seq"]))
            for i, r in enumerate(stale):
                if i and i % 1000 == 0:
                    await asyncio.sleep(0)  # a first read of a big database: let others in
                found[r["id"]] = cache[r["id"]] = Entry(_fingerprint(r),
                                                         usage.history(events[r["id"]]))
            # A worker's GPUs and cluster do not change once it has claimed: each read once.
            known = self._usage_workers
            missing = {a.worker_id for r in stale for a in found[r["id"]].history.attempts
                       if a.worker_id is not None and a.worker_id not in known}
            if missing:
                for w in await self.store.aio.workers_gpus(sorted(missing)):
                    known[w["id"]] = (w["gpus"] or 0, w["cluster"] or "")
        if every:
            for gone in [k for k in cache if k not in found]:
                del cache[gone]
        return found

    def _gpus_of(self, row: dict[str, Any]) -> Callable[[str | None], int]:
        def gpus(worker_id: str | None) -> int:
            known = self._usage_workers.get(worker_id or "")
            return known[0] if known is not None else int(row["gpus"] or 0)
        return gpus

    def _cluster_of(self, worker_id: str | None) -> str:
        known = self._usage_workers.get(worker_id or "")
        return (known[1] or UNKNOWN_CLUSTER) if known is not None else UNKNOWN_CLUSTER

    def _spent(self, row: dict[str, Any], entry: Entry, now: float) -> Spent:
        if entry.spent is not None:
            return entry.spent
        attempts = usage.attempt_usage(entry.history, self._gpus_of(row), now)
        spent = Spent(usage.totals(attempts), usage.by_cluster(attempts, self._cluster_of))
        if all(a.end is not None for a in entry.history.attempts):
            entry.spent = spent  # nothing runs: these figures hold until the row changes
        return spent

    async def _eta(self, row: dict[str, Any], progress: dict[str, Any] | None,
                   checkpoints: list[dict[str, Any]] | None = None) -> float | None:
        if row["status"] not in LEASED_JOB_STATES:
            return None
        if checkpoints is None:
            checkpoints = await self.store.aio.attempt_checkpoints(row["id"], row["attempt"])
        points = [(c["created_at"], float(p["done"])) for c in checkpoints
                  if c.get("attempt", row["attempt"]) == row["attempt"]
                  and (p := load_json(c["progress"])) is not None]
        return usage.eta_seconds(progress, points)

    async def job_figures(self, row: dict[str, Any], checkpoints: list[dict[str, Any]]
                          ) -> dict[str, Any]:
        """The rate and compute fields of one job's `JobDetail` (its row, its checkpoints)."""
        spent = Spent()
        if row["attempt"]:
            (entry,) = (await self._entries([row])).values()
            spent = self._spent(row, entry, self.clock())
        progress = self._live_progress(row)
        return {"ns_per_day": usage.ns_per_day(progress),
                "eta_seconds": await self._eta(row, progress, checkpoints),
                "gpu_hours": spent.total.gpu_hours,
                "gpu_hours_useful": spent.total.gpu_hours_useful,
                "gpu_hours_redone": spent.total.gpu_hours_redone}

    async def _tally(self) -> tuple[float, list[tuple[dict[str, Any], Spent]],
                                    dict[str, usage.Totals]]:
        """Now, every claimed job's row and figures, and each cluster's (configured clusters
        included at zero)."""
        now = self.clock()
        rows = await self.store.aio.usage_jobs()
        entries = await self._entries(rows, every=True)
        clusters = {name: usage.Totals() for name in self.cluster_configs}
        out = []
        for i, row in enumerate(rows):
            if i and i % 1000 == 0:
                await asyncio.sleep(0)  # let heartbeats through on a big database
            spent = self._spent(row, entries[row["id"]], now)
            for name, t in spent.clusters.items():
                clusters.setdefault(name, usage.Totals()).merge(t)
            out.append((row, spent))
        return now, out, clusters

    async def gpu_hours_by_cluster(self) -> dict[str, tuple[float, float]]:
        """cluster -> (useful, redone) GPU-hours: the `/metrics` gauge."""
        _, _, clusters = await self._tally()
        return {name: (t.gpu_hours_useful, t.gpu_hours_redone) for name, t in clusters.items()}

    async def usage_report(self) -> Usage:
        """`GET /api/v1/usage`: every claimed job's GPU-hours, ns/day and ETA, and each
        cluster's GPU-hours."""
        now, spent, clusters = await self._tally()
        everything = usage.Totals()
        jobs = []
        for row, s in spent:
            everything.merge(s.total)
            progress = self._live_progress(row)
            jobs.append(JobUsage(
                id=row["id"], title=row["title"] or "", status=row["status"], gpus=row["gpus"],
                attempts=s.total.attempts, gpu_hours=s.total.gpu_hours,
                gpu_hours_useful=s.total.gpu_hours_useful,
                gpu_hours_redone=s.total.gpu_hours_redone,
                ns_per_day=usage.ns_per_day(progress), eta_seconds=await self._eta(row, progress)))
        return Usage(
            at=to_datetime(now), gpu_hours=everything.gpu_hours,
            gpu_hours_useful=everything.gpu_hours_useful,
            gpu_hours_redone=everything.gpu_hours_redone,
            clusters=[ClusterUsage(cluster=name, attempts=t.attempts, gpu_hours=t.gpu_hours,
                                   gpu_hours_useful=t.gpu_hours_useful,
                                   gpu_hours_redone=t.gpu_hours_redone)
                      for name, t in sorted(clusters.items())],
            jobs=jobs)

"""Who gets which job: claim ranking and set-aside, as pure functions over plain values.

Beside `provisioning/strategies.py` (how many workers to ask for), this decides what a claiming
worker gets. The store reads the candidates inside the claim's transaction and asks `choose`;
the service ranks the idle rivals with `rank` and keeps those that are `claiming`. Nothing here
touches the database, the clock or the network, so each rule is tested as a table
(tests/test_scheduling.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Rival:
    """An idle worker ranked above the claiming one: work it could run is set aside for it."""

    gpus: int
    cluster: str
    trusted: bool


@dataclass(frozen=True)
class Candidate:
    """A queued job the claiming worker could run, in queue order (priority, then age)."""

    id: str
    gpus: int
    clusters: tuple[str, ...] | None  # preferred_clusters; None: anywhere
    trusted_only: bool


def rank(gpus: int, priority: int, vram_gb: float) -> tuple[int, int, float]:
    """Idle workers' order for work, smaller first: more GPUs, then the cluster's priority (HPC
    before Salad), then more VRAM."""
    return (-gpus, -priority, -vram_gb)


def claiming(last_asked: float, now: float, window: float) -> bool:
    """Whether an idle worker is still after work: it asked (or registered) within `window`.
    One that only heartbeats is neither a rival nor spare capacity."""
    return last_asked >= now - window


def can_run(rival: Rival, job: Candidate) -> bool:
    return (rival.gpus >= job.gpus
            and (job.clusters is None or rival.cluster in job.clusters)
            and (rival.trusted or not job.trusted_only))


def choose(candidates: Sequence[Candidate], better: Sequence[Rival]) -> str | None:
    """The job the claiming worker takes: in queue order, each job that a better-ranked rival
    (best first) could run is set aside for that rival, once per rival; the first job left over
    is the claimer's. None: every candidate is set aside (or there is none)."""
    spare = list(better)
    for job in candidates:
        taker = next((r for r in spare if can_run(r, job)), None)
        if taker is None:
            return job.id
        spare.remove(taker)
    return None

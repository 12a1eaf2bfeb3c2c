"""When a cluster asks for more workers: the three strategies, as pure decisions on a snapshot.

`decide(cluster, view)` looks at one cycle's numbers for one cluster and says how many workers to
request and why, in words the operator sees in `relaymd clusters`. No I/O here, so each strategy
is tested on tables of situations.

- reactive: jobs wait here and the cluster has no idle or pending worker -> ask for one.
- continuous: while any job is queued or running, keep `target_workers` alive (registered +
  pending).
- jit_threshold: more jobs wait here (beyond idle and pending workers) than `threshold` -> ask
  for enough to cover them.

Every strategy stays within `max_pending` (requests not yet registered) and `max_workers`
(registered + pending), and a disabled cluster asks for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaymd.config import ClusterConfig


@dataclass(frozen=True)
class ClusterView:
    """One cycle's numbers for one cluster."""

    waiting: int  # queued jobs this cluster could run that no earlier cluster is covering
    idle: int  # registered workers of this cluster without a job
    busy: int  # registered workers of this cluster running a job
    pending: int  # requests made, worker not registered yet
    live_jobs: int = 0  # queued + assigned + running jobs anywhere (continuous keeps going while > 0)

    @property
    def alive(self) -> int:
        return self.idle + self.busy + self.pending


@dataclass(frozen=True)
class Decision:
    submit: int
    reason: str


def _cap(cluster: ClusterConfig, view: ClusterView, want: int, why: str) -> Decision:
    """Clip a wish to max_pending and max_workers, saying which limit bit."""
    room_pending = cluster.max_pending - view.pending
    room_workers = cluster.max_workers - view.alive
    n = min(want, room_pending, room_workers)
    if n >= want:
        return Decision(want, why)
    if n <= 0:
        if room_workers <= room_pending:
            return Decision(0, f"{why}, but at max_workers ({cluster.max_workers}: "
                               f"{view.idle + view.busy} registered, {view.pending} pending)")
        return Decision(0, f"{why}, but at max_pending ({cluster.max_pending} pending)")
    limit = "max_workers" if room_workers <= room_pending else "max_pending"
    return Decision(n, f"{why}; {n} of {want} within {limit}")


def decide(cluster: ClusterConfig, view: ClusterView) -> Decision:
    if not cluster.enabled:
        return Decision(0, "disabled")
    if cluster.strategy == "continuous":
        if view.live_jobs == 0:
            return Decision(0, "no job is queued or running")
        short = cluster.target_workers - view.alive
        if short <= 0:
            return Decision(0, f"{view.alive} of target {cluster.target_workers} workers alive")
        return _cap(cluster, view, short,
                    f"{view.alive} of target {cluster.target_workers} workers alive")
    if view.waiting == 0:
        return Decision(0, "no queued job for this cluster")
    if cluster.strategy == "reactive":
        if view.idle or view.pending:
            return Decision(0, f"{view.waiting} queued; {view.idle} idle and {view.pending} "
                               "pending worker(s) will take them")
        return _cap(cluster, view, 1, f"{view.waiting} queued, no idle or pending worker")
    # jit_threshold
    uncovered = view.waiting - view.idle - view.pending
    if uncovered <= cluster.threshold:
        return Decision(0, f"{max(uncovered, 0)} queued beyond idle/pending workers, "
                           f"threshold {cluster.threshold}")
    return _cap(cluster, view, uncovered,
                f"{uncovered} queued beyond idle/pending workers > threshold {cluster.threshold}")

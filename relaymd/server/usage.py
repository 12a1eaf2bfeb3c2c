"""GPU-hours, rates and ETAs from a job's history, as pure functions over plain values.

Nothing here touches the database or the clock: the service (`service/accounting.py`) reads the
events and checkpoints and hands them in with the time, so each rule is tested on a constructed
history with hand-checked numbers (tests/test_usage.py).

Definitions:

- An attempt runs from its `claim` event to the first event that ends its lease (`release`,
  `lose`, `complete`, `fail`, `cancel`, `requeue` of that attempt); a running one, to now. Its
  GPU-seconds are that wall time times its worker's GPUs (the whole worker is the job's while it
  holds it; the job's own `gpus` when the worker is unknown).
- The checkpoint an attempt resumed from is the newest accepted one at its claim (replayed from
  the `checkpoint`, `release` and `complete` events that carry a seq), less any it rejected as
  corrupt (`checkpoint_rejected`: it fell back to the next older one).
- Redone: the part of an attempt after the checkpoint the next attempt resumed from (all of it
  when that checkpoint is older than the attempt, or there is none): work lost to a kill, a
  hand-off or a failure and computed again. A checkpoint's time is when the orchestrator
  accepted it. The last attempt has no successor, so nothing of it is redone (yet).
- Useful: the rest (GPU-hours minus redone).
- Rate: `done` per wall-clock second between the first and the last checkpoint of the current
  attempt that carry progress (at least two, `done` grown); without those, the engine's own
  `ns_per_day` when its progress unit is "ns". ETA: (total - done) / rate, with `done` the
  latest progress; None when the job is not running, has no `total`, or the rate is unknown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

CLAIM = "claim"
REJECTED = "checkpoint_rejected"
ENDS_ATTEMPT = frozenset({"release", "lose", "complete", "fail", "cancel", "requeue"})
ACCEPTS_CHECKPOINT = frozenset({"checkpoint", "release", "complete"})  # when it carries a seq
KINDS = sorted({CLAIM, REJECTED, *ENDS_ATTEMPT, *ACCEPTS_CHECKPOINT})  # the events read here
DAY = 86400.0
HOUR = 3600.0


@dataclass(frozen=True)
class HistoryEvent:
    """One row of the events table, as much of it as usage needs."""

    kind: str
    at: float
    attempt: int | None = None
    worker_id: str | None = None
    seq: int | None = None


@dataclass
class Attempt:
    number: int
    worker_id: str | None
    start: float
    end: float | None = None  # None: still holding the job
    resumed_from: int | None = None  # the checkpoint seq it started from; None: from scratch


@dataclass
class History:
    attempts: list[Attempt] = field(default_factory=list)
    accepted_at: dict[int, float] = field(default_factory=dict)  # every seq ever accepted


def history(events: Iterable[HistoryEvent]) -> History:
    """A job's attempts and checkpoints, from its events in the order they were written."""
    out = History()
    accepted: set[int] = set()  # the checkpoints a claim would resume from
    current: Attempt | None = None
    for e in events:
        if e.kind == CLAIM:
            current = Attempt(e.attempt or len(out.attempts) + 1, e.worker_id, e.at,
                              resumed_from=max(accepted, default=None))
            out.attempts.append(current)
        elif e.kind in ACCEPTS_CHECKPOINT and e.seq is not None:
            accepted.add(e.seq)
            out.accepted_at.setdefault(e.seq, e.at)
        elif e.kind == REJECTED and e.seq is not None:
            accepted.discard(e.seq)
            if current is not None and current.number == e.attempt \
                    and current.resumed_from == e.seq:
                current.resumed_from = max((s for s in accepted if s < e.seq), default=None)
        if e.kind in ENDS_ATTEMPT and current is not None and current.end is None \
                and e.attempt == current.number:
            current.end = e.at
    return out


@dataclass(frozen=True)
class AttemptUsage:
    number: int
    worker_id: str | None
    gpus: int
    seconds: float  # wall time holding the job
    redone_seconds: float  # of which the next attempt computed again

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.seconds / HOUR

    @property
    def gpu_hours_redone(self) -> float:
        return self.gpus * self.redone_seconds / HOUR


def attempt_usage(h: History, gpus_of: Callable[[str | None], int], now: float
                  ) -> list[AttemptUsage]:
    """Each attempt's wall time and the part of it redone by the next (module docstring)."""
    out = []
    for i, a in enumerate(h.attempts):
        nxt = h.attempts[i + 1] if i + 1 < len(h.attempts) else None
        end = a.end if a.end is not None else (nxt.start if nxt is not None else now)
        end = max(end, a.start)
        redone = 0.0
        if nxt is not None:
            made = None if nxt.resumed_from is None else h.accepted_at.get(nxt.resumed_from)
            cut = a.start if made is None else min(max(a.start, made), end)
            redone = end - cut
        out.append(AttemptUsage(a.number, a.worker_id, gpus_of(a.worker_id), end - a.start,
                                redone))
    return out


@dataclass
class Totals:
    attempts: int = 0
    gpu_hours: float = 0.0
    gpu_hours_redone: float = 0.0

    @property
    def gpu_hours_useful(self) -> float:
        return max(0.0, self.gpu_hours - self.gpu_hours_redone)

    def add(self, a: AttemptUsage) -> None:
        self.attempts += 1
        self.gpu_hours += a.gpu_hours
        self.gpu_hours_redone += a.gpu_hours_redone

    def merge(self, other: Totals) -> None:
        self.attempts += other.attempts
        self.gpu_hours += other.gpu_hours
        self.gpu_hours_redone += other.gpu_hours_redone


def totals(attempts: Iterable[AttemptUsage]) -> Totals:
    out = Totals()
    for a in attempts:
        out.add(a)
    return out


def by_cluster(attempts: Iterable[AttemptUsage], cluster_of: Callable[[str | None], str],
               into: dict[str, Totals] | None = None) -> dict[str, Totals]:
    """Attempts summed by the cluster of the worker that ran each."""
    out = {} if into is None else into
    for a in attempts:
        out.setdefault(cluster_of(a.worker_id), Totals()).add(a)
    return out


def rate(points: Sequence[tuple[float, float]]) -> float | None:
    """Progress per wall-clock second from (time, done) points: first to last, None unless
    both time and done grew."""
    if len(points) < 2:
        return None
    (t0, d0), (t1, d1) = min(points), max(points)
    if t1 <= t0 or d1 <= d0:
        return None
    return (d1 - d0) / (t1 - t0)


def ns_per_day(progress: dict[str, Any] | None) -> float | None:
    value = (progress or {}).get("ns_per_day")
    return float(value) if value is not None and math.isfinite(value) else None


def eta_seconds(progress: dict[str, Any] | None, points: Sequence[tuple[float, float]]
                ) -> float | None:
    """Seconds left for a running job (module docstring): `progress` its latest, `points` the
    (accepted at, done) of its current attempt's checkpoints."""
    if not progress or progress.get("total") is None:
        return None
    left = max(0.0, float(progress["total"]) - float(progress.get("done") or 0.0))
    if left == 0:
        return 0.0
    speed = rate(points)
    engine = ns_per_day(progress)
    if speed is None and engine and str(progress.get("unit", "")).lower() == "ns":
        speed = engine / DAY
    if not speed or speed <= 0:
        return None
    eta = left / speed
    return eta if math.isfinite(eta) else None

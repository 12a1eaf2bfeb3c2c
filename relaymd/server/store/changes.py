"""What a state change writes, as typed values: the state machine builds them from its tables,
the store renders them into one conditional UPDATE. No SQL crosses this boundary: a value is
either a plain parameter or one of the operations below, each rendered by `set_clause`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Increment:
    """The column's value plus one (an attempt, a failure count, the checkpoint count)."""


@dataclass(frozen=True)
class IfNull:
    """`value`, unless the column already holds one (a job's first start time)."""

    value: Any


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()  # in an OnLimit branch: the column keeps its current value


@dataclass(frozen=True)
class OnLimit:
    """`then` when `counter` + 1 reaches `limit` (a column of the same row, or a number),
    else `otherwise`: a failure that exhausts the budget, a worker failing once too often.
    Evaluated against the row as it was before this write, like every SET of one UPDATE."""

    counter: str
    limit: str | int
    then: Any
    otherwise: Any


@dataclass(frozen=True)
class Swap:
    """`new` where the column holds `old`; any other value is kept."""

    old: Any
    new: Any


COUNTERS = frozenset({"failures", "consecutive_failures", "max_attempts"})


def _operand(column: str, value: Any, params: list[Any]) -> str:
    if value is KEEP:
        return column
    params.append(value)
    return "?"


def set_clause(fields: dict[str, Any]) -> tuple[str, list[Any]]:
    """`col = ?, ...` and its parameters, typed values rendered."""
    parts: list[str] = []
    params: list[Any] = []
    for name, value in fields.items():
        if isinstance(value, Increment):
            parts.append(f"{name} = {name} + 1")
        elif isinstance(value, IfNull):
            parts.append(f"{name} = COALESCE({name}, ?)")
            params.append(value.value)
        elif isinstance(value, OnLimit):
            if value.counter not in COUNTERS or (
                    isinstance(value.limit, str) and value.limit not in COUNTERS):
                raise ValueError(f"not a counter column: {value}")
            if isinstance(value.limit, str):
                limit = value.limit
            else:
                limit = "?"
            sql = f"CASE WHEN {value.counter} + 1 >= {limit}"
            if limit == "?":
                params.append(int(value.limit))
            sql += f" THEN {_operand(name, value.then, params)}"
            sql += f" ELSE {_operand(name, value.otherwise, params)} END"
            parts.append(f"{name} = {sql}")
        elif isinstance(value, Swap):
            parts.append(f"{name} = CASE WHEN {name} = ? THEN ? ELSE {name} END")
            params.extend([value.old, value.new])
        else:
            parts.append(f"{name} = ?")
            params.append(value)
    return ", ".join(parts), params


@dataclass(frozen=True)
class ClaimMove:
    """The claim's transition, as the state machine's tables say it: the job from `job_from`
    to `job_to`, its worker from one of `worker_from` to `worker_to`."""

    job_from: str
    job_to: str
    worker_from: tuple[str, ...]
    worker_to: str


@dataclass(frozen=True)
class WorkerUpdate:
    """The worker row a job change also writes: `fields` of `worker_id`, and when `holding` is
    set, only while that worker still holds that job."""

    worker_id: str
    fields: dict[str, Any]
    holding: str | None = None


@dataclass
class JobChange:
    """One conditional UPDATE of a job row plus what goes with it in the same transaction."""

    job_id: str
    from_states: Iterable[str]
    to_status: str | OnLimit
    set_fields: dict[str, Any] = field(default_factory=dict)
    attempt: int | None = None  # fence: only if the job's attempt is exactly this
    worker_id: str | None = None  # fence: only if the job is held by this worker
    # fence: only if this checkpoint seq was reserved (below next_seq) and is newer than the
    # latest accepted one
    checkpoint_seq: int | None = None
    worker_update: WorkerUpdate | None = None  # its worker's row, in the same transaction
    inserts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    event: dict[str, Any] = field(default_factory=dict)

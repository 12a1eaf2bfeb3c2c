"""Turn store rows (plain dicts of SQLite values) into the wire models of `relaymd.models`."""

from __future__ import annotations

import sqlite3
from typing import Any

from relaymd.models import (
    CheckpointInfo,
    Event,
    Failure,
    Job,
    JobDetail,
    JobStatus,
    Progress,
    Worker,
    to_datetime,
)
from relaymd.server.store import load_json


def job_from_row(row: dict[str, Any], progress: dict[str, Any] | None = None) -> Job:
    failure = load_json(row["last_failure"])
    live = progress if progress is not None else load_json(row["progress"])
    return Job(
        id=row["id"], title=row["title"] or "", status=row["status"], command=row["command"],
        spec=load_json(row["spec"]), gpus=row["gpus"], priority=row["priority"],
        max_attempts=row["max_attempts"], attempt=row["attempt"], failures=row["failures"],
        worker_id=row["worker_id"], bundle_sha256=row["bundle_sha256"],
        bundle_size=row["bundle_size"], latest_checkpoint=row["latest_checkpoint"],
        checkpoints=row["checkpoints"],
        progress=Progress.model_validate(live) if live else None,
        last_failure=Failure.model_validate({**failure, "at": to_datetime(failure["at"])})
        if failure else None,
        created_at=to_datetime(row["created_at"]), updated_at=to_datetime(row["updated_at"]),
        started_at=to_datetime(row["started_at"]), finished_at=to_datetime(row["finished_at"]),
        last_checkpoint_at=to_datetime(row["last_checkpoint_at"]),
        preferred_clusters=load_json(row["preferred_clusters"]),
        queue_blocked_reason=row["blocked_reason"] if row["status"] == JobStatus.queued else None,
        trusted_only=bool(row["trusted_only"]),
    )


class JobJsonCache:
    """Each job's wire JSON, kept while its row is unchanged; progress is spliced in per call.

    A monitoring client lists every job every second; building and serializing a `Job` costs
    ~60 us, which for 10,000 jobs would stall the event loop for half a second. Progress changes
    with every heartbeat, so the cached part leaves it out and each call appends it as the last
    member. The rest of the row is compared whole, so no other column can change without the
    JSON being rebuilt."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[Any, ...], bytes]] = {}
        self._at = -1  # where the progress column sits in a listing row (fixed by the schema)

    def forget(self, job_id: str) -> None:
        self._cache.pop(job_id, None)

    def render(self, row: sqlite3.Row, progress: dict[str, Any] | None) -> bytes:
        values = tuple(row)
        if self._at < 0:
            self._at = row.keys().index("progress")
        at = self._at
        key = values[:at] + values[at + 1:]
        hit = self._cache.get(row["id"])
        if hit is not None and hit[0] == key:
            body = hit[1]
        else:
            job = job_from_row({**dict(row), "progress": None})
            body = job.__pydantic_serializer__.to_json(job, exclude={"progress"})[:-1]  # open
            self._cache[row["id"]] = (key, body)
        live = progress if progress is not None else load_json(row["progress"])
        if not live:
            return body + b',"progress":null}'
        p = Progress.model_validate(live)
        return body + b',"progress":' + p.__pydantic_serializer__.to_json(p) + b"}"


def checkpoint_from_row(row: dict[str, Any]) -> CheckpointInfo:
    progress = load_json(row["progress"])
    return CheckpointInfo(
        seq=row["seq"], key=row["key"], sha256=row["sha256"], size=row["size"],
        attempt=row["attempt"], worker_id=row["worker_id"],
        created_at=to_datetime(row["created_at"]),
        progress=Progress.model_validate(progress) if progress else None,
        trusted=not row["untrusted"],
    )


def event_from_row(row: dict[str, Any]) -> Event:
    return Event(
        id=row["id"], job_id=row["job_id"], worker_id=row["worker_id"], kind=row["kind"],
        from_status=row["from_status"], to_status=row["to_status"], attempt=row["attempt"], seq=row["seq"],
        reason=row["reason"] or "", at=to_datetime(row["at"]),
    )


def job_detail(job: Job, checkpoints: list[dict[str, Any]],
               events: list[dict[str, Any]], figures: dict[str, Any] | None = None) -> JobDetail:
    """`figures`: the rate and compute fields (`AccountingOps.job_figures`)."""
    return JobDetail(
        **job.model_dump(),
        checkpoint_list=[checkpoint_from_row(c) for c in checkpoints],
        events=[event_from_row(e) for e in events],
        **(figures or {}),
    )


def worker_from_row(row: dict[str, Any], last_seen: float | None = None) -> Worker:
    return Worker(
        id=row["id"], name=row["name"] or "", hostname=row["hostname"] or "",
        cluster=row["cluster"] or "", provider=row["provider"] or "",
        provider_id=row["provider_id"], compute_platform=row["compute_platform"] or "", gpus=row["gpus"] or 0,
        gpu_model=row["gpu_model"] or "", vram_gb=row["vram_gb"] or 0.0, status=row["status"],
        job_id=row["job_id"], consecutive_failures=row["consecutive_failures"] or 0,
        note=row.get("note"),
        registered_at=to_datetime(row["registered_at"]),
        last_heartbeat_at=to_datetime(max(filter(None, [last_seen, row["last_heartbeat_at"]]),
                                          default=None)),
        wall_time_end=to_datetime(row["wall_time_end"]),
    )

"""Fixed data for the console's snapshot tests and benchmark: a `Source` that serves rows built
from a seed and a fixed clock (clusters and usage included), so every screenshot is the same on
every machine."""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relaymd.models import ClusterInfo, JobDetail, Usage
from relaymd.tui.source import JobRow, WorkerRow, rate_of

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC: the fixed clock of every snapshot


def clock() -> float:
    return NOW


def busy_rows() -> tuple[list[JobRow], list[WorkerRow]]:
    """Jobs in every state, workers in every live state, on two clusters."""
    w = [
        WorkerRow("a1" * 16, "delta", "slurm", "4x NVIDIA A100", "busy", "1f" * 16, NOW - 3,
                  NOW + 3 * 3600 + 600),
        WorkerRow("b2" * 16, "delta", "slurm", "1x NVIDIA A40", "busy", "2e" * 16, NOW - 9,
                  NOW + 1500),
        WorkerRow("c3" * 16, "salad", "salad", "1x RTX 4090", "idle", "", NOW - 1, None),
        WorkerRow("d4" * 16, "delta", "slurm", "1x NVIDIA A40", "stale", "", NOW - 95,
                  NOW + 200),
        WorkerRow("e5" * 16, "delta", "slurm", "cpu", "provisioning", "", None, None,
                  provider_id="4242001", note="PENDING (Priority)", registered_at=NOW - 1260),
    ]
    rate, eta = rate_of({"done": 31, "total": 50, "unit": "ns", "ns_per_day": 142.0})
    j = [
        JobRow("1f" * 16, "abl1-complex-fep", "running", 0.62, "31/50 ns", 14, "a1" * 16,
               NOW - 2 * 86400, NOW - 240, ns_per_day=rate, eta=eta),
        JobRow("2e" * 16, "villin-nvt", "assigned", None, "", 0, "b2" * 16, NOW - 7200, None),
        JobRow("3d" * 16, "brd4-ligand-12", "queued", 0.2, "2/10 ns", 3, "", NOW - 5400,
               NOW - 3000),
        JobRow("4c" * 16, "t4-lysozyme-l99a", "completed", 1.0, "20/20 ns", 40, "",
               NOW - 5 * 86400, NOW - 86400),
        JobRow("5b" * 16, "hsp90-series-b", "failed", 0.05, "0.5/10 ns", 1, "", NOW - 3 * 3600,
               NOW - 3000),
        JobRow("6a" * 16, "scratch-test", "cancelled", None, "", 0, "", NOW - 600, None),
    ]
    return j, w


def detail_of(row: JobRow) -> JobDetail:
    at = datetime.fromtimestamp(NOW - 3600, UTC)
    events: list[dict[str, Any]] = [
        {"id": 1, "job_id": row.id, "worker_id": None, "kind": "submit", "from_status": None,
         "to_status": "queued", "attempt": 0, "seq": None, "reason": "submitted", "at": at},
        {"id": 2, "job_id": row.id, "worker_id": "a1" * 16, "kind": "claim",
         "from_status": "queued", "to_status": "assigned", "attempt": 1, "seq": None,
         "reason": "delta/slurm gpu-node-17", "at": at},
        {"id": 3, "job_id": row.id, "worker_id": "a1" * 16, "kind": "start",
         "from_status": "assigned", "to_status": "running", "attempt": 1, "seq": None,
         "reason": "first heartbeat", "at": at},
        {"id": 4, "job_id": row.id, "worker_id": "a1" * 16, "kind": "fail",
         "from_status": "running", "to_status": "queued", "attempt": 1, "seq": None,
         "reason": "engine exited with status 1", "at": at},
    ]
    checkpoints = [
        {"seq": seq, "key": f"jobs/{row.id}/checkpoints/{seq:06d}.tar.gz", "sha256": "0" * 64,
         "size": 48_000_000 + seq * 1000, "attempt": 1, "worker_id": "a1" * 16,
         "created_at": datetime.fromtimestamp(NOW - 600 * (4 - seq), UTC), "progress": None}
        for seq in (1, 2, 3)
    ]
    figures: dict[str, Any] = {}
    if row.ns_per_day is not None:
        figures = {"ns_per_day": row.ns_per_day, "eta_seconds": row.eta, "gpu_hours": 12.5,
                   "gpu_hours_useful": 11.25, "gpu_hours_redone": 1.25}
    return JobDetail.model_validate({
        "id": row.id, "title": row.title, "status": row.status, "command": "python run.py",
        "spec": {"command": "python run.py"}, "gpus": 1, "priority": 0, "max_attempts": 3,
        "attempt": 2, "failures": 1, "worker_id": row.worker or None, "bundle_sha256": "0" * 64,
        "bundle_size": 1000, "latest_checkpoint": 3, "checkpoints": 3, "progress": None,
        "last_failure": {"attempt": 1, "exit_code": 1, "reason": "engine exited with status 1",
                         "log_tail": "Traceback (most recent call last):\n  File \"run.py\"\n"
                                     "openmm.OpenMMException: Particle coordinate is NaN",
                         "at": at},
        "created_at": datetime.fromtimestamp(row.created_at, UTC), "updated_at": at,
        "started_at": at, "finished_at": None, "last_checkpoint_at": at,
        "checkpoint_list": checkpoints, "events": events, **figures,
    })


def busy_clusters() -> list[ClusterInfo]:
    """A SLURM cluster with an allocation pending, a cloud one whose last request failed, and
    one switched off."""
    at = datetime.fromtimestamp(NOW - 30, UTC)
    common: dict[str, Any] = {"priority": 0, "max_pending": 2, "max_workers": 8, "details": {}}
    return [ClusterInfo.model_validate(c) for c in (
        {**common, "name": "delta", "provider": "slurm", "strategy": "reactive", "enabled": True,
         "gpus": 4, "pending": 1, "idle": 0, "busy": 2, "waiting": 1,
         "last_decision": "1 job waiting, 1 allocation pending: none requested",
         "last_submitted": 0, "last_decision_at": at, "last_error": None,
         "note": "1 pending in SLURM: Priority"},
        {**common, "name": "salad", "provider": "salad", "strategy": "continuous",
         "enabled": True, "priority": 1, "gpus": 1, "pending": 0, "idle": 1, "busy": 0,
         "waiting": 0, "last_decision": "keep 1 replica running", "last_submitted": 1,
         "last_decision_at": at, "last_error": "salad: start failed: 402 Payment Required",
         "note": "1 replica starting"},
        {**common, "name": "campus", "provider": "slurm", "strategy": "jit_threshold",
         "enabled": False, "gpus": 1, "pending": 0, "idle": 0, "busy": 0, "waiting": 0,
         "last_decision": "disabled", "last_submitted": 0, "last_decision_at": None,
         "last_error": None, "note": ""},
    )]


def busy_usage() -> Usage:
    """GPU-hours of the busy jobs: the running one redid part of its first attempt."""
    def job(row: str, title: str, status: str, attempts: int, used: float, redone: float,
            **more: Any) -> dict[str, Any]:
        return {"id": row * 16, "title": title, "status": status, "gpus": 1,
                "attempts": attempts, "gpu_hours": used, "gpu_hours_useful": used - redone,
                "gpu_hours_redone": redone, **more}
    rate, eta = rate_of({"done": 31, "total": 50, "unit": "ns", "ns_per_day": 142.0})
    jobs = [job("1f", "abl1-complex-fep", "running", 2, 12.5, 1.25, ns_per_day=rate,
                eta_seconds=eta),
            job("4c", "t4-lysozyme-l99a", "completed", 1, 30.0, 0.0),
            job("3d", "brd4-ligand-12", "queued", 1, 2.0, 0.5),
            job("5b", "hsp90-series-b", "failed", 3, 1.5, 1.0)]
    return Usage.model_validate({
        "at": datetime.fromtimestamp(NOW, UTC), "gpu_hours": 46.0, "gpu_hours_useful": 43.25,
        "gpu_hours_redone": 2.75, "jobs": jobs,
        "clusters": [
            {"cluster": "delta", "attempts": 5, "gpu_hours": 44.5, "gpu_hours_useful": 42.75,
             "gpu_hours_redone": 1.75},
            {"cluster": "salad", "attempts": 2, "gpu_hours": 1.5, "gpu_hours_useful": 0.5,
             "gpu_hours_redone": 1.0}]})


class FixedSource:
    """Serves fixed rows; `change()` plays the orchestrator's change events."""

    address = "http://127.0.0.1:8765"

    def __init__(self, jobs: list[JobRow] | None = None,
                 workers: list[WorkerRow] | None = None,
                 clusters: list[ClusterInfo] | None = None, usage: Usage | None = None) -> None:
        self.rows = {r.id: r for r in jobs or []}
        self.worker_rows = list(workers or [])
        self.cluster_infos = list(clusters or [])
        self.usage_report = usage or Usage(at=datetime.fromtimestamp(NOW, UTC), gpu_hours=0,
                                           gpu_hours_useful=0, gpu_hours_redone=0, clusters=[],
                                           jobs=[])
        self.switched: list[tuple[str, bool]] = []  # set_cluster_enabled calls
        self.listeners: list[Callable[[str, str | None], None]] = []
        self.reads = 0  # rows handed out, to see that patches read only what changed

    async def jobs(self, ids: Collection[str] | None = None) -> list[JobRow]:
        out = list(self.rows.values()) if ids is None else [
            self.rows[i] for i in ids if i in self.rows]
        self.reads += len(out)
        return out

    def live_progress(self) -> dict[str, dict[str, Any]] | None:
        return {}

    async def workers(self) -> list[WorkerRow]:
        return list(self.worker_rows)

    async def job(self, job_id: str) -> JobDetail:
        return detail_of(self.rows[job_id])

    async def cancel(self, job_id: str) -> Any:
        raise NotImplementedError("FixedSource is read-only")

    requeue = cancel

    async def submit(self, directory: Path, title: str, command: str, checkpoint: list[str],
                     gpus: int | None) -> Any:
        raise NotImplementedError("FixedSource is read-only")

    async def clusters(self) -> list[ClusterInfo]:
        return list(self.cluster_infos)

    async def set_cluster_enabled(self, name: str, enabled: bool) -> ClusterInfo:
        self.switched.append((name, enabled))
        i = next(i for i, c in enumerate(self.cluster_infos) if c.name == name)
        self.cluster_infos[i] = self.cluster_infos[i].model_copy(update={"enabled": enabled})
        return self.cluster_infos[i]

    async def usage(self) -> Usage:
        return self.usage_report

    def subscribe(self, callback: Callable[[str, str | None], None]) -> None:
        self.listeners.append(callback)

    def change(self, row: JobRow) -> None:
        self.rows[row.id] = row
        for listener in self.listeners:
            listener("jobs", row.id)

    def local_workers_alive(self) -> int:
        return 0

"""How the scripting commands print for people: status colours, ages, progress and the rich
tables (the `--json` output is the models themselves, see common.emit_json)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.markup import escape
from rich.table import Table

from relaymd.models import CheckpointInfo, ClusterInfo, ClusterUsage, Event, Job, JobUsage, Worker
from relaymd.models import JobStatus as J
from relaymd.models import WorkerStatus as W

STATUS_STYLE: dict[str, str] = {
    J.queued: "yellow", J.assigned: "cyan", J.running: "green", J.completed: "bold green",
    J.failed: "bold red", J.cancelled: "dim", W.idle: "cyan", W.busy: "green", W.stale: "red",
    W.provisioning: "yellow", W.quarantined: "bold red", W.gone: "dim",
}


def age(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "-"
    seconds = max(0, int(((now or datetime.now(UTC)) - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def progress_text(job: Job) -> str:
    p = job.progress
    if p is None:
        return "-"
    if p.total and p.unit == "%":  # a bare fraction (AToM-OpenMM's progress file)
        return f"{100 * p.done / p.total:5.1f}%"
    if p.total:
        return f"{100 * p.done / p.total:5.1f}% {p.done:g}/{p.total:g} {p.unit}"
    return f"{p.done:g} {p.unit}"


def duration(seconds: float | None) -> str:
    """An ETA: "-" when unknown, else days/hours/minutes (seconds under a minute)."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d{hours:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def rate_text(ns_per_day: float | None) -> str:
    return "-" if ns_per_day is None else f"{ns_per_day:g} ns/day"


def gpu_hours_text(total: float, redone: float) -> str:
    """GPU-hours with the share computed again after a resume."""
    share = f" = {100 * redone / total:.0f}%" if total > 0 else ""
    return f"{total:.2f} GPU-h (useful {total - redone:.2f}, redone {redone:.2f}{share})"


def trust_text(trusted: bool) -> str:
    """Who wrote a checkpoint: a trusted cluster, or a stranger's machine (Salad)."""
    return "trusted" if trusted else "[yellow]untrusted worker[/]"


def styled(status: str) -> str:
    style = STATUS_STYLE.get(status, "")
    return f"[{style}]{status}[/]" if style else status


JOB_COLUMN_MIN = {"ID": 8, "STATUS": 9, "PROGRESS": 10, "TITLE": 8}  # what 80 columns can keep


def jobs_table(jobs: list[Job]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "TITLE", "STATUS", "PROGRESS", "NS/DAY", "ATT", "CKPT", "WORKER", "AGE",
                "LAST CKPT"):
        table.add_column(col, no_wrap=True, overflow="ellipsis", min_width=JOB_COLUMN_MIN.get(col),
                         max_width=28 if col == "TITLE" else None,
                         justify="right" if col == "NS/DAY" else "left")
    for j in jobs:
        rate = j.progress.ns_per_day if j.progress and j.status == J.running else None
        table.add_row(j.id[:8], escape(j.title), styled(j.status), progress_text(j),
                      "-" if rate is None else f"{rate:g}",
                      f"{j.attempt}", f"{j.checkpoints}", (j.worker_id or "-")[:8],
                      age(j.created_at), age(j.last_checkpoint_at))
    return table


def job_checkpoints_table(checkpoints: list[CheckpointInfo]) -> Table:
    """The checkpoints section of `relaymd job`."""
    table = Table("SEQ", "SIZE", "ATTEMPT", "WORKER", "AGE", "WRITTEN BY", box=None,
                  header_style="bold")
    for c in checkpoints:
        table.add_row(str(c.seq), f"{c.size / 1e6:.2f} MB", str(c.attempt), c.worker_id[:8],
                      age(c.created_at), trust_text(c.trusted))
    return table


def events_table(events: list[Event]) -> Table:
    """The events section of `relaymd job`."""
    table = Table("TIME", "EVENT", "FROM", "TO", "ATT", "WORKER", "REASON", box=None,
                  header_style="bold")
    for e in events:
        table.add_row(f"{e.at:%m-%d %H:%M:%S}", e.kind, e.from_status or "-", e.to_status or "-",
                      str(e.attempt or "-"), (e.worker_id or "-")[:8], escape(e.reason))
    return table


def checkpoints_table(checkpoints: list[CheckpointInfo]) -> Table:
    """`relaymd checkpoints JOB`: every stored checkpoint with its progress and digest."""
    table = Table("SEQ", "SIZE", "ATTEMPT", "WORKER", "CREATED", "PROGRESS", "SHA256",
                  "WRITTEN BY", box=None, header_style="bold")
    for c in checkpoints:
        done = f"{c.progress.done:g}/{c.progress.total:g} {c.progress.unit}" \
            if c.progress else "-"
        table.add_row(str(c.seq), f"{c.size / 1e6:.2f} MB", str(c.attempt), c.worker_id[:8],
                      f"{c.created_at:%Y-%m-%d %H:%M:%S}", done, c.sha256[:12],
                      trust_text(c.trusted))
    return table


def workers_table(workers: list[Worker]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "CLUSTER", "PROVIDER", "HOST", "COMPUTE", "GPUS", "STATUS", "JOB",
                "HEARTBEAT", "ALLOC LEFT"):
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    now = datetime.now(UTC)
    for w in workers:
        left = "-"
        if w.wall_time_end is not None:
            left = age(now, w.wall_time_end) if w.wall_time_end > now else "ended"
        table.add_row(w.id[:8], escape(w.cluster), w.provider, escape(w.hostname),
                      escape(w.compute_platform or "-"),
                      escape(f"{w.gpus} {w.gpu_model}".strip()), styled(w.status), (w.job_id or "-")[:8],
                      age(w.last_heartbeat_at, now), left)
    return table


def clusters_table(clusters: list[ClusterInfo]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("CLUSTER", "PROVIDER", "STRATEGY", "ON", "GPUS", "PENDING", "IDLE", "BUSY",
                "WAITING", "LAST DECISION"):
        table.add_column(col, no_wrap=col != "LAST DECISION")
    for c in clusters:
        decision = c.last_decision
        if c.last_submitted:
            decision = f"requested {c.last_submitted}: {decision}"
        if c.last_error:
            decision += f" [red]({escape(c.last_error)})[/]"
        if c.note:
            decision += f" [dim]{escape(c.note)}[/]"
        table.add_row(escape(c.name), c.provider, c.strategy,
                      "yes" if c.enabled else "[yellow]no[/]", str(c.gpus),
                      f"{c.pending}/{c.max_pending}", str(c.idle),
                      f"{c.busy}", str(c.waiting), decision)
    return table


def tokens_table(tokens: list[dict[str, Any]]) -> Table:
    """`relaymd tokens`: each cluster's bootstrap token, masked by the orchestrator."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("CLUSTER", "PROVIDER", "TRUSTED", "TOKEN"):
        table.add_column(col, no_wrap=True)
    for t in tokens:
        table.add_row(escape(t["cluster"]), escape(t["provider"]),
                      "yes" if t["trusted"] else "[yellow]no[/]", escape(t["token"] or "-"))
    return table


def clusters_usage_table(clusters: list[ClusterUsage]) -> Table:
    """`relaymd usage`: GPU-hours by the cluster whose workers ran the attempts."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("CLUSTER", "ATTEMPTS", "GPU-H", "USEFUL", "REDONE"):
        table.add_column(col, no_wrap=True, justify="left" if col == "CLUSTER" else "right")
    for c in clusters:
        table.add_row(escape(c.cluster), str(c.attempts), f"{c.gpu_hours:.2f}",
                      f"{c.gpu_hours_useful:.2f}", f"{c.gpu_hours_redone:.2f}")
    return table


def jobs_usage_table(jobs: list[JobUsage]) -> Table:
    """`relaymd usage`: each job ever claimed, its GPU-hours, rate and time left."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "TITLE", "STATUS", "ATT", "GPU-H", "USEFUL", "REDONE", "NS/DAY", "ETA"):
        table.add_column(col, no_wrap=True, overflow="ellipsis",
                         max_width=28 if col == "TITLE" else None,
                         justify="left" if col in ("ID", "TITLE", "STATUS") else "right")
    for j in jobs:
        table.add_row(j.id[:8], escape(j.title), styled(j.status), str(j.attempts),
                      f"{j.gpu_hours:.2f}", f"{j.gpu_hours_useful:.2f}",
                      f"{j.gpu_hours_redone:.2f}",
                      "-" if j.ns_per_day is None else f"{j.ns_per_day:g}",
                      duration(j.eta_seconds))
    return table

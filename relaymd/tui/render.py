"""What the console's text looks like: status colours, ages, times with their zone, rates,
progress bars, the header, the job detail pane and a cluster's details. Plain functions from data
to rich Text (no widgets, no app state)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, tzinfo

from rich.text import Text

from relaymd.models import ClusterInfo, JobDetail
from relaymd.models import JobStatus as J
from relaymd.models import WorkerStatus as W

STATUS_STYLE: dict[str, str] = {
    J.queued: "yellow", J.assigned: "cyan", J.running: "bold green", J.completed: "blue",
    J.failed: "bold red", J.cancelled: "dim", W.idle: "green", W.busy: "bold green",
    W.stale: "yellow", W.quarantined: "red", W.provisioning: "cyan", W.gone: "dim"}
# The header's counts, in this order.
JOB_ORDER = (J.running, J.assigned, J.queued, J.completed, J.failed, J.cancelled)
WORKER_ORDER = (W.busy, W.idle, W.provisioning, W.stale, W.quarantined)


# The views and the keys that show them, in the header's order.
VIEWS = (("1", "jobs"), ("2", "clusters"), ("3", "usage"))


def ago(then: float | None, now: float) -> str:
    return "-" if then is None else span(now - then)


def span(seconds: float | None) -> str:
    """A duration in at most 5 characters: 42s, 17m, 3h05, 2d04h ("-" when unknown)."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ns_day(ns_per_day: float | None) -> str:
    """ns/day in at most 5 characters, or "-"."""
    if ns_per_day is None:
        return "-"
    return f"{ns_per_day:.0f}" if ns_per_day >= 100 else f"{ns_per_day:.3g}"


def zone(when: datetime) -> str:
    """`when`'s zone: "UTC" for UTC itself, else its offset, e.g. "+01:00"."""
    if when.tzinfo is UTC:
        return "UTC"
    offset = int((when.utcoffset() or datetime.min - datetime.min).total_seconds()) // 60
    sign = "-" if offset < 0 else "+"
    return f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"


def stamp(when: datetime, tz: tzinfo | None) -> str:
    """A time in `tz` (None: this machine's local time) that says its zone:
    "2027-01-15 09:00:00 +01:00", or "2027-01-15 08:00:00 UTC"."""
    t = when.astimezone(tz)
    return f"{t:%Y-%m-%d %H:%M:%S} {zone(t)}"


def gpu_hours(total: float, useful: float, redone: float) -> str:
    share = f" ({100 * redone / total:.0f}%)" if total > 0 and redone > 0 else ""
    return f"{total:.2f} GPU-h: useful {useful:.2f}, redone {redone:.2f}{share}"


def bar(done: float | None, text: str, width: int = 8) -> Text:
    if done is None:
        return Text(text or "-", style="dim")
    filled = round(done * width)
    out = Text("█" * filled, style="green")
    out.append("░" * (width - filled), style="dim")
    out.append(f" {done * 100:3.0f}%")
    return out


def styled(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def counts(c: Counter[str], order: tuple[str, ...]) -> Text:
    """`2 running  1 queued`: the states of `order` that `c` counts, coloured."""
    out = Text()
    for s in order:
        if c[s]:
            out.append(f"  {c[s]} ")
            out.append(s, STATUS_STYLE.get(s, ""))
    return out if out else Text(" none", "dim")


def header_text(address: str, jobs: Counter[str], workers: Counter[str], rate: float,
                view: str = "jobs") -> Text:
    """The two header lines: the views (the shown one marked), where the API is, the
    checkpoint rate, jobs and workers by state."""
    views = Text(" ").join(Text(f" {key} {name} ", "reverse bold") if name == view
                           else Text(f"{key} {name}") for key, name in VIEWS)
    text = Text.assemble(
        ("RelayMD ", "bold"), views, "  ", address,
        ("  checkpoints/h ", "dim"), f"{rate:.0f}", "\n",
        ("jobs", "bold"), counts(jobs, JOB_ORDER),
        ("   workers", "bold"), counts(workers, WORKER_ORDER))
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


def detail_text(d: JobDetail, now: float, tz: tzinfo | None = None) -> Text:
    """The detail pane of one job: state, rate, GPU-hours, where it may run, checkpoints,
    events, last failure. Times are in `tz` (None: local time) and say their zone."""
    text = Text()
    text.append(f"{d.id[:12]}  ", style="bold")
    text.append(d.title + "\n")
    text.append("state ")
    text.append_text(styled(str(d.status)))
    text.append(f"  attempt {d.attempt}  failures {d.failures}/{d.max_attempts}\n")
    text.append(f"{d.command}\n", style="dim")
    if d.ns_per_day is not None or d.eta_seconds is not None:
        text.append(f"rate {ns_day(d.ns_per_day)} ns/day  ETA {span(d.eta_seconds)}\n")
    if d.gpu_hours > 0:
        text.append(gpu_hours(d.gpu_hours, d.gpu_hours_useful, d.gpu_hours_redone) + "\n")
    text.append(f"submitted {stamp(d.created_at, tz)}\n", style="dim")
    if d.finished_at is not None:
        text.append(f"finished  {stamp(d.finished_at, tz)}\n", style="dim")
    if d.preferred_clusters:
        text.append(f"runs only on {', '.join(d.preferred_clusters)}\n")
    if d.trusted_only:
        text.append("runs only on trusted clusters\n")
    if d.queue_blocked_reason:
        text.append(f"waiting: {d.queue_blocked_reason}\n", style="bold yellow")
    if d.checkpoint_list:
        text.append("\ncheckpoints\n", style="bold")
        for c in d.checkpoint_list[-8:]:
            text.append(f"  {c.seq:>4}  {c.size / 1e6:8.2f} MB  "
                        f"{ago(c.created_at.timestamp(), now):>6} ago  {c.worker_id[:8]}")
            if not c.trusted:  # a stranger's machine (Salad) held the job when it wrote it
                text.append("  untrusted worker", style="yellow")
            text.append("\n")
    events = [(e, e.at.astimezone(tz)) for e in d.events[-12:]]
    shown = zone(events[-1][1]) if events else ""  # said once; a line in another says its own
    text.append("\nevents", style="bold")
    text.append(f"  (times {shown})\n" if shown else "\n", style="dim")
    for e, at in events:
        other = "" if zone(at) == shown else f" {zone(at)}"
        text.append(f"  {at:%m-%d %H:%M:%S}{other} ", style="dim")
        text.append(f"{e.kind:<10} {e.reason[:27]}\n")
    if d.last_failure:
        f = d.last_failure
        text.append(f"\nlast failure (attempt {f.attempt}, exit {f.exit_code})\n",
                    style="bold red")
        text.append(f"  at {stamp(f.at, tz)}\n", style="dim")
        text.append(f"  {f.reason}\n")
        for line in f.log_tail.splitlines()[-10:]:
            text.append(f"  | {line}\n", style="dim")
    return text


def cluster_text(c: ClusterInfo, workers: Iterable[tuple[str, str, str, float | None]],
                 now: float, tz: tzinfo | None = None) -> Text:
    """One cluster's details: provider, strategy, switch, its workers by state, its pending
    allocations with the provider's word on each (SLURM's reason, e.g. "PENDING (Priority)"),
    the provisioning loop's last decision and last error. `workers`: (status, allocation id,
    note, registered at) of each of its workers that is not gone."""
    text = Text()
    text.append(c.name, style="bold")
    text.append(f"  {c.provider}  {c.strategy}  ")
    text.append("enabled" if c.enabled else "disabled", style="green" if c.enabled
                else "bold yellow")
    text.append(f"  priority {c.priority}, {c.gpus} GPU/worker, max {c.max_workers} workers\n",
                style="dim")
    mine = list(workers)
    text.append("workers", style="bold")
    text.append_text(counts(Counter(status for status, _, _, _ in mine), WORKER_ORDER))
    text.append(f"   jobs waiting {c.waiting}\n")
    text.append("pending allocations ", style="bold")
    text.append(f"{c.pending} of at most {c.max_pending}\n")
    for status, alloc, note, at in mine:
        if status == W.provisioning:
            text.append(f"  {alloc or '-':<10} ")
            text.append(f"{note or 'submitted':<28}", style="yellow" if note else "dim")
            text.append(f" {ago(at, now):>5} ago\n", style="dim")
    text.append("last decision ", style="bold")
    if c.last_decision_at is not None:
        text.append(f"{stamp(c.last_decision_at, tz)} "
                    f"({ago(c.last_decision_at.timestamp(), now)} ago)", style="dim")
    decision = c.last_decision or "none yet"
    if c.last_submitted:
        decision = f"requested {c.last_submitted}: {decision}"
    text.append(f"\n  {decision}\n")
    text.append("last error ", style="bold")
    text.append(f"{c.last_error}\n" if c.last_error else "none\n",
                style="red" if c.last_error else "dim")
    if c.note:
        text.append("provider says ", style="bold")
        text.append(f"{c.note}\n")
    return text

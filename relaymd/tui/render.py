"""What the console's text looks like: status colours, ages, progress bars, the header and the
job detail pane. Plain functions from data to rich Text (no widgets, no app state)."""

from __future__ import annotations

from collections import Counter

from rich.text import Text

from relaymd.models import JobDetail
from relaymd.models import JobStatus as J
from relaymd.models import WorkerStatus as W

STATUS_STYLE: dict[str, str] = {
    J.queued: "yellow", J.assigned: "cyan", J.running: "bold green", J.completed: "blue",
    J.failed: "bold red", J.cancelled: "dim", W.idle: "green", W.busy: "bold green",
    W.stale: "yellow", W.quarantined: "red", W.provisioning: "cyan", W.gone: "dim"}
# The header's counts, in this order.
JOB_ORDER = (J.running, J.assigned, J.queued, J.completed, J.failed, J.cancelled)
WORKER_ORDER = (W.busy, W.idle, W.provisioning, W.stale, W.quarantined)


def ago(then: float | None, now: float) -> str:
    if then is None:
        return "-"
    s = max(0, int(now - then))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


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


def header_text(address: str, jobs: Counter[str], workers: Counter[str], rate: float) -> Text:
    """The two header lines: where the API is, the checkpoint rate, jobs and workers by state."""

    def counts(c: Counter[str], order: tuple[str, ...]) -> Text:
        out = Text()
        for s in order:
            if c[s]:
                out.append(f"  {c[s]} ")
                out.append(s, STATUS_STYLE.get(s, ""))
        return out if out else Text(" none", "dim")
    return Text.assemble(
        ("RelayMD ", "bold"), ("api ", "dim"), address,
        ("   checkpoints/h ", "dim"), f"{rate:.0f}", "\n",
        ("jobs", "bold"), counts(jobs, JOB_ORDER),
        ("   workers", "bold"), counts(workers, WORKER_ORDER))


def detail_text(d: JobDetail, now: float) -> Text:
    """The detail pane of one job: state, where it may run, checkpoints, events, last failure."""
    text = Text()
    text.append(f"{d.id[:12]}  ", style="bold")
    text.append(d.title + "\n")
    text.append("state ")
    text.append_text(styled(str(d.status)))
    text.append(f"  attempt {d.attempt}  failures {d.failures}/{d.max_attempts}\n")
    text.append(f"{d.command}\n", style="dim")
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
    text.append("\nevents\n", style="bold")
    for e in d.events[-12:]:
        text.append(f"  {e.at:%m-%d %H:%M} ", style="dim")
        text.append(f"{e.kind:<10} {e.reason[:30]}\n")
    if d.last_failure:
        f = d.last_failure
        text.append(f"\nlast failure (attempt {f.attempt}, exit {f.exit_code})\n",
                    style="bold red")
        text.append(f"  {f.reason}\n")
        for line in f.log_tail.splitlines()[-10:]:
            text.append(f"  | {line}\n", style="dim")
    return text

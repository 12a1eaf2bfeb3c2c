"""The operator console: live jobs, workers, one job's details and the orchestrator's log.

Data flow: the orchestrator calls our listener after every committed change; that becomes a
`Changed` message (bursts coalesce), and a refresh worker reads rows from the source and patches
the tables: only rows whose rendered cells differ are touched, so 10,000 jobs cost a diff, not
a rebuild. A slow tick (every `poll` seconds) refreshes ages and heartbeat-borne progress, and
is the only update path for a remote (`--connect`) source.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.geometry import Size
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, RichLog, Static
from textual.widgets.data_table import ColumnKey, RowKey

from relaymd.tui.screens import ConfirmScreen, HelpScreen, SubmitScreen
from relaymd.tui.source import JobRow, Source, WorkerRow, progress_of

STATUS_STYLE = {"queued": "yellow", "assigned": "cyan", "running": "bold green",
                "completed": "blue", "failed": "bold red", "cancelled": "dim",
                "idle": "green", "busy": "bold green", "stale": "yellow", "quarantined": "red",
                "provisioning": "cyan", "gone": "dim"}
# The order puts what an operator scans for first, so an 80-column terminal shows it all
# before the table scrolls sideways.
JOB_COLUMNS = (("id", "ID", 8), ("title", "TITLE", 16), ("status", "STATE", 9),
               ("progress", "PROGRESS", 13), ("last", "LAST CKPT", 9), ("ckpt", "CKPTS", 5),
               ("worker", "WORKER", 8), ("cluster", "CLUSTER", 8), ("age", "AGE", 6))
WORKER_COLUMNS = (("id", "ID", 8), ("status", "STATE", 12), ("where", "PROVIDER/CLUSTER", 17),
                  ("gpu", "GPU", 16), ("job", "JOB", 8), ("beat", "HEARTBEAT", 9),
                  ("left", "ALLOC LEFT", 10))


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


class Changed(Message):
    """The orchestrator committed a change to `what` ("jobs" or "workers")."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Changed) and message.what == self.what


class LogLine(Message):
    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line


class PanelHandler(logging.Handler):
    """Forwards log records into the console's log pane (post_message is thread-safe)."""

    def __init__(self, app: App[Any]) -> None:
        super().__init__(logging.INFO)
        self.app = app
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.app.post_message(LogLine(self.format(record)))
        except Exception:
            pass


class FixedTable(DataTable[Any]):
    """A table whose columns all have fixed widths and whose rows are one line: DataTable
    measures every cell of every new row to size auto-width columns (90,000 measurements for
    10,000 jobs, ~2 s); with nothing to size there is nothing to measure."""

    def _update_dimensions(self, new_rows: Iterable[Any]) -> None:
        if any(c.auto_width for c in self.columns.values()) or self._labelled_row_exists:
            super()._update_dimensions(new_rows)
            return
        # What the measuring pass ends with: the scrollable size.
        width = sum(c.get_render_width(self) for c in self.columns.values())
        header = self.header_height if self.show_header else 0
        self.virtual_size = Size(width, self._total_row_height + header)


    def patch(self, shown: dict[str, tuple[Any, ...]], rows: Iterable[tuple[str, Any]],
              columns: list[str], render: Callable[[int, Any], Any]) -> None:
        """Make the table show `rows` ((key, cells), cells None: remove the row), given `shown`
        (what it shows now, by key; kept up to date): rows are removed and appended, and of a
        changed row only the cells that differ are set, all with one repaint (`update_cell`
        repaints per cell: 1,000 changed jobs spent most of their patch there)."""
        data = self._data
        updated = 0
        for key, cells in rows:
            old = shown.get(key)
            if cells is None:
                if old is not None:
                    self.remove_row(key)
                    del shown[key]
            elif old is None:
                self.add_row(*(render(i, v) for i, v in enumerate(cells)), key=key)
                shown[key] = cells
            elif old != cells:
                row = data[RowKey(key)]
                for i, (a, b) in enumerate(zip(old, cells, strict=True)):
                    if a != b:
                        row[ColumnKey(columns[i])] = render(i, b)
                        updated += 1
                shown[key] = cells
        if updated:
            self._update_count += updated
            self.refresh()


class JobsTable(FixedTable):
    """The jobs table: enter opens the details (and says so in the footer)."""

    BINDINGS = [Binding("enter", "select_cursor", "Details")]


class RelayApp(App[None]):
    TITLE = "RelayMD"
    CSS_PATH = "relaymd.tcss"
    BINDINGS = [
        Binding("s", "submit", "Submit"),
        Binding("c", "cancel_job", "Cancel"),
        Binding("r", "requeue_job", "Requeue"),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("tab", "focus_next", "Panel", priority=True),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit_console", "Quit"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, source: Source, *, clock: Callable[[], float] = time.time,
                 poll: float = 2.0) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.poll = poll
        self.filter_text = ""
        self._job_rows: dict[str, JobRow] = {}  # everything the source has
        self._job_cells: dict[str, tuple[Any, ...]] = {}  # what the table shows, by row key
        self._worker_cells: dict[str, tuple[Any, ...]] = {}
        self._worker_list: list[WorkerRow] = []
        self._clusters: dict[str, str] = {}  # worker id -> cluster, for the jobs table
        self._dirty_jobs: set[str] = set()  # changed since the last patch
        self._reload_jobs = True  # the next patch re-reads every job
        self._jobs_busy = self._workers_busy = False
        self._workers_dirty = False
        self._last_sweep = 0.0
        self._ckpt_marks: list[tuple[float, int]] = []  # (time, checkpoints total) for the rate
        self.selected: str | None = None
        self.updates = 0  # table patch passes so far (benchmarks and tests read it)
        self.workers_seen = False

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """Every key is also a command palette entry (ctrl+p)."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("Submit a job (s)", "Pack a directory and queue it", self.action_submit)
        yield SystemCommand("Cancel the selected job (c)", "Asks first; its worker stops",
                            self.action_cancel_job)
        yield SystemCommand("Requeue the selected job (r)", "Back to the queue",
                            self.action_requeue_job)
        yield SystemCommand("Show or hide details (enter)", "Events, checkpoints, last failure",
                            self.action_details)
        yield SystemCommand("Filter jobs (/)", "By id prefix, title or state", self.action_filter)
        yield SystemCommand("Help (?)", "The console's keys", self.action_help)
        yield SystemCommand("Quit the console (q)", "Workers keep running", self.action_quit_console)

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static("", id="header")
        with Horizontal(id="main"):
            with Vertical(id="tables"):
                yield JobsTable(id="jobs", cursor_type="row", zebra_stripes=True)
                yield FixedTable(id="workers", cursor_type="row")
            yield Static("", id="detail")
        yield RichLog(id="log", max_lines=500, wrap=False, markup=False)
        yield Input(placeholder="filter: id prefix, title or state", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        jobs = self.query_one("#jobs", DataTable)
        for key, label, width in JOB_COLUMNS:
            jobs.add_column(label, key=key, width=width)
        workers = self.query_one("#workers", DataTable)
        for key, label, width in WORKER_COLUMNS:
            workers.add_column(label, key=key, width=width)
        self.source.subscribe(self.source_changed)
        self.refresh_workers()
        self.refresh_jobs()
        self.set_interval(self.poll, self.tick)
        jobs.focus()

    # ------------------------------------------------------------------ data in

    def source_changed(self, what: str, key: str | None) -> None:
        """The orchestrator's listener: runs on its loop (ours, when hosted), right after a
        commit. Only notes what changed; bursts coalesce into one patch."""
        if what == "jobs":
            if key is None:
                self._reload_jobs = True
            else:
                self._dirty_jobs.add(key)
        self.post_message(Changed(what))

    def tick(self) -> None:
        """Ages and heartbeat-borne progress move without change events."""
        live = self.source.live_progress()
        self.refresh_workers()
        if live is None:  # a remote orchestrator: poll everything
            self._reload_jobs = True
            self.refresh_jobs()
            return
        rows = self._job_rows
        moved: list[str] = []
        for job_id, p in live.items():
            row = rows.get(job_id)
            if row is not None:
                done, text = progress_of(p)
                if (done, text) != (row.done, row.progress):
                    rows[job_id] = replace(row, done=done, progress=text)
                    moved.append(job_id)
        now = self.clock()
        if now - self._last_sweep >= 60:
            self._last_sweep = now
            self.redraw_jobs()  # every age, on screen or not
        else:  # what moved, and the ages an operator can see right now
            self.redraw_jobs(moved + self.visible_jobs())
        self.update_header()

    def visible_jobs(self) -> list[str]:
        table = self.query_one("#jobs", DataTable)
        first = int(table.scroll_y)
        return [str(r.key.value) for r in table.ordered_rows[first:first + table.size.height]]

    def on_changed(self, message: Changed) -> None:
        if message.what == "workers":
            self.refresh_workers()
        elif message.what == "jobs":
            self.refresh_jobs()

    def on_log_line(self, message: LogLine) -> None:
        self.query_one("#log", RichLog).write(message.line)

    # Not `exclusive` workers: cancelling a pass mid-read would lose the ids it had taken.
    # One pass runs at a time and loops while changes arrived during its read.

    @work(group="jobs", exit_on_error=False)
    async def refresh_jobs(self) -> None:
        if self._jobs_busy:
            return  # the running pass picks up what is now dirty
        self._jobs_busy = True
        try:
            while self._reload_jobs or self._dirty_jobs:
                if self._reload_jobs:
                    self._reload_jobs = False
                    self._dirty_jobs.clear()
                    self.apply_jobs(await self.source.jobs())
                else:
                    ids, self._dirty_jobs = self._dirty_jobs, set()
                    self.apply_jobs(await self.source.jobs(ids), ids)
        finally:
            self._jobs_busy = False

    @work(group="workers", exit_on_error=False)
    async def refresh_workers(self) -> None:
        self._workers_dirty = True
        if self._workers_busy:
            return
        self._workers_busy = True
        try:
            while self._workers_dirty:
                self._workers_dirty = False
                self.apply_workers(await self.source.workers())
        finally:
            self._workers_busy = False

    def job_cells(self, r: JobRow, now: float) -> tuple[Any, ...]:
        return (r.id[:8], r.title, r.status, (r.done, r.progress),
                ago(r.last_checkpoint_at, now), str(r.checkpoints), r.worker[:8] or "-",
                self._clusters.get(r.worker) or "-", ago(r.created_at, now))

    @staticmethod
    def render_job_cell(index: int, value: Any) -> Any:
        if index == 2:
            return styled(value)
        if index == 3:
            return bar(*value)
        return value

    @staticmethod
    def render_worker_cell(index: int, value: Any) -> Any:
        return styled(value) if index == 1 else value

    def matches(self, r: JobRow) -> bool:
        f = self.filter_text.lower()
        return not f or r.id.startswith(f) or f in r.title.lower() or r.status == f

    def apply_jobs(self, rows: list[JobRow], ids: set[str] | None = None) -> None:
        """Take `rows` from the source: all of them (`ids` None), or the current state of the
        jobs `ids` (an id without a row was purged). Then patch the table."""
        if ids is None:
            self._job_rows = {r.id: r for r in rows}
            self.redraw_jobs()
        else:
            for job_id in ids:
                self._job_rows.pop(job_id, None)
            self._job_rows.update((r.id, r) for r in rows)
            self.redraw_jobs(ids)
        self.updates += 1
        self.update_header()
        table = self.query_one("#jobs", DataTable)
        if self.selected is None and table.row_count:
            self.selected = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        if self.detail_shown() and (ids is None or self.selected in ids):
            self.load_detail()

    def redraw_jobs(self, keys: Iterable[str] | None = None) -> None:
        """Make the table show `_job_rows` (filtered) for `keys` (default: every job): remove
        rows, update only the cells that differ, append new rows."""
        now = self.clock()
        rows = self._job_rows
        if keys is None:
            keys = list(rows) + [k for k in self._job_cells if k not in rows]

        def wanted(key: str) -> tuple[Any, ...] | None:
            r = rows.get(key)
            return self.job_cells(r, now) if r is not None and self.matches(r) else None
        self.query_one("#jobs", FixedTable).patch(
            self._job_cells, ((k, wanted(k)) for k in keys), [c[0] for c in JOB_COLUMNS],
            self.render_job_cell)

    def apply_workers(self, rows: list[WorkerRow]) -> None:
        now = self.clock()
        self._worker_list = rows
        self.workers_seen = True
        clusters = {w.id: w.cluster for w in rows}
        moved = {k for k, v in clusters.items() if self._clusters.get(k) != v}
        self._clusters = clusters
        if moved:  # jobs show their worker's cluster
            self.redraw_jobs([k for k, r in self._job_rows.items() if r.worker in moved])
        wanted: dict[str, tuple[Any, ...]] = {}
        for w in rows:
            if w.status == "gone":
                continue
            left = "-" if w.wall_time_end is None else (
                ago(now, w.wall_time_end) if w.wall_time_end > now else "ended")
            wanted[w.id] = (w.id[:8], w.status, f"{w.provider}/{w.cluster}", w.gpu,
                            w.job[:8] or "-", ago(w.last_heartbeat_at, now), left)
        gone = [(k, None) for k in self._worker_cells if k not in wanted]
        self.query_one("#workers", FixedTable).patch(
            self._worker_cells, [*gone, *wanted.items()], [c[0] for c in WORKER_COLUMNS],
            self.render_worker_cell)
        self.update_header()

    def update_header(self) -> None:
        now = self.clock()
        jobs = Counter(r.status for r in self._job_rows.values())
        workers = Counter(w.status for w in self._worker_list if w.status != "gone")
        total = sum(r.checkpoints for r in self._job_rows.values())
        marks = self._ckpt_marks
        if not marks or now - marks[-1][0] >= 5:  # a mark per 5 s is plenty for a rate
            marks.append((now, total))
            while now - marks[0][0] > 600:
                marks.pop(0)
        first_t, first_n = marks[0]
        rate = max(0, total - first_n) / ((now - first_t) / 3600) if now - first_t >= 30 else 0.0

        def counts(c: Counter[str], order: tuple[str, ...]) -> Text:
            out = Text()
            for s in order:
                if c[s]:
                    out.append(f"  {c[s]} ")
                    out.append(s, STATUS_STYLE.get(s, ""))
            return out if out else Text(" none", "dim")
        text = Text.assemble(
            ("RelayMD ", "bold"), ("api ", "dim"), self.source.address,
            ("   checkpoints/h ", "dim"), f"{rate:.0f}", "\n",
            ("jobs", "bold"), counts(jobs, ("running", "assigned", "queued", "completed",
                                            "failed", "cancelled")),
            ("   workers", "bold"), counts(workers, ("busy", "idle", "provisioning", "stale",
                                                     "quarantined")))
        self.query_one("#header", Static).update(text)

    # ------------------------------------------------------------------ details

    def detail_shown(self) -> bool:
        return self.query_one("#detail").has_class("shown")

    @on(DataTable.RowHighlighted, "#jobs")
    def job_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.selected = event.row_key.value if event.row_key is not None else None
        if self.detail_shown():
            self.load_detail()

    @work(exclusive=True, group="detail", exit_on_error=False)
    async def load_detail(self) -> None:
        pane = self.query_one("#detail", Static)
        if self.selected is None:
            pane.update("no job selected")
            return
        try:
            d = await self.source.job(self.selected)
        except Exception as exc:
            pane.update(f"cannot load job {self.selected[:8]}: {exc}")
            return
        now = self.clock()
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
        pane.update(text)

    # ------------------------------------------------------------------ actions

    @on(DataTable.RowSelected, "#jobs")
    def job_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()  # enter on a row (the table keeps the key for itself)

    def action_details(self) -> None:
        pane = self.query_one("#detail")
        pane.toggle_class("shown")
        if self.detail_shown():
            self.load_detail()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self.redraw_jobs()

    @on(Input.Submitted, "#filter")
    def filter_done(self, event: Input.Submitted) -> None:
        event.input.remove_class("shown")
        self.query_one("#jobs").focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("shown")
        self.query_one("#jobs").focus()

    def action_cancel_job(self) -> None:
        job = self._job_rows.get(self.selected or "")
        if job is None:
            self.notify("no job selected", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.change_job("cancel", job.id)
        self.push_screen(ConfirmScreen(f"Cancel job {job.id[:8]} ({job.title}, {job.status})?"
                                       " Its worker is told to stop."), answered)

    def action_requeue_job(self) -> None:
        if self.selected is None:
            self.notify("no job selected", severity="warning")
            return
        self.change_job("requeue", self.selected)

    @work(group="changes", exit_on_error=False)
    async def change_job(self, how: str, job_id: str) -> None:
        try:
            job = await (self.source.cancel if how == "cancel" else self.source.requeue)(job_id)
        except Exception as exc:
            self.notify(f"{how} {job_id[:8]}: {getattr(exc, 'message', None) or exc}",
                        severity="error", timeout=8)
            return
        self.notify(f"job {job.id[:8]}: {job.status}")
        self.refresh_jobs()

    def action_submit(self) -> None:
        self.push_screen(SubmitScreen())

    def submit_from_form(self, form: SubmitScreen, fields: dict[str, Any]) -> None:
        self.do_submit(form, fields)

    @work(group="changes", exit_on_error=False)
    async def do_submit(self, form: SubmitScreen, f: dict[str, Any]) -> None:
        form.show_error("submitting ...")
        try:
            job = await self.source.submit(f["directory"], f["title"], f["command"],
                                           f["checkpoint"], f["gpus"])
        except Exception as exc:
            form.show_error(str(getattr(exc, "message", None) or exc))
            return
        form.dismiss(None)
        self.notify(f"submitted job {job.id[:8]} ({job.title})")
        self.refresh_jobs()

    def action_quit_console(self) -> None:
        # Local worker processes alive (ours to stop) that hold a job: a worker whose job just
        # completed is still alive for a moment, and quitting costs it nothing.
        running = 0
        if self.source.local_workers_alive():
            running = sum(1 for w in self._worker_list
                          if w.status == "busy" and w.provider == "local")
        if not running:
            self.exit()
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.exit()
        self.push_screen(ConfirmScreen(
            f"{running} local worker(s) are running jobs. Quitting hands their jobs back with a "
            "last checkpoint; they resume on the next start. Quit?"), answered)

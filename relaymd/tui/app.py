"""The operator console: live jobs, workers, one job's details and the orchestrator's log;
the clusters and usage views (views.py) a key away.

Data flow: the orchestrator calls our listener after every committed change; that becomes a
`Changed` message (bursts coalesce), and a refresh worker reads rows from the source and patches
the tables: only rows whose rendered cells differ are touched, so 10,000 jobs cost a diff, not
a rebuild. A slow tick (every `poll` seconds) refreshes ages and heartbeat-borne progress, and
is the only update path for a remote (`--connect`) source. Ages are redrawn for the rows on
screen at every tick and whenever the table scrolls (rows off screen are swept once a minute),
so no row comes into view with a stale age.

Under 120 columns (Screen class `-narrow`) the detail pane opens below a short jobs table
instead of beside it, so the table keeps its width (state and progress stay visible).

This module is the App: its state, data flow and actions. The tables and their row cells are in
tables.py, the rich text of the header and detail pane in render.py, the messages that bring
news in from the orchestrator and from logging in messages.py, the modal screens in screens.py,
the clusters and usage views in views.py.
Over 400 lines because the App's key bindings, actions and refresh paths share its state (rows
shown, selection, last refresh); split further they would pass that state back and forth.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import tzinfo
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import ContentSwitcher, DataTable, Footer, Input, RichLog, Static

from relaymd.models import JobDetail, WorkerStatus
from relaymd.tui.messages import Changed, LogLine
from relaymd.tui.messages import PanelHandler as PanelHandler  # relaymd.tui.run's import
from relaymd.tui.render import detail_text, header_text
from relaymd.tui.screens import ConfirmScreen, HelpScreen, SubmitScreen
from relaymd.tui.source import JobRow, Source, WorkerRow, progress_of, rate_of
from relaymd.tui.tables import (
    JOB_COLUMNS,
    WORKER_COLUMNS,
    FixedTable,
    JobsTable,
    job_cells,
    render_job_cell,
    render_worker_cell,
    worker_cells,
)
from relaymd.tui.views import ClustersView, UsageView

# Each view's container; `1`, `2`, `3` show them.
VIEWS = {"jobs": "main", "clusters": "clusters-view", "usage": "usage-view"}
JOB_ACTIONS = frozenset({"submit", "cancel_job", "requeue_job", "filter", "details"})
VIEW_KEYS = Binding.Group("Views")


class RelayApp(App[None]):
    TITLE = "RelayMD"
    CSS_PATH = "relaymd.tcss"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS = [
        Binding("s", "submit", "Submit"),
        Binding("c", "cancel_job", "Cancel"),
        Binding("r", "requeue_job", "Requeue"),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("1", "view('jobs')", "Jobs", group=VIEW_KEYS),
        Binding("2", "view('clusters')", "Clusters", group=VIEW_KEYS),
        Binding("3", "view('usage')", "Usage", group=VIEW_KEYS),
        Binding("tab", "focus_next", "Panel", priority=True, show=False),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit_console", "Quit"),
        Binding("escape", "back", "Close", show=False),
    ]

    def __init__(self, source: Source, *, clock: Callable[[], float] = time.time,
                 poll: float = 2.0, tz: tzinfo | None = None) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.poll = poll
        self.tz = tz  # times shown in it (None: this machine's local time), always with the zone
        self.view = "jobs"
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
        self._detail: JobDetail | None = None  # the one shown, redrawn at each tick (ages)
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
        for key, name, what in (("1", "jobs", "Jobs and workers, a job's details"),
                                ("2", "clusters", "Providers, allocations, switch one on or off"),
                                ("3", "usage", "GPU-hours used, useful and redone")):
            yield SystemCommand(f"Show the {name} view ({key})", what,
                                lambda name=name: self.action_view(name))
        yield SystemCommand("Help (?)", "The console's keys", self.action_help)
        yield SystemCommand("Quit the console (q)", "Workers keep running", self.action_quit_console)

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static("", id="header")
        with ContentSwitcher(id="views", initial=VIEWS["jobs"]):
            with Horizontal(id="main"):
                with Vertical(id="tables"):
                    yield JobsTable(id="jobs", cursor_type="row", zebra_stripes=True)
                    yield FixedTable(id="workers", cursor_type="row")
                yield Static("", id="detail")
            yield ClustersView(self.source, self.clock, self.tz, id="clusters-view")
            yield UsageView(self.source, self.clock, self.tz, id="usage-view")
        yield RichLog(id="log", max_lines=500, wrap=False, markup=False)
        yield Input(placeholder="filter: id prefix, title or state", id="filter")
        yield Footer(compact=True)

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

    def on_resize(self) -> None:
        # Under 100 columns the footer's room goes to the keys (ctrl+p still opens it).
        self.query_one(Footer).show_command_palette = self.size.width >= 100

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
                speed, eta = rate_of(p)
                if (done, text, speed, eta) != (row.done, row.progress, row.ns_per_day, row.eta):
                    rows[job_id] = replace(row, done=done, progress=text, ns_per_day=speed,
                                           eta=eta)
                    moved.append(job_id)
        now = self.clock()
        if now - self._last_sweep >= 60:
            self._last_sweep = now
            self.redraw_jobs()  # every age, on screen or not
        else:  # what moved, and the ages an operator can see right now
            self.redraw_jobs(moved + self.visible_jobs())
        self.update_header()
        self.poll_view(now)

    def poll_view(self, now: float) -> None:
        """The tick's share of what is shown besides the tables: the detail pane's ages, and
        the clusters or usage view's data."""
        if self._detail is not None and self.detail_shown():
            self.query_one("#detail", Static).update(detail_text(self._detail, now, self.tz))
        if self.view != "jobs":
            self.view_widget().poll(now)

    def view_widget(self) -> ClustersView | UsageView:
        return self.query_one(f"#{VIEWS[self.view]}", ClustersView if self.view == "clusters"
                              else UsageView)

    def visible_jobs(self) -> list[str]:
        table = self.query_one("#jobs", DataTable)
        first = int(table.scroll_y)
        return [str(r.key.value) for r in table.ordered_rows[first:first + table.size.height]]

    @on(JobsTable.Scrolled)
    def jobs_scrolled(self) -> None:
        self.redraw_jobs(self.visible_jobs())  # rows come into view with their ages now

    def on_changed(self, message: Changed) -> None:
        if message.what == "workers":
            self.refresh_workers()
        elif message.what == "jobs":
            self.refresh_jobs()
        if message.what in ("workers", "clusters") and self.view == "clusters":
            self.view_widget().load()

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
            return job_cells(r, now, self._clusters) if r is not None and self.matches(r) else None
        self.query_one("#jobs", FixedTable).patch(
            self._job_cells, ((k, wanted(k)) for k in keys), [c[0] for c in JOB_COLUMNS],
            render_job_cell)

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
            if w.status != WorkerStatus.gone:
                wanted[w.id] = worker_cells(w, now)
        gone = [(k, None) for k in self._worker_cells if k not in wanted]
        self.query_one("#workers", FixedTable).patch(
            self._worker_cells, [*gone, *wanted.items()], [c[0] for c in WORKER_COLUMNS],
            render_worker_cell)
        self.query_one(ClustersView).set_workers(rows)
        self.update_header()

    def update_header(self) -> None:
        now = self.clock()
        jobs = Counter(r.status for r in self._job_rows.values())
        workers = Counter(w.status for w in self._worker_list if w.status != WorkerStatus.gone)
        total = sum(r.checkpoints for r in self._job_rows.values())
        marks = self._ckpt_marks
        if not marks or now - marks[-1][0] >= 5:  # a mark per 5 s is plenty for a rate
            marks.append((now, total))
            while now - marks[0][0] > 600:
                marks.pop(0)
        first_t, first_n = marks[0]
        rate = max(0, total - first_n) / ((now - first_t) / 3600) if now - first_t >= 30 else 0.0

        text = header_text(self.source.address, jobs, workers, rate, self.view)
        self.query_one("#header", Static).update(text)

    # ------------------------------------------------------------------ details

    def detail_shown(self) -> bool:
        return self.query_one("#main").has_class("details")

    @on(DataTable.RowHighlighted, "#jobs")
    def job_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.selected = event.row_key.value if event.row_key is not None else None
        if self.detail_shown():
            self.load_detail()

    @work(exclusive=True, group="detail", exit_on_error=False)
    async def load_detail(self) -> None:
        pane = self.query_one("#detail", Static)
        self._detail = None
        if self.selected is None:
            pane.update("no job selected")
            return
        try:
            d = await self.source.job(self.selected)
        except Exception as exc:
            pane.update(f"cannot load job {self.selected[:8]}: {exc}")
            return
        self._detail = d
        pane.update(detail_text(d, self.clock(), self.tz))

    # ------------------------------------------------------------------ actions

    @on(DataTable.RowSelected, "#jobs")
    def job_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()  # enter on a row (the table keeps the key for itself)

    def action_details(self) -> None:
        self.show_details(not self.detail_shown())

    def show_details(self, shown: bool) -> None:
        self.query_one("#main").set_class(shown, "details")
        self.query_one("#log").set_class(shown, "-details")  # a narrow screen lends its rows
        if shown:
            self.load_detail()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The jobs view's keys act (and show in the footer) only in the jobs view."""
        return self.view == "jobs" or action not in JOB_ACTIONS

    def action_view(self, name: str) -> None:
        self.view = name
        self.query_one("#views", ContentSwitcher).current = VIEWS[name]
        if name == "jobs":
            self.query_one("#jobs").focus()
        else:
            view = self.view_widget()
            view.query(DataTable).last().focus()
            view.load()
        self.update_header()
        self.refresh_bindings()

    def action_back(self) -> None:
        """escape: back to the jobs view; there, clear the filter being typed, else close the
        details, else clear the filter."""
        box = self.query_one("#filter", Input)
        if self.view != "jobs":
            self.action_view("jobs")
        elif not box.has_focus and self.detail_shown():
            self.show_details(False)
        else:
            self.action_clear_filter()

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
                          if w.status == WorkerStatus.busy and w.provider == "local")
        if not running:
            self.exit()
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.exit()
        self.push_screen(ConfirmScreen(
            f"{running} local worker(s) are running jobs. Quitting hands their jobs back with a "
            "last checkpoint; they resume on the next start. Quit?"), answered)

"""The console's clusters and usage views (keys 2 and 3; 1 is the jobs view, the App's own).

Clusters: a row per configured cluster (provider, strategy, on or off, busy and idle workers,
pending allocations, jobs waiting, the last decision) and, below, the selected one's details:
its workers by state, each pending allocation with the provider's word on it (SLURM's reason,
e.g. `PENDING (Priority)`), the last decision with its time and the last error. `e` enables and
`d` disables the selected cluster, each after a confirmation.

Usage: GPU-hours used, useful and redone, in total, per cluster and per job (the most first).

Each view reads the source when it is shown and again on the console's tick while it stays
shown (usage at most every `USAGE_EVERY` seconds: the orchestrator replays every job's events
for it); nothing is read while it is hidden."""

from __future__ import annotations

from collections.abc import Callable
from datetime import tzinfo
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from relaymd.models import ClusterInfo, Usage
from relaymd.models import WorkerStatus as W
from relaymd.tui.render import cluster_text, gpu_hours, stamp
from relaymd.tui.screens import ConfirmScreen
from relaymd.tui.source import Source, WorkerRow
from relaymd.tui.tables import (
    CLUSTER_COLUMNS,
    USAGE_CLUSTER_COLUMNS,
    USAGE_JOB_COLUMNS,
    FixedTable,
    cluster_cells,
    render_cluster_cell,
    render_usage_cluster_cell,
    render_usage_job_cell,
    usage_cluster_cells,
    usage_job_cells,
)

USAGE_EVERY = 10.0  # seconds between two usage reads while the view is shown


def said(exc: Exception) -> str:
    """What an error says: the API's message when it has one."""
    return str(getattr(exc, "message", None) or exc)


def add_columns(table: DataTable[Any], columns: tuple[tuple[str, str, int], ...],
                numbers_from: int | None = None) -> None:
    """Fixed-width columns; from `numbers_from` on, labels aligned right like their numbers."""
    for i, (key, label, width) in enumerate(columns):
        right = numbers_from is not None and i >= numbers_from
        table.add_column(Text(label, justify="right") if right else label, key=key, width=width)


class PolledView(Vertical):
    """A view read from the source while it is shown: one read at a time, a failed read said
    in place (`error_at`), the result drawn by `show`."""

    what = ""  # what a failed read could not read
    error_at = ""  # the Static that says so

    async def fetch(self) -> Any:
        raise NotImplementedError

    def show(self, data: Any) -> None:
        raise NotImplementedError

    @work(group="view-read", exit_on_error=False)
    async def load(self) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            data = await self.fetch()
        except Exception as exc:
            self.query_one(self.error_at, Static).update(
                Text(f"cannot read the {self.what}: {said(exc)}", style="red"))
            return
        finally:
            self._busy = False
        self.show(data)


class ClustersView(PolledView):
    BINDINGS = [Binding("e", "switch(True)", "Enable"), Binding("d", "switch(False)", "Disable")]
    what, error_at = "clusters", "#cluster-detail"

    def __init__(self, source: Source, clock: Callable[[], float], tz: tzinfo | None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.source, self.clock, self.tz = source, clock, tz
        self.infos: dict[str, ClusterInfo] = {}
        self.worker_rows: list[WorkerRow] = []
        self.selected: str | None = None
        self.loads = 0  # reads shown so far (tests wait on it)
        self._cells: dict[str, tuple[Any, ...]] = {}
        self._busy = False

    def compose(self) -> ComposeResult:
        yield FixedTable(id="clusters", cursor_type="row")
        yield Static("", id="cluster-detail")

    def on_mount(self) -> None:
        add_columns(self.query_one("#clusters", DataTable), CLUSTER_COLUMNS)

    def poll(self, now: float) -> None:
        self.load()

    async def fetch(self) -> list[ClusterInfo]:
        return await self.source.clusters()

    def show(self, infos: list[ClusterInfo]) -> None:
        self.infos = {c.name: c for c in infos}
        table = self.query_one("#clusters", FixedTable)
        gone = [(k, None) for k in self._cells if k not in self.infos]
        table.patch(self._cells, [*gone, *((c.name, cluster_cells(c)) for c in infos)],
                    [c[0] for c in CLUSTER_COLUMNS], render_cluster_cell)
        if self.selected not in self.infos and table.row_count:
            self.selected = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        self.loads += 1
        self.show_detail()

    def set_workers(self, workers: list[WorkerRow]) -> None:
        self.worker_rows = workers
        if self.display:  # hidden, it is redrawn when shown
            self.show_detail()

    def show_detail(self) -> None:
        pane = self.query_one("#cluster-detail", Static)
        info = self.infos.get(self.selected or "")
        if info is None:
            pane.update("no clusters (add them under `clusters:` in the config file)"
                        if not self.infos else "no cluster selected")
            return
        mine = [(w.status, w.provider_id, w.note, w.registered_at) for w in self.worker_rows
                if w.cluster == info.name and w.status != W.gone]
        pane.update(cluster_text(info, mine, self.clock(), self.tz))

    @on(DataTable.RowHighlighted, "#clusters")
    def highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.selected = event.row_key.value if event.row_key is not None else None
        self.show_detail()

    def action_switch(self, enable: bool) -> None:
        info = self.infos.get(self.selected or "")
        if info is None:
            self.notify("no cluster selected", severity="warning")
            return
        if info.enabled == enable:
            self.notify(f"cluster {info.name} is already {'enabled' if enable else 'disabled'}")
            return
        question = (f"Enable cluster {info.name} ({info.provider})? The orchestrator may "
                    "request workers from it again." if enable else
                    f"Disable cluster {info.name} ({info.provider})? No more workers are "
                    "requested from it; its running workers finish their jobs.")

        def answered(yes: bool | None) -> None:
            if yes:
                self.do_switch(info.name, enable)
        self.app.push_screen(ConfirmScreen(question), answered)

    @work(group="cluster-switch", exit_on_error=False)
    async def do_switch(self, name: str, enable: bool) -> None:
        try:
            info = await self.source.set_cluster_enabled(name, enable)
        except Exception as exc:
            self.notify(f"cluster {name}: {said(exc)}", severity="error", timeout=8)
            return
        self.notify(f"cluster {info.name}: {'enabled' if info.enabled else 'disabled'}")
        self.load()


class UsageView(PolledView):
    what, error_at = "usage", "#usage-total"

    def __init__(self, source: Source, clock: Callable[[], float], tz: tzinfo | None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.source, self.clock, self.tz = source, clock, tz
        self.loads = 0
        self.read_at = float("-inf")  # the console's clock at the last read
        self._clusters: dict[str, tuple[Any, ...]] = {}
        self._jobs: dict[str, tuple[Any, ...]] = {}
        self._busy = False

    def compose(self) -> ComposeResult:
        yield Static("reading usage ...", id="usage-total")
        yield FixedTable(id="usage-clusters", cursor_type="row")
        yield FixedTable(id="usage-jobs", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        add_columns(self.query_one("#usage-clusters", DataTable), USAGE_CLUSTER_COLUMNS, 1)
        add_columns(self.query_one("#usage-jobs", DataTable), USAGE_JOB_COLUMNS, 3)

    def poll(self, now: float) -> None:
        if now - self.read_at >= USAGE_EVERY:
            self.load()

    async def fetch(self) -> Usage:
        self.read_at = self.clock()
        return await self.source.usage()

    def show(self, u: Usage) -> None:
        total = Text.assemble(("total ", "bold"),
                              gpu_hours(u.gpu_hours, u.gpu_hours_useful, u.gpu_hours_redone))
        total.append(f"\nas of {stamp(u.at, self.tz)}; redone: repeated after resumes",
                     style="dim")
        total.no_wrap, total.overflow = True, "ellipsis"
        self.query_one("#usage-total", Static).update(total)
        self._patch("#usage-clusters", self._clusters,
                    {c.cluster: usage_cluster_cells(c) for c in u.clusters},
                    USAGE_CLUSTER_COLUMNS, render_usage_cluster_cell)
        jobs = sorted(u.jobs, key=lambda j: -j.gpu_hours)
        self._patch("#usage-jobs", self._jobs, {j.id: usage_job_cells(j) for j in jobs},
                    USAGE_JOB_COLUMNS, render_usage_job_cell)
        self.loads += 1

    def _patch(self, selector: str, shown: dict[str, tuple[Any, ...]],
               wanted: dict[str, tuple[Any, ...]], columns: tuple[tuple[str, str, int], ...],
               render: Callable[[int, Any], Any]) -> None:
        """Patch a table, then keep its rows in GPU-hours order (the most first)."""
        table = self.query_one(selector, FixedTable)
        gone = [(k, None) for k in shown if k not in wanted]
        table.patch(shown, [*gone, *wanted.items()], [c[0] for c in columns], render)
        if [str(r.key.value) for r in table.ordered_rows] != list(wanted):
            table.sort("used", key=lambda used: float(used.plain), reverse=True)

"""The console's tables: their columns, the cells of a job, worker, cluster or usage row, and
the fixed-width DataTable that patches only the cells that changed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, DuplicateKey, Row, RowKey

from relaymd.models import ClusterInfo, ClusterUsage, JobUsage
from relaymd.models import JobStatus as J
from relaymd.tui.render import ago, bar, ns_day, span, styled
from relaymd.tui.source import JobRow, WorkerRow

# The order puts what an operator scans for first, so an 80-column terminal shows it all
# (up to the ETA) before the table scrolls sideways.
JOB_COLUMNS = (("id", "ID", 8), ("title", "TITLE", 16), ("status", "STATE", 9),
               ("progress", "PROGRESS", 13), ("last", "LAST CKPT", 9), ("rate", "NS/DAY", 6),
               ("eta", "ETA", 5), ("ckpt", "CKPTS", 5), ("worker", "WORKER", 8),
               ("cluster", "CLUSTER", 8), ("age", "AGE", 6))
WORKER_COLUMNS = (("id", "ID", 8), ("status", "STATE", 12), ("where", "PROVIDER/CLUSTER", 17),
                  ("gpu", "GPU", 16), ("job", "JOB", 8), ("beat", "HEARTBEAT", 9),
                  ("left", "ALLOC LEFT", 10))


def job_cells(r: JobRow, now: float, clusters: dict[str, str]) -> tuple[Any, ...]:
    """A job row's cells in JOB_COLUMNS order, as plain values (compared to find what moved);
    `clusters` maps worker id to its cluster."""
    running = r.status == J.running  # a rate or time left of a job not running is stale
    return (r.id[:8], r.title, r.status, (r.done, r.progress),
            ago(r.last_checkpoint_at, now), ns_day(r.ns_per_day if running else None).rjust(6),
            span(r.eta) if running and r.eta is not None else "-", str(r.checkpoints),
            r.worker[:8] or "-", clusters.get(r.worker) or "-", ago(r.created_at, now))


def worker_cells(w: WorkerRow, now: float) -> tuple[Any, ...]:
    """A worker row's cells in WORKER_COLUMNS order."""
    left = "-" if w.wall_time_end is None else (
        ago(now, w.wall_time_end) if w.wall_time_end > now else "ended")
    return (w.id[:8], w.status, f"{w.provider}/{w.cluster}", w.gpu,
            w.job[:8] or "-", ago(w.last_heartbeat_at, now), left)


def render_job_cell(index: int, value: Any) -> Any:
    if index == 2:
        return styled(value)
    if index == 3:
        return bar(*value)
    return value


def render_worker_cell(index: int, value: Any) -> Any:
    return styled(value) if index == 1 else value


CLUSTER_COLUMNS = (("name", "CLUSTER", 12), ("provider", "PROVIDER", 8),
                   ("strategy", "STRATEGY", 13), ("on", "ON", 3), ("busy", "BUSY", 4),
                   ("idle", "IDLE", 4), ("pending", "PENDING", 7), ("waiting", "WAITING", 7),
                   ("decision", "LAST DECISION", 60))


def cluster_cells(c: ClusterInfo) -> tuple[Any, ...]:
    """A cluster's row in CLUSTER_COLUMNS order (its details pane says the rest)."""
    decision = f"error: {c.last_error}" if c.last_error else c.last_decision or "-"
    return (c.name, c.provider, c.strategy, "yes" if c.enabled else "no", str(c.busy),
            str(c.idle), f"{c.pending}/{c.max_pending}", str(c.waiting), decision)


def render_cluster_cell(index: int, value: Any) -> Any:
    if index == 3:
        return Text(value, style="green" if value == "yes" else "bold yellow")
    if index == 8 and value.startswith("error: "):
        return Text(value, style="red")
    return value


USAGE_CLUSTER_COLUMNS = (("cluster", "CLUSTER", 14), ("attempts", "ATTEMPTS", 8),
                         ("used", "GPU-H", 8), ("useful", "USEFUL", 8), ("redone", "REDONE", 8),
                         ("share", "REDONE %", 8))
USAGE_JOB_COLUMNS = (("id", "ID", 8), ("title", "TITLE", 10), ("status", "STATE", 9),
                     ("used", "GPU-H", 7), ("useful", "USEFUL", 7), ("redone", "REDONE", 7),
                     ("rate", "NS/DAY", 6), ("eta", "ETA", 5), ("attempts", "ATT", 3))


def hours(value: float) -> str:
    return f"{value:.2f}" if value < 1000 else f"{value:.0f}"


def usage_cluster_cells(c: ClusterUsage) -> tuple[Any, ...]:
    share = f"{100 * c.gpu_hours_redone / c.gpu_hours:.0f}%" if c.gpu_hours > 0 else "-"
    return (c.cluster, str(c.attempts), hours(c.gpu_hours), hours(c.gpu_hours_useful),
            hours(c.gpu_hours_redone), share)


def usage_job_cells(j: JobUsage) -> tuple[Any, ...]:
    return (j.id[:8], j.title, str(j.status), hours(j.gpu_hours), hours(j.gpu_hours_useful),
            hours(j.gpu_hours_redone), ns_day(j.ns_per_day), span(j.eta_seconds),
            str(j.attempts))


def render_usage_cluster_cell(index: int, value: Any) -> Any:
    return Text(value, justify="right") if index else value


def render_usage_job_cell(index: int, value: Any) -> Any:
    if index == 2:
        return styled(value)
    return Text(value, justify="right") if index > 2 else value


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
        new: list[tuple[str, list[Any]]] = []
        for key, cells in rows:
            old = shown.get(key)
            if cells is None:
                if old is not None:
                    self.remove_row(key)
                    del shown[key]
            elif old is None:
                new.append((key, [render(i, v) for i, v in enumerate(cells)]))
                shown[key] = cells
            elif old != cells:
                row = data[RowKey(key)]
                for i, (a, b) in enumerate(zip(old, cells, strict=True)):
                    if a != b:
                        row[ColumnKey(columns[i])] = render(i, b)
                        updated += 1
                shown[key] = cells
        self.append_rows(new)
        if updated:
            self._update_count += updated
            self.refresh()

    def append_rows(self, new: list[tuple[str, list[Any]]]) -> None:
        """`add_row` for a batch of one-line rows (key, cells): the same bookkeeping, but the
        columns are looked up, the cursor re-checked (a reactive) and the idle check made once
        per batch instead of once per row, a third of a 10,000-job first patch."""
        if not new:
            return
        columns = [c.key for c in self.ordered_columns]
        was_empty = not self.rows
        for key, cells in new:
            row_key = RowKey(key)
            if row_key in self._row_locations:
                raise DuplicateKey(f"The row key {row_key!r} already exists.")
            self._row_locations[row_key] = len(self.rows)
            self._data[row_key] = dict(zip(columns, cells, strict=True))
            self.rows[row_key] = Row(row_key, 1)
            self._new_rows.add(row_key)
        self._require_update_dimensions = True
        self.cursor_coordinate = self.cursor_coordinate
        if was_empty and self.columns and self.show_cursor and self.cursor_type != "none":
            self._highlight_cursor()  # what add_row does for a table's first row
        self._update_count += len(new)
        self.check_idle()


class JobsTable(FixedTable):
    """The jobs table: enter opens the details (and says so in the footer). Says when it
    scrolled: rows that come into view get their ages brought up to date."""

    BINDINGS = [Binding("enter", "select_cursor", "Details")]

    class Scrolled(Message):
        def can_replace(self, message: Message) -> bool:
            return isinstance(message, JobsTable.Scrolled)

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if int(old_value) != int(new_value):
            self.post_message(self.Scrolled())

"""The console's two tables: their columns, the cells of a job or worker row, and the
fixed-width DataTable that patches only the cells that changed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from textual.binding import Binding
from textual.geometry import Size
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey

from relaymd.tui.render import ago, bar, styled
from relaymd.tui.source import JobRow, WorkerRow

# The order puts what an operator scans for first, so an 80-column terminal shows it all
# before the table scrolls sideways.
JOB_COLUMNS = (("id", "ID", 8), ("title", "TITLE", 16), ("status", "STATE", 9),
               ("progress", "PROGRESS", 13), ("last", "LAST CKPT", 9), ("ckpt", "CKPTS", 5),
               ("worker", "WORKER", 8), ("cluster", "CLUSTER", 8), ("age", "AGE", 6))
WORKER_COLUMNS = (("id", "ID", 8), ("status", "STATE", 12), ("where", "PROVIDER/CLUSTER", 17),
                  ("gpu", "GPU", 16), ("job", "JOB", 8), ("beat", "HEARTBEAT", 9),
                  ("left", "ALLOC LEFT", 10))


def job_cells(r: JobRow, now: float, clusters: dict[str, str]) -> tuple[Any, ...]:
    """A job row's cells in JOB_COLUMNS order, as plain values (compared to find what moved);
    `clusters` maps worker id to its cluster."""
    return (r.id[:8], r.title, r.status, (r.done, r.progress),
            ago(r.last_checkpoint_at, now), str(r.checkpoints), r.worker[:8] or "-",
            clusters.get(r.worker) or "-", ago(r.created_at, now))


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

"""Snapshots of the console (pytest-textual-snapshot): fixed clock, fixed data, fixed terminal
size, pinned theme. Regenerate with `pytest tests/test_console_snapshots.py --snapshot-update`
and review the SVGs in tests/__snapshots__/ as part of the change."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pytest
from textual.pilot import Pilot

from relaymd.tui.app import RelayApp
from relaymd.tui.views import ClustersView, UsageView

from .console_data import FixedSource, busy_clusters, busy_rows, busy_usage, clock

WIDE = (132, 36)
SIZES = pytest.mark.parametrize("size", [(80, 24), (200, 50)], ids=["80x24", "200x50"])


def app_of(source: FixedSource) -> RelayApp:
    # No tick during a snapshot; times in UTC, whatever this machine's zone.
    app = RelayApp(source, clock=clock, poll=3600, tz=UTC)
    app.theme = "textual-dark"
    return app


def busy_source() -> FixedSource:
    jobs, workers = busy_rows()
    return FixedSource(jobs, workers, busy_clusters(), busy_usage())


async def settled(pilot: Pilot[Any]) -> None:
    """Wait until the first patch of both tables has landed."""
    app = pilot.app
    assert isinstance(app, RelayApp)
    for _ in range(200):
        await pilot.pause()
        if app.updates and app.workers_seen:
            break
    await pilot.pause()


def test_empty(snap_compare: Any) -> None:
    assert snap_compare(app_of(FixedSource()), terminal_size=WIDE, run_before=settled)


def test_busy_jobs_in_every_state(snap_compare: Any) -> None:
    jobs, workers = busy_rows()
    assert snap_compare(app_of(FixedSource(jobs, workers)), terminal_size=WIDE,
                        run_before=settled)


async def open_detail(pilot: Pilot[Any]) -> None:
    await settled(pilot)
    await pilot.press("enter")
    await settled(pilot)
    for _ in range(50):
        await pilot.pause()
        if "checkpoints" in str(pilot.app.query_one("#detail").render()):
            break


def test_detail_pane_of_the_selected_job(snap_compare: Any) -> None:
    jobs, workers = busy_rows()
    assert snap_compare(app_of(FixedSource(jobs, workers)), terminal_size=WIDE,
                        run_before=open_detail)


@SIZES
def test_jobs_view_with_details_open(snap_compare: Any, size: tuple[int, int]) -> None:
    """At 80 columns the details open below the jobs table, which keeps its width."""
    assert snap_compare(app_of(busy_source()), terminal_size=size, run_before=open_detail)


def view_shown(key: str, kind: type[ClustersView | UsageView]) -> Any:
    async def run_before(pilot: Pilot[Any]) -> None:
        await settled(pilot)
        await pilot.press(key)
        view = pilot.app.query_one(kind)
        for _ in range(200):
            await pilot.pause()
            if view.loads:
                break
        await pilot.pause()
    return run_before


@SIZES
def test_clusters_view(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(app_of(busy_source()), terminal_size=size,
                        run_before=view_shown("2", ClustersView))


@SIZES
def test_usage_view(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(app_of(busy_source()), terminal_size=size,
                        run_before=view_shown("3", UsageView))


def test_submit_form(snap_compare: Any) -> None:
    jobs, workers = busy_rows()

    async def open_form(pilot: Pilot[Any]) -> None:
        await settled(pilot)
        await pilot.press("s")
        await pilot.pause()

    assert snap_compare(app_of(FixedSource(jobs, workers)), terminal_size=WIDE,
                        run_before=open_form)


def test_narrow_80x24(snap_compare: Any) -> None:
    jobs, workers = busy_rows()
    assert snap_compare(app_of(FixedSource(jobs, workers)), terminal_size=(80, 24),
                        run_before=settled)

"""Snapshots of the console (pytest-textual-snapshot): fixed clock, fixed data, fixed terminal
size, pinned theme. Regenerate with `pytest tests/test_console_snapshots.py --snapshot-update`
and review the SVGs in tests/__snapshots__/ as part of the change."""

from __future__ import annotations

from typing import Any

from textual.pilot import Pilot

from relaymd.tui.app import RelayApp

from .console_data import FixedSource, busy_rows, clock

WIDE = (132, 36)


def app_of(source: FixedSource) -> RelayApp:
    app = RelayApp(source, clock=clock, poll=3600)  # no tick during a snapshot
    app.theme = "textual-dark"
    return app


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


def test_detail_pane_of_the_selected_job(snap_compare: Any) -> None:
    jobs, workers = busy_rows()

    async def open_detail(pilot: Pilot[Any]) -> None:
        await settled(pilot)
        await pilot.press("enter")
        await settled(pilot)
        for _ in range(50):
            await pilot.pause()
            if "checkpoints" in str(pilot.app.query_one("#detail").render()):
                break

    assert snap_compare(app_of(FixedSource(jobs, workers)), terminal_size=WIDE,
                        run_before=open_detail)


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

"""The console driven by its keys (Textual's Pilot) over a real orchestrator hosted on the same
event loop, as `relaymd` hosts it: the keys must change the orchestrator's state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input

from relaymd.models import WorkerRegister
from relaymd.server.orchestrator import Orchestrator
from relaymd.tui.app import RelayApp
from relaymd.tui.screens import ConfirmScreen, SubmitScreen, complete_dir
from relaymd.tui.source import ServiceSource

from .conftest import make_settings, write_job_dir
from .console_data import FixedSource, busy_rows


@pytest.fixture
async def orch(tmp_path: Path) -> AsyncIterator[Orchestrator]:
    o = Orchestrator(make_settings(tmp_path / "home"))
    await o.start()
    yield o
    await o.stop()


async def until(pilot: Pilot[Any], predicate: Any, what: str, tries: int = 300) -> None:
    import asyncio

    for _ in range(tries):
        if predicate():
            return
        await pilot.pause()
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def jobs_in_store(orch: Orchestrator) -> list[dict[str, Any]]:
    assert orch.service is not None
    rows, _ = orch.service.store.list_jobs(None, 1000, None)
    return [dict(r) for r in rows]


async def submit_with_keys(pilot: Pilot[Any], directory: Path, title: str) -> None:
    await pilot.press("s")
    await until(pilot, lambda: isinstance(pilot.app.screen, SubmitScreen), "the submit form")
    form = pilot.app.screen
    form.query_one("#directory", Input).value = str(directory)
    form.query_one("#title", Input).focus()
    await pilot.press(*title)
    await pilot.press("enter")


async def test_submit_key_creates_a_job(orch: Orchestrator, tmp_path: Path) -> None:
    src = write_job_dir(tmp_path / "job-a")
    app = RelayApp(ServiceSource(orch), poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        await submit_with_keys(pilot, src, "alpha")
        await until(pilot, lambda: not isinstance(app.screen, SubmitScreen), "the form to close")
        jobs = await jobs_in_store(orch)
        assert [(j["title"], j["status"]) for j in jobs] == [("alpha", "queued")], jobs
        table = app.query_one("#jobs", DataTable)
        await until(pilot, lambda: table.row_count == 1, "the new job in the table")
        assert table.get_row(jobs[0]["id"])[1] == "alpha"


async def test_submit_form_shows_a_bad_directory_and_queues_nothing(
        orch: Orchestrator, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()  # no relaymd.yaml and no command: nothing can be queued
    app = RelayApp(ServiceSource(orch), poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        await submit_with_keys(pilot, bare, "nope")
        form = app.screen
        assert isinstance(form, SubmitScreen)
        error = form.query_one("#error")
        await until(pilot, lambda: "relaymd.yaml" in str(error.render()), "the form's error")
        assert isinstance(app.screen, SubmitScreen), "the form closed on an error"
        assert await jobs_in_store(orch) == []


async def test_cancel_asks_then_cancels_and_requeue_requeues(
        orch: Orchestrator, tmp_path: Path) -> None:
    src = write_job_dir(tmp_path / "job-b")
    app = RelayApp(ServiceSource(orch), poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        await submit_with_keys(pilot, src, "beta")
        table = app.query_one("#jobs", DataTable)
        await until(pilot, lambda: table.row_count == 1, "the job in the table")
        (job,) = await jobs_in_store(orch)

        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("n")  # no: nothing changes
        await pilot.pause()
        assert (await jobs_in_store(orch))[0]["status"] == "queued"

        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: table.get_row(job["id"])[2].plain == "cancelled",
                    "the table to show cancelled")
        assert (await jobs_in_store(orch))[0]["status"] == "cancelled"

        await pilot.press("r")
        await until(pilot, lambda: table.get_row(job["id"])[2].plain == "queued",
                    "the table to show queued again")
        rows = await jobs_in_store(orch)
        assert rows[0]["status"] == "queued", rows


async def test_a_worker_claiming_updates_both_tables_without_a_tick(
        orch: Orchestrator, tmp_path: Path) -> None:
    """Change events from the API reach the console: a claim moves the job to assigned and the
    worker to busy, with the periodic refresh switched off (poll=3600)."""
    import asyncio

    from relaymd.client import Client

    src = write_job_dir(tmp_path / "job-c")
    app = RelayApp(ServiceSource(orch), poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        await submit_with_keys(pilot, src, "gamma")
        jobs = app.query_one("#jobs", DataTable)
        workers = app.query_one("#workers", DataTable)
        await until(pilot, lambda: jobs.row_count == 1, "the job in the table")
        tokens = orch.settings.tokens_path.read_text()

        def register_and_claim() -> str:
            import json

            c = Client(orch.url, json.loads(tokens)["worker"])
            reg = c.register(WorkerRegister(hostname="node-7", gpus=1))  # cluster: local
            c.set_token(reg.token)
            assert c.claim() is not None
            return reg.worker_id
        worker_id = await asyncio.to_thread(register_and_claim)
        (job,) = await jobs_in_store(orch)
        await until(pilot, lambda: jobs.get_row(job["id"])[2].plain == "assigned",
                    "the job to show assigned")
        await until(pilot, lambda: workers.row_count == 1 and
                    workers.get_row(worker_id)[1].plain == "busy", "the worker to show busy")
        assert jobs.get_cell(job["id"], "cluster") == "local", \
            "the job's cluster comes from its worker"


async def test_a_change_event_reads_only_the_changed_job() -> None:
    jobs, workers = busy_rows()
    source = FixedSource(jobs, workers)
    app = RelayApp(source, poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        table = app.query_one("#jobs", DataTable)
        await until(pilot, lambda: table.row_count == len(jobs), "the first patch")
        before = source.reads
        from dataclasses import replace

        source.change(replace(jobs[2], status="running", worker="c3" * 16))
        await until(pilot, lambda: table.get_row(jobs[2].id)[2].plain == "running",
                    "the changed row")
        assert source.reads - before == 1, "a one-job change re-read more than that job"


async def test_filter_hides_and_escape_restores() -> None:
    jobs, workers = busy_rows()
    app = RelayApp(FixedSource(jobs, workers), poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        table = app.query_one("#jobs", DataTable)
        await until(pilot, lambda: table.row_count == len(jobs), "the first patch")
        await pilot.press("slash", *"failed")
        await until(pilot, lambda: table.row_count == 1, "the filter to apply")
        assert table.get_row_at(0)[1] == "hsp90-series-b"
        await pilot.press("escape")
        await until(pilot, lambda: table.row_count == len(jobs), "the filter to clear")


def test_directory_completion(tmp_path: Path) -> None:
    (tmp_path / "villin-run").mkdir()
    (tmp_path / "villin-notes.txt").write_text("")
    assert complete_dir(str(tmp_path / "vil")) == str(tmp_path / "villin-run") + "/"
    assert complete_dir(str(tmp_path / "zzz")) is None


async def test_connect_mode_reads_a_remote_orchestrator_over_the_api(
        orch: Orchestrator, tmp_path: Path) -> None:
    """`relaymd --connect URL`: the same console over HTTP (polled), cancel included."""
    from relaymd.client import Client
    from relaymd.server.auth import read_tokens_file
    from relaymd.tui.source import HttpSource

    from .conftest import submit

    token = read_tokens_file(orch.settings.tokens_path)["operator"]
    with Client(orch.url, token) as client:
        import asyncio

        job_id = await asyncio.to_thread(submit, client, tmp_path, "remote-one")
        app = RelayApp(HttpSource(client), poll=0.2)
        async with app.run_test(size=(120, 36)) as pilot:
            table = app.query_one("#jobs", DataTable)
            await until(pilot, lambda: table.row_count == 1, "the remote job in the table")
            assert table.get_row(job_id)[1] == "remote-one"
            await pilot.press("c", "y")
            await until(pilot, lambda: table.get_row(job_id)[2].plain == "cancelled",
                        "the cancel to show")
            from relaymd.tui.views import ClustersView, UsageView

            await pilot.press("2")  # no cluster configured: an empty list over the API
            await until(pilot, lambda: app.query_one(ClustersView).loads > 0, "the clusters")
            assert "no clusters" in str(app.query_one("#cluster-detail").render())
            await pilot.press("3")
            await until(pilot, lambda: app.query_one(UsageView).loads > 0, "the usage")
        assert (await jobs_in_store(orch))[0]["status"] == "cancelled"


async def test_a_long_jobs_table_scrolls_to_its_last_row() -> None:
    """10,000 rows fit no screen: the cursor can go to the last one and the table scrolls."""
    from bench.tui import rows

    jobs, workers = rows(2_000, 20)
    app = RelayApp(FixedSource(jobs, workers), poll=3600)
    async with app.run_test(size=(100, 30)) as pilot:
        table = app.query_one("#jobs", DataTable)
        await until(pilot, lambda: table.row_count == len(jobs), "the first patch")
        await pilot.pause()
        assert table.virtual_size.height >= len(jobs), table.virtual_size
        table.move_cursor(row=len(jobs) - 1)
        await until(pilot, lambda: table.scroll_y > len(jobs) - 40, "the table to scroll down")
        assert table.cursor_row == len(jobs) - 1


async def test_escape_closes_the_details_then_clears_the_filter() -> None:
    jobs, workers = busy_rows()
    app = RelayApp(FixedSource(jobs, workers), poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        table = app.query_one("#jobs", DataTable)
        await until(pilot, lambda: table.row_count == len(jobs), "the first patch")
        await pilot.press("slash", *"queued", "enter")  # the filter stays, its box closes
        await until(pilot, lambda: table.row_count == 1, "the filter to apply")
        await pilot.press("enter")
        await until(pilot, app.detail_shown, "the details to open")
        await pilot.press("escape")
        await until(pilot, lambda: not app.detail_shown(), "escape to close the details")
        assert table.row_count == 1, "escape cleared the filter along with the details"
        await pilot.press("escape")
        await until(pilot, lambda: table.row_count == len(jobs), "escape to clear the filter")


async def test_details_at_80x24_open_below_a_jobs_table_that_keeps_its_width() -> None:
    jobs, workers = busy_rows()
    app = RelayApp(FixedSource(jobs, workers), poll=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.query_one("#jobs", DataTable)
        await until(pilot, lambda: table.row_count == len(jobs), "the first patch")
        await pilot.press("enter")
        detail = app.query_one("#detail")
        await until(pilot, lambda: "checkpoints" in str(detail.render()), "the details")
        await pilot.pause()
        assert table.region.width == 80, table.region
        assert detail.region.y >= table.region.bottom and detail.region.width == 80, \
            (table.region, detail.region)
        shown = sum(c.get_render_width(table) for c in list(table.columns.values())[:4])
        assert shown <= table.region.width, "state and progress do not fit the jobs table"
        assert table.region.height >= 4, "the jobs table has no rows left"


async def test_the_view_keys_switch_views_and_each_view_keeps_its_own_keys() -> None:
    from textual.widgets import ContentSwitcher

    from relaymd.tui.views import ClustersView, UsageView

    from .console_data import busy_clusters, busy_usage

    jobs, workers = busy_rows()
    app = RelayApp(FixedSource(jobs, workers, busy_clusters(), busy_usage()), poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        switcher = app.query_one("#views", ContentSwitcher)
        await until(pilot, lambda: app.query_one("#jobs", DataTable).row_count == len(jobs),
                    "the first patch")
        await pilot.press("2")
        clusters = app.query_one(ClustersView)
        await until(pilot, lambda: clusters.loads > 0, "the clusters view to load")
        assert (app.view, switcher.current) == ("clusters", "clusters-view")
        assert app.query_one("#clusters", DataTable).row_count == 3
        assert app.focused is not None and app.focused.id == "clusters"
        assert "PENDING (Priority)" in str(app.query_one("#cluster-detail").render())
        await pilot.press("c")  # the jobs view's cancel does nothing here
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("3")
        usage = app.query_one(UsageView)
        await until(pilot, lambda: usage.loads > 0, "the usage view to load")
        assert (app.view, switcher.current) == ("usage", "usage-view")
        assert app.query_one("#usage-jobs", DataTable).row_count == 4
        assert "46.00 GPU-h" in str(app.query_one("#usage-total").render())
        await pilot.press("1")
        await until(pilot, lambda: switcher.current == "main", "the jobs view")
        await pilot.press("2", "escape")
        await until(pilot, lambda: app.view == "jobs", "escape to go back to the jobs view")


async def test_disabling_and_enabling_a_cluster_asks_first_then_calls_the_source() -> None:
    from relaymd.tui.views import ClustersView

    from .console_data import busy_clusters

    jobs, workers = busy_rows()
    source = FixedSource(jobs, workers, busy_clusters())
    app = RelayApp(source, poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        view = app.query_one(ClustersView)
        table = app.query_one("#clusters", DataTable)
        await pilot.press("2")
        await until(pilot, lambda: table.row_count == 3, "the clusters")
        await pilot.press("d")  # delta, selected, is enabled
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("n")
        await pilot.pause()
        assert source.switched == [], "answered no, yet the cluster was switched"
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: table.get_cell("delta", "on").plain == "no",
                    "the table to show delta off")
        assert source.switched == [("delta", False)]
        loads = view.loads
        await pilot.press("down", "down", "d")  # campus is off already: nothing to ask
        await until(pilot, lambda: view.selected == "campus", "campus selected")
        assert not isinstance(app.screen, ConfirmScreen) and view.loads == loads
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: table.get_cell("campus", "on").plain == "yes",
                    "the table to show campus on")
        assert source.switched == [("delta", False), ("campus", True)]


async def test_clusters_and_usage_views_over_a_hosted_orchestrator(tmp_path: Path) -> None:
    """ServiceSource: the provisioner's clusters (a placeholder's provider state shown as its
    pending allocation), the switch, and the usage report."""
    from relaymd.tui.views import ClustersView, UsageView

    o = Orchestrator(make_settings(tmp_path / "home", clusters=[
        {"name": "hpc", "provider": "local", "max_workers": 0}]))
    await o.start()
    try:
        assert o.service is not None and o.provisioner is not None
        placeholder = await o.service.add_placeholder("hpc", "slurm", "777", 2, "hpc:777")
        await o.service.set_worker_note(placeholder, "PENDING (Priority)")
        app = RelayApp(ServiceSource(o), poll=3600)
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.press("2")
            detail = app.query_one("#cluster-detail")
            await until(pilot, lambda: "PENDING (Priority)" in str(detail.render()),
                        "the pending allocation and its reason")
            assert "777" in str(detail.render())
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
            await pilot.press("y")
            await until(pilot, lambda: not o.provisioner.enabled("hpc"), "hpc disabled")
            view = app.query_one(ClustersView)
            await until(pilot, lambda: not view.infos["hpc"].enabled, "the view to show it")
            await pilot.press("3")
            usage = app.query_one(UsageView)
            await until(pilot, lambda: usage.loads > 0, "the usage view to load")
            assert "0.00 GPU-h" in str(app.query_one("#usage-total").render())
    finally:
        await o.stop()


async def test_rows_scrolled_into_view_show_current_ages() -> None:
    """Between the minute's sweeps only the rows on screen get their ages redrawn: a row that
    scrolls into view is redrawn then, not up to a minute later."""
    from bench.tui import rows

    from .console_data import NOW

    now = [NOW]
    jobs, workers = rows(300, 3)
    app = RelayApp(FixedSource(jobs, workers), clock=lambda: now[0], poll=3600)
    async with app.run_test(size=(120, 36)) as pilot:
        table = app.query_one("#jobs", DataTable)
        await until(pilot, lambda: table.row_count == len(jobs), "the first patch")
        last = jobs[-1]
        assert table.get_cell(last.id, "age") == "4h59"  # created 299 minutes before NOW
        now[0] += 3600
        table.move_cursor(row=len(jobs) - 1)
        await until(pilot, lambda: table.get_cell(last.id, "age") == "5h59",
                    "the row scrolled into view to show its age now")


def test_times_say_their_zone() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from relaymd.tui.render import stamp

    when = datetime(2026, 12, 5, 13, 3, 11, tzinfo=UTC)
    assert stamp(when, timezone(timedelta(hours=1))) == "2026-12-05 14:03:11 +01:00"
    assert stamp(when, timezone(timedelta(hours=-3, minutes=-30))) == \
        "2026-12-05 09:33:11 -03:30"
    assert stamp(when, UTC) == "2026-12-05 13:03:11 UTC"
    assert stamp(when, None)[-6] in "+-", "local time without its offset"


def test_rates_and_eta_come_from_ns_progress() -> None:
    from relaymd.tui.source import rate_of

    assert rate_of({"done": 31, "total": 50, "unit": "ns", "ns_per_day": 19}) == (19.0, 86400.0)
    assert rate_of({"done": 31, "total": 50, "unit": "steps", "ns_per_day": 19}) == (19.0, None)
    assert rate_of({"done": 31, "unit": "ns", "ns_per_day": 19}) == (19.0, None)
    assert rate_of({"done": 31, "total": 50, "unit": "ns"}) == (None, None)
    assert rate_of(None) == (None, None)

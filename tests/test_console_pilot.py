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
        assert jobs.get_row(job["id"])[7] == "local", "the job's cluster comes from its worker"


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

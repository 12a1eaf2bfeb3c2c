"""The orchestrator runtime: SQLite settings, restarts, one writer per database, port errors,
a quiet terminal, and the headless import contract."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from relaymd.config import OrchestratorSettings
from relaymd.server.orchestrator import Orchestrator, OrchestratorError
from relaymd.server.store import Store, WrongThread

from .conftest import FakeClock, RunningOrchestrator, make_settings, submit


async def test_store_is_wal_with_busy_timeout_and_versioned(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.db")
    await store.open()
    try:
        assert await store.run(store.journal_mode) == "wal"
        assert await store.run(store.busy_timeout) == 10000
        assert await store.run(store.schema_version) == ["m001_initial", "m002_clusters", "m003_trust",
                                                         "m004_compute_platform"]
        with pytest.raises(WrongThread):
            store.get_job("x")  # not on the store thread
    finally:
        await store.close()
    again = Store(tmp_path / "r.db")
    await again.open()  # migrations are idempotent
    assert await again.run(again.schema_version) == [
        "m001_initial", "m002_clusters", "m003_trust", "m004_compute_platform"]
    await again.close()


async def test_a_database_of_the_previous_release_keeps_its_workers_compute_platform(
        tmp_path: Path) -> None:
    from sqlite_utils import Database

    from relaymd.server.store import migrations
    db = Database(tmp_path / "r.db")
    migrations.apply(db, stop_before="m004_compute_platform")
    db["workers"].insert({"id": "w1", "cluster": "local", "provider": "local", "platform": "CUDA",
                          "status": "idle", "registered_at": 1.0})
    db.close()
    store = Store(tmp_path / "r.db")
    await store.open()
    try:
        workers = await store.aio.list_workers()
        assert [(w["id"], w["compute_platform"]) for w in workers] == [("w1", "CUDA")]
    finally:
        await store.close()


def test_second_orchestrator_on_same_database_is_refused(server: RunningOrchestrator) -> None:
    other = OrchestratorSettings(home=server.settings.home, host="127.0.0.1", port=0)
    with pytest.raises(OrchestratorError, match="another orchestrator is running"):
        asyncio.run(Orchestrator(other).start())
    assert server.operator().health()["status"] == "ok"  # the first one is untouched


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = OrchestratorSettings(home=tmp_path / "h", host="127.0.0.1", port=port)
        with pytest.raises(OrchestratorError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(Orchestrator(settings).start())
    # the failed start released its database lock: a new one starts fine
    ok = RunningOrchestrator(OrchestratorSettings(home=tmp_path / "h", host="127.0.0.1", port=0)).start()
    ok.stop()


def test_restart_keeps_state_and_honours_live_leases(tmp_path: Path) -> None:
    clock = FakeClock()
    settings = make_settings(tmp_path / "home")
    first = RunningOrchestrator(settings, clock).start()
    op = first.operator()
    job_id = submit(op, tmp_path)
    w, wid = first.worker()
    assert w.claim() is not None
    w.heartbeat(wid, job_id, 1)
    first.stop()

    clock.advance(40)  # the orchestrator was down for 40 s
    second = RunningOrchestrator(settings, clock).start()
    try:
        w.http.base_url = second.url
        op = second.operator()
        assert op.get_job(job_id).status == "running"
        # a live worker keeps its lease across the restart: it gets a full timeout to call back
        clock.advance(30)
        assert second.call(second.service.reap()) == 0
        assert w.heartbeat(wid, job_id, 1).directive == "continue"
        assert w.complete(job_id, 1).status == "completed"
    finally:
        second.stop()


def test_worker_silent_across_restart_is_reaped(tmp_path: Path) -> None:
    clock = FakeClock()
    settings = make_settings(tmp_path / "home")
    first = RunningOrchestrator(settings, clock).start()
    job_id = submit(first.operator(), tmp_path)
    w, _ = first.worker()
    assert w.claim() is not None
    first.stop()
    second = RunningOrchestrator(settings, clock).start()
    try:
        clock.advance(settings.heartbeat_timeout + 1)
        assert second.call(second.service.reap()) == 1
        assert second.operator().get_job(job_id).status == "queued"
    finally:
        second.stop()


def test_serve_writes_nothing_to_the_terminal_but_its_banner(tmp_path: Path) -> None:
    """uvicorn must never log to the terminal (the console shares it)."""
    import json
    import os
    import signal
    import time

    home = tmp_path / "home"
    env = {**os.environ, "RELAYMD_HOME": str(home), "RELAYMD_PORT": "0", "RELAYMD_LOCAL_WORKERS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "relaymd", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while not (home / "orchestrator.json").exists():
            assert proc.poll() is None and time.time() < deadline, "serve did not start"
            time.sleep(0.05)
        url = json.loads((home / "orchestrator.json").read_text())["url"]
        import httpx

        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/api/v1/nothing").status_code == 404  # logged to file only
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert out.strip().splitlines() == [out.strip().splitlines()[0]]
    assert out.startswith("relaymd orchestrator on http://127.0.0.1:")
    assert err == ""
    assert not (home / "orchestrator.json").exists()  # removed on clean stop
    assert "Application startup" not in out and "GET /healthz" not in out
    assert "orchestrator stopped" in (home / "relaymd.log").read_text()


def test_server_and_client_never_import_textual() -> None:
    code = ("import sys, relaymd.server.orchestrator, relaymd.client, relaymd.cli; "
            "print('textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _posix_locks(pid: int, path: Path) -> list[str]:
    inode = path.stat().st_ino
    return [line for line in Path("/proc/locks").read_text().splitlines()
            if " POSIX " in line and int(line.split()[4]) == pid
            and int(line.split()[5].rsplit(":", 1)[1]) == inode]


async def test_opening_the_store_keeps_sqlites_locks_on_its_wal_index(tmp_path: Path) -> None:
    """Making the database's files private must not open and close them: closing any descriptor
    of a file drops every POSIX lock the process holds on it, and a -shm whose lock is gone can
    be reinitialised by the next process that opens the database under a live connection (the
    chaos run saw the orchestrator die of SIGBUS)."""
    db = tmp_path / "r.db"
    # An orchestrator killed -9 leaves its -wal and -shm behind; the next one opens them.
    subprocess.run([sys.executable, "-c", "import os, sqlite3, sys; c = sqlite3.connect("  # noqa: ASYNC221
                    "sys.argv[1]); c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE "
                    "TABLE t (x)'); c.commit(); os._exit(0)", str(db)], check=True, timeout=60)
    assert (tmp_path / "r.db-shm").exists()
    store = Store(db)
    await store.open()
    try:
        await store.run(store.count_jobs_by_status)
        shm = tmp_path / "r.db-shm"
        assert _posix_locks(os.getpid(), shm), "this process holds no lock on the -shm"
        assert oct(shm.stat().st_mode & 0o777) == oct(0o600)
    finally:
        await store.close()


async def test_a_failed_write_leaves_no_transaction_open(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.db")
    await store.open()
    try:
        with pytest.raises(sqlite3.Error):  # a value SQLite cannot bind, inside the transaction
            await store.run(store.write_progress, [(["not", "an", "id"], "w", 1, {"done": 1})])
        with pytest.raises(sqlite3.Error):
            await store.run(store.write_heartbeats, [(object(), 1.0)])
        assert not await store.run(lambda: store.conn.in_transaction)
        await store.run(store.write_heartbeats, [("w1", 5.0)])  # the next write still works
    finally:
        await store.close()

"""The store's engine: one SQLite connection owned by one thread, the transaction helper and
the async facade. The queries themselves live in `jobs.py` and `workers.py`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from relaymd.fsutil import private_dir, private_path
from relaymd.server.store.changes import set_clause
from relaymd.server.store.schema import migrations

T = TypeVar("T")


class WrongThread(RuntimeError):
    pass


class RegistrationCapped(Exception):
    """A cluster already holds as many live workers as it may."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"cap of {cap} live workers reached")
        self.cap = cap



def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))



def load_json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


class AsyncStore:
    """`await store.aio.get_job(job_id)`: every Store method, awaitable, run on the store's own
    thread; callers on the event loop never hop threads by hand."""

    def __init__(self, store: StoreCore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._store.run(method, *args, **kwargs)

        call.__name__ = name
        return call



class StoreCore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relaymd-db")
        self._thread: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None  # the event loop's own, for hot reads
        self.db: Database | None = None
        self.aio = AsyncStore(self)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def open(self) -> None:
        await self.run(self._open)
        # A read-only connection on the event loop's thread: in WAL mode a reader never waits
        # for the writer, and a primary-key lookup costs less than a hop to the store thread.
        reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                 timeout=1.0, check_same_thread=False)
        reader.row_factory = sqlite3.Row
        reader.execute("PRAGMA query_only = ON")
        self._reader = reader

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._conn is not None:
            await self.run(self._close)
        self._pool.shutdown(wait=True)

    def _open(self) -> None:
        private_dir(self.path.parent, fix_existing=False)
        # 0600 whatever the umask. Never by opening the files: closing any descriptor of a file
        # drops every POSIX lock this process holds on it, SQLite's included, and a database
        # whose -shm lost its locks can be reinitialised by another process under a live
        # connection (SIGBUS, found by bench/chaos.py). A missing file is created 0600 before
        # SQLite opens it (nobody can hold a lock on a file that did not exist); existing files
        # are chmod-ed by path, which touches no lock.
        private_path(self.path)
        self._thread = threading.get_ident()
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        conn.row_factory = sqlite3.Row
        db = Database(conn)
        db.enable_wal()
        for suffix in ("-wal", "-shm"):  # SQLite creates these with the database's mode
            private_path(self.path.with_name(self.path.name + suffix), create=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        # NORMAL in WAL mode: a commit survives a process crash (kill -9); only an OS crash or
        # power loss can lose the last transactions, never corrupt the file.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrations.apply(db)
        self._conn, self.db = conn, db

    def _close(self) -> None:
        assert self._conn is not None
        self._conn.close()
        self._conn = self.db = None

    @property
    def conn(self) -> sqlite3.Connection:
        if threading.get_ident() != self._thread or self._conn is None:
            raise WrongThread("store methods run only on the store thread: use `await store.aio.X(...)`")
        return self._conn

    @property
    def reader(self) -> sqlite3.Connection:
        """The read-only connection, used on the event loop's thread (or inside `run`)."""
        if self._reader is None:
            raise WrongThread("store is not open")
        return self._reader

    def journal_mode(self) -> str:
        return str(self.conn.execute("PRAGMA journal_mode").fetchone()[0])

    def busy_timeout(self) -> int:
        return int(self.conn.execute("PRAGMA busy_timeout").fetchone()[0])

    def schema_version(self) -> list[str]:
        assert self.db is not None
        return [m.name for m in migrations.applied(self.db)]

    # ------------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE, then COMMIT when the block ends (a `return`
        inside it included: a block that wrote nothing commits nothing), ROLLBACK when it
        raises, so no error can leave a transaction open for the next BEGIN to trip on.
        IMMEDIATE takes the write lock up front: a deferred transaction that reads then writes
        can fail with SQLITE_BUSY_SNAPSHOT despite busy_timeout."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if conn.in_transaction:
            conn.execute("COMMIT")

    def _insert(self, table: str, row: dict[str, Any]) -> int:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cur = self.conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(row.values()))
        return int(cur.lastrowid or 0)

    def _event(self, event: dict[str, Any]) -> None:
        if event:
            self._insert("events", {"reason": "", **event})

    def _update(self, table: str, key: str, fields: dict[str, Any]) -> None:
        sets, params = self._set_clause(fields)
        self.conn.execute(f"UPDATE {table} SET {sets} WHERE id = ?", [*params, key])

    @staticmethod
    def _set_clause(fields: dict[str, Any]) -> tuple[str, list[Any]]:
        return set_clause(fields)

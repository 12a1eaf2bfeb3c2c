"""The SQLite store: schema, migrations and every SQL statement the orchestrator runs.

One connection, owned by one thread (a single-thread executor): all reads and writes are
serialised there, so concurrent API requests never meet "database is locked", and a state change
is one conditional UPDATE inside a `BEGIN IMMEDIATE` transaction together with its event row.
Callers on the event loop use `await store.aio.method(...)`; the methods themselves are
synchronous and refuse to run on any other thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database, Migrations

from relaymd.fsutil import private_dir, private_path
from relaymd.models import LEASED_JOB_STATES, LIVE_WORKER_STATES, JobStatus, WorkerStatus
from relaymd.server.scheduling import Candidate, Rival, choose

log = logging.getLogger(__name__)
T = TypeVar("T")

migrations = Migrations("relaymd")
# The state sets the queries below read by; the statuses themselves are the models'.
LEASED = sorted(s.value for s in LEASED_JOB_STATES)
LIVE_WORKERS = sorted(s.value for s in LIVE_WORKER_STATES)


@migrations()
def m001_initial(db: Database) -> None:
    db.table("jobs").create(
        {
            "id": str, "title": str, "status": str, "command": str, "spec": str,
            "gpus": int, "priority": int, "max_attempts": int, "attempt": int, "failures": int,
            "worker_id": str, "bundle_sha256": str, "bundle_size": int,
            "latest_checkpoint": int, "checkpoints": int, "next_seq": int,
            "progress": str, "last_failure": str,
            "created_at": float, "updated_at": float, "started_at": float,
            "finished_at": float, "last_checkpoint_at": float,
        },
        pk="id",
        not_null={"status", "command", "spec", "attempt", "failures", "created_at"},
        defaults={"attempt": 0, "failures": 0, "checkpoints": 0, "next_seq": 1, "priority": 0},
    )
    db.table("jobs").create_index(["status", "priority", "created_at"])
    db.table("workers").create(
        {
            "id": str, "name": str, "hostname": str, "cluster": str, "provider": str,
            "provider_id": str, "platform": str, "gpus": int, "gpu_model": str, "vram_gb": float,
            "status": str, "job_id": str, "token_hash": str, "consecutive_failures": int,
            "registered_at": float, "last_heartbeat_at": float, "wall_time_end": float,
        },
        pk="id",
        not_null={"status", "registered_at"},
        defaults={"consecutive_failures": 0},
    )
    db.table("workers").create_index(["status"])
    db.table("workers").create_index(["token_hash"], unique=True)
    db.table("workers").create_index(["cluster", "provider_id"])
    db.table("checkpoints").create(
        {
            "job_id": str, "seq": int, "key": str, "sha256": str, "size": int,
            "attempt": int, "worker_id": str, "created_at": float, "progress": str,
        },
        pk=("job_id", "seq"),
    )
    db.table("events").create(
        {
            "id": int, "job_id": str, "worker_id": str, "kind": str, "from_status": str,
            "to_status": str, "attempt": int, "seq": int, "reason": str, "at": float,
        },
        pk="id",
        not_null={"kind", "at"},
    )
    db.table("events").create_index(["job_id", "id"])


@migrations()
def m002_clusters(db: Database) -> None:
    # preferred_clusters: JSON list of cluster names the job may run on (NULL: any).
    # blocked_reason: why a queued job cannot run anywhere now (set by the provisioning loop).
    db.table("jobs").add_column("preferred_clusters", str)
    db.table("jobs").add_column("blocked_reason", str)
    db.table("workers").add_column("note", str)  # placeholders: the provider's word on them
    db.table("clusters").create({"name": str, "enabled": int, "updated_at": float}, pk="name")


@migrations()
def m003_trust(db: Database) -> None:
    # trusted_only: the job may run only on workers of trusted clusters (never on Salad).
    # checkpoints.untrusted: written by a worker of an untrusted cluster (NULL/0: trusted).
    db.table("jobs").add_column("trusted_only", int, not_null_default=0)
    db.table("checkpoints").add_column("untrusted", int, not_null_default=0)


@migrations()
def m004_compute_platform(db: Database) -> None:
    # `platform` meant the provider in some places and CUDA/CPU in others; the column holds the
    # latter, and says so now.
    db.execute("ALTER TABLE workers RENAME COLUMN platform TO compute_platform")


class WrongThread(RuntimeError):
    pass


class RegistrationCapped(Exception):
    """A cluster already holds as many live workers as it may."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"cap of {cap} live workers reached")
        self.cap = cap


@dataclass
class Expr:
    """A SET value that is SQL, not a parameter (e.g. `checkpoints + 1`)."""

    sql: str


@dataclass(frozen=True)
class ClaimMove:
    """The claim's transition, as the state machine's tables say it: the job from `job_from`
    to `job_to`, its worker from one of `worker_from` to `worker_to`."""

    job_from: str
    job_to: str
    worker_from: tuple[str, ...]
    worker_to: str


@dataclass(frozen=True)
class WorkerUpdate:
    """The worker row a job change also writes: `fields` of `worker_id`, and when `holding` is
    set, only while that worker still holds that job."""

    worker_id: str
    fields: dict[str, Any]
    holding: str | None = None


@dataclass
class JobChange:
    """One conditional UPDATE of a job row plus what goes with it in the same transaction."""

    job_id: str
    from_states: Iterable[str]
    to_status: str | Expr
    set_fields: dict[str, Any] = field(default_factory=dict)
    attempt: int | None = None  # fence: only if the job's attempt is exactly this
    worker_id: str | None = None  # fence: only if the job is held by this worker
    extra_where: tuple[str, Sequence[Any]] | None = None
    worker_update: WorkerUpdate | None = None  # its worker's row, in the same transaction
    inserts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    event: dict[str, Any] = field(default_factory=dict)


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


class AsyncStore:
    """`await store.aio.get_job(job_id)`: every Store method, awaitable, run on the store's own
    thread; callers on the event loop never hop threads by hand."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._store.run(method, *args, **kwargs)

        call.__name__ = name
        return call


class Store:
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
        parts, params = [], []
        for name, value in fields.items():
            if isinstance(value, Expr):
                parts.append(f"{name} = {value.sql}")
            else:
                parts.append(f"{name} = ?")
                params.append(value)
        return ", ".join(parts), params

    # ------------------------------------------------------------------ jobs

    def insert_job(self, row: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
        with self._transaction():
            self._insert("jobs", row)
            self._event(event)
        job = self.get_job(row["id"])
        assert job is not None
        return job

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", [job_id]).fetchone()
        return dict(row) if row else None

    def job_ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.conn.execute(
            "SELECT id FROM jobs WHERE id LIKE ? ESCAPE '\\' ORDER BY id LIMIT ?",
            [escaped + "%", limit],
        ).fetchall()
        return [r[0] for r in rows]

    def list_jobs(
        self, statuses: Sequence[str] | None, limit: int, after: int | None
    ) -> tuple[list[sqlite3.Row], int | None]:
        """A page of job rows in creation order (with `_rowid`), and the cursor of the next.
        On the read-only connection: a monitor listing thousands of jobs every second must not
        queue behind the writer nor hop threads."""
        where, params = [], []
        if statuses:
            where.append(f"status IN ({', '.join('?' for _ in statuses)})")
            params.extend(statuses)
        if after is not None:
            where.append("rowid > ?")
            params.append(after)
        sql = "SELECT rowid AS _rowid, * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY rowid LIMIT ?"
        rows = self.reader.execute(sql, [*params, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1]["_rowid"] if more and rows else None)

    def jobs_by_ids(self, job_ids: Sequence[str]) -> list[sqlite3.Row]:
        """These jobs' rows (absent ids are skipped), on the read-only connection: the console
        patches the rows a change touched instead of re-reading the whole table."""
        out: list[sqlite3.Row] = []
        ids = list(job_ids)
        for i in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[i:i + 500]
            out.extend(self.reader.execute(
                f"SELECT rowid AS _rowid, * FROM jobs WHERE id IN ({', '.join('?' * len(chunk))})"
                " ORDER BY rowid", chunk).fetchall())
        return out

    def count_jobs_by_status(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {r[0]: r[1] for r in rows}

    def change_job(self, change: JobChange) -> tuple[bool, dict[str, Any] | None]:
        """Apply one conditional job UPDATE (+ worker update, inserts, event) atomically.

        Returns (True, new row) when the job matched every condition, else (False, current row
        or None if the job does not exist) and nothing was written.
        """
        states = list(change.from_states)
        sets, params = self._set_clause(
            {"status": change.to_status, **change.set_fields}
        )
        where = ["id = ?", f"status IN ({', '.join('?' for _ in states)})"]
        wparams: list[Any] = [change.job_id, *states]
        if change.attempt is not None:
            where.append("attempt = ?")
            wparams.append(change.attempt)
        if change.worker_id is not None:
            where.append("worker_id = ?")
            wparams.append(change.worker_id)
        if change.extra_where is not None:
            where.append(f"({change.extra_where[0]})")
            wparams.extend(change.extra_where[1])
        with self._transaction():
            prior = self.conn.execute(
                "SELECT status FROM jobs WHERE id = ?", [change.job_id]
            ).fetchone()
            row = self.conn.execute(
                f"UPDATE jobs SET {sets} WHERE {' AND '.join(where)} RETURNING *",
                [*params, *wparams],
            ).fetchone()
            if row is None:
                return False, self.get_job(change.job_id)
            if change.worker_update is not None:
                update = change.worker_update
                wsets, wp = self._set_clause(update.fields)
                sql = f"UPDATE workers SET {wsets} WHERE id = ?"
                wp.append(update.worker_id)
                if update.holding is not None:
                    sql += " AND job_id = ?"
                    wp.append(update.holding)
                self.conn.execute(sql, wp)
            for table, values in change.inserts:
                self._insert(table, values)
            if change.event:
                self._event({
                    "job_id": change.job_id, "from_status": prior[0], "to_status": row["status"],
                    **change.event,
                })
        return True, dict(row)

    def claim_next(
        self, worker_id: str, gpus: int, move: ClaimMove, set_fields: dict[str, Any], now: float,
        event: dict[str, Any], worker_fields: dict[str, Any],
        cluster: str = "", better: Sequence[Rival] = (), trusted: bool = True,
    ) -> dict[str, Any] | None:
        """Assign the best queued job this worker can run, in one conditional write.

        A job with `preferred_clusters` is only for workers of those clusters, a `trusted_only`
        one only for workers of trusted clusters (`trusted`); a job is never
        given back to a worker it failed on (a full disk or a bad GPU must not use up a job's
        whole failure budget on one node). `better` lists
        the idle workers that rank above this one: `scheduling.choose` sets aside for each the
        first queued job it could run, and this worker takes the first job nobody better is
        set aside for (none left: no claim). All writes are serialised on this thread, so the
        chosen job is still queued when the UPDATE runs.
        """
        sets, params = self._set_clause({"status": move.job_to, **set_fields})
        with self._transaction():
            worker = self.conn.execute(
                "SELECT status FROM workers WHERE id = ?", [worker_id]
            ).fetchone()
            if worker is None or worker[0] not in move.worker_from:
                return None
            candidates = self.conn.execute(
                """SELECT id, gpus, preferred_clusters, trusted_only FROM jobs
                   WHERE status = ? AND gpus <= ? AND (trusted_only = 0 OR ?)
                     AND (preferred_clusters IS NULL OR EXISTS (
                          SELECT 1 FROM json_each(jobs.preferred_clusters) WHERE value = ?))
                     AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = jobs.id
                                     AND e.kind = 'fail' AND e.worker_id = ?)
                   ORDER BY priority DESC, created_at, rowid LIMIT ?""",
                [move.job_from, gpus, int(trusted), cluster, worker_id, len(better) + 1],
            ).fetchall()
            chosen = choose([Candidate(
                id=c["id"], gpus=c["gpus"], trusted_only=bool(c["trusted_only"]),
                clusters=None if c["preferred_clusters"] is None
                else tuple(load_json(c["preferred_clusters"]))) for c in candidates], better)
            if chosen is None:
                return None
            row = self.conn.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND status = ? RETURNING *",
                [*params, chosen, move.job_from],
            ).fetchone()
            job = dict(row)
            self._update("workers", worker_id, {**worker_fields, "status": move.worker_to,
                                                "job_id": job["id"]})
            self._event({**event, "job_id": job["id"], "attempt": job["attempt"], "at": now})
            return job

    def reserve_checkpoint_seq(self, job_id: str, worker_id: str, attempt: int,
                               live_states: Sequence[str]) -> int | None:
        marks = ", ".join("?" for _ in live_states)
        row = self.conn.execute(
            f"""UPDATE jobs SET next_seq = next_seq + 1
                WHERE id = ? AND worker_id = ? AND attempt = ? AND status IN ({marks})
                RETURNING next_seq - 1""",
            [job_id, worker_id, attempt, *live_states],
        ).fetchone()
        return None if row is None else int(row[0])

    def worker_held(self, job_id: str, worker_id: str) -> bool:
        """Did this worker ever claim this job? (Tells a stale lease from a foreign job.)
        On the event loop's read-only connection, like `heartbeat_view`: the current holder
        answers from the job row; anyone else from the job's claim events."""
        conn = self.reader
        row = conn.execute("SELECT worker_id FROM jobs WHERE id = ?", [job_id]).fetchone()
        if row is None:
            return False
        if row[0] == worker_id:
            return True
        return conn.execute(
            "SELECT 1 FROM events WHERE job_id = ? AND worker_id = ? AND kind = 'claim' LIMIT 1",
            [job_id, worker_id],
        ).fetchone() is not None

    def orphaned_jobs(self) -> list[dict[str, Any]]:
        """Leased jobs whose worker no longer holds them (crash between two writes, lost rows)."""
        rows = self.conn.execute(
            """SELECT j.id, j.worker_id, j.attempt FROM jobs j
               LEFT JOIN workers w ON w.id = j.worker_id
               WHERE j.status IN (?, ?)
                 AND (w.id IS NULL OR w.status != ? OR w.job_id IS NOT j.id)""",
            [*LEASED, WorkerStatus.busy.value]).fetchall()
        return [dict(r) for r in rows]

    def list_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM checkpoints WHERE job_id = ? ORDER BY seq", [job_id]
        ).fetchall()
        return [dict(r) for r in rows]

    def prune_checkpoints(self, job_id: str, keep: int) -> int | None:
        """Forget all but the newest `keep` accepted checkpoints of a job; returns the oldest seq
        kept (everything below it may go from storage), or None when there is nothing to prune."""
        with self._transaction():
            row = self.conn.execute(
                "SELECT seq FROM checkpoints WHERE job_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                [job_id, keep - 1]).fetchone()
            if row is None:
                return None
            self.conn.execute("DELETE FROM checkpoints WHERE job_id = ? AND seq < ?",
                              [job_id, row[0]])
        return int(row[0])

    def purge_job(self, job_id: str, statuses: Sequence[str]) -> bool:
        """Delete a job with its checkpoints and events, only if it is in one of `statuses`."""
        with self._transaction():
            gone = self.conn.execute(
                f"DELETE FROM jobs WHERE id = ? AND status IN ({', '.join('?' for _ in statuses)})",
                [job_id, *statuses]).rowcount
            if gone:
                self.conn.execute("DELETE FROM checkpoints WHERE job_id = ?", [job_id])
                self.conn.execute("DELETE FROM events WHERE job_id = ?", [job_id])
        return bool(gone)

    def reject_checkpoint(self, job_id: str, worker_id: str, attempt: int, seq: int,
                          event: dict[str, Any]) -> dict[str, Any] | None:
        """Forget an accepted checkpoint found corrupt, by the job's current lease holder: the
        pointer falls back to the newest one left. None (nothing written) when the lease does
        not hold; the job row, unchanged, when the checkpoint is not (or no longer) accepted."""
        with self._transaction():
            job = self.conn.execute(
                "SELECT * FROM jobs WHERE id = ? AND worker_id = ? AND attempt = ? "
                "AND status IN (?, ?)", [job_id, worker_id, attempt, *LEASED]).fetchone()
            if job is None:
                return None
            gone = self.conn.execute("DELETE FROM checkpoints WHERE job_id = ? AND seq = ?",
                                     [job_id, seq]).rowcount
            if not gone:
                return dict(job)
            row = self.conn.execute(
                """UPDATE jobs SET latest_checkpoint = (SELECT MAX(seq) FROM checkpoints
                                                      WHERE job_id = jobs.id),
                                   checkpoints = checkpoints - 1, updated_at = ?
                   WHERE id = ? RETURNING *""", [event["at"], job_id]).fetchone()
            self._event({**event, "job_id": job_id, "from_status": job["status"],
                         "to_status": job["status"], "seq": seq})
        return dict(row)

    def get_checkpoint(self, job_id: str, seq: int) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT * FROM checkpoints WHERE job_id = ? AND seq = ?", [job_id, seq]
        ).fetchone()
        return dict(row) if row else None

    def list_events(self, job_id: str, limit: int = 500) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM (SELECT * FROM events WHERE job_id = ? ORDER BY id DESC LIMIT ?) "
            "ORDER BY id",
            [job_id, limit],
        ).fetchall()
        return [dict(r) for r in rows]

    def write_progress(self, items: Iterable[tuple[str, str, int, dict[str, Any]]]) -> None:
        """Flush buffered heartbeat progress: (job_id, worker_id, attempt, progress)."""
        rows = [(dumps(p), j, w, a, *LEASED) for j, w, a, p in items]
        if not rows:
            return
        with self._transaction():
            self.conn.executemany(
                "UPDATE jobs SET progress = ? WHERE id = ? AND worker_id = ? AND attempt = ? "
                "AND status IN (?, ?)",
                rows,
            )

    # ------------------------------------------------------------------ workers

    def insert_worker(self, row: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
        with self._transaction():
            self._insert("workers", row)
            self._event(event)
        worker = self.get_worker(row["id"])
        assert worker is not None
        return worker

    def register_worker(self, row: dict[str, Any], event: dict[str, Any], cap: int | None = None,
                        placeholder_status: str = WorkerStatus.provisioning.value
                        ) -> dict[str, Any]:
        """Insert a registering worker, or turn its placeholder (same cluster and provider id,
        still provisioning) into it: one transaction, so the provisioning loop never sees the
        pending request and the worker both, nor neither. With `cap`, a cluster already holding
        that many live (idle or busy) workers gets RegistrationCapped and nothing is written."""
        with self._transaction():
            if cap is not None:
                live = self.conn.execute(
                    "SELECT COUNT(*) FROM workers WHERE cluster = ? AND status IN (?, ?)",
                    [row["cluster"], *LIVE_WORKERS]).fetchone()[0]
                if live >= cap:
                    raise RegistrationCapped(cap)
            placeholder = None
            if row.get("provider_id"):
                placeholder = self.conn.execute(
                    "SELECT id, provider FROM workers WHERE cluster = ? AND provider_id = ? "
                    "AND status = ? ORDER BY registered_at LIMIT 1",
                    [row["cluster"], row["provider_id"], placeholder_status]).fetchone()
            if placeholder is None:
                self._insert("workers", row)
                worker_id = row["id"]
            else:
                worker_id = placeholder["id"]
                fields = {k: v for k, v in row.items() if k != "id"}
                fields["provider"] = placeholder["provider"] or row["provider"]
                if not fields.get("name"):
                    fields.pop("name", None)  # keep the placeholder's "cluster:id" name
                fields["note"] = None
                self._update("workers", worker_id, fields)
                event = {**event, "kind": "worker_activate", "from_status": placeholder_status,
                         "reason": f"{event.get('reason', '')} (was placeholder)".strip()}
            self._event({**event, "worker_id": worker_id})
        worker = self.get_worker(worker_id)
        assert worker is not None
        return worker

    def idle_rivals(self, worker_id: str, gpus: int, vram_gb: float,
                    cluster: str) -> list[sqlite3.Row]:
        """Idle workers that might rank above this one (more GPUs; or as many and another
        cluster or more VRAM), on the read-only connection: every claim asks, and in a fleet
        of identical workers the answer is empty without reading them all into Python."""
        return self.reader.execute(
            "SELECT id, gpus, vram_gb, cluster, provider, registered_at FROM workers "
            "WHERE status = ? AND id != ? AND (gpus > ? OR (gpus = ? AND "
            "(IFNULL(cluster, '') != ? OR IFNULL(vram_gb, 0) > ?)))",
            [WorkerStatus.idle.value, worker_id, gpus, gpus, cluster, vram_gb]).fetchall()

    def cluster_workers(self) -> list[dict[str, Any]]:
        """Every worker not gone, with its cluster: the provisioning loop's view."""
        rows = self.conn.execute(
            "SELECT id, name, cluster, provider, provider_id, status, job_id, gpus, vram_gb, "
            "registered_at, last_heartbeat_at, note FROM workers WHERE status != ?",
            [WorkerStatus.gone.value]).fetchall()
        return [dict(r) for r in rows]

    def set_worker_note(self, worker_id: str, note: str | None) -> None:
        self.conn.execute("UPDATE workers SET note = ? WHERE id = ? AND note IS NOT ?",
                          [note, worker_id, note])

    def queued_jobs(self, limit: int = 10000) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT id, gpus, preferred_clusters, blocked_reason, trusted_only FROM jobs "
            "WHERE status = ? ORDER BY priority DESC, created_at, rowid LIMIT ?",
            [JobStatus.queued.value, limit]).fetchall()
        return [dict(r) for r in rows]

    def set_blocked_reasons(self, reasons: dict[str, str | None]) -> list[str]:
        """Write each queued job's blocked reason where it changed; returns the ids changed."""
        changed = []
        with self._transaction():
            for job_id, reason in reasons.items():
                cur = self.conn.execute(
                    "UPDATE jobs SET blocked_reason = ? WHERE id = ? AND blocked_reason IS NOT ?",
                    [reason, job_id, reason])
                if cur.rowcount:
                    changed.append(job_id)
        return changed

    def cluster_switches(self) -> dict[str, bool]:
        """Clusters enabled or disabled at run time (`relaymd clusters enable|disable`)."""
        rows = self.conn.execute("SELECT name, enabled FROM clusters").fetchall()
        return {r[0]: bool(r[1]) for r in rows}

    def set_cluster_enabled(self, name: str, enabled: bool, now: float) -> None:
        self.conn.execute(
            "INSERT INTO clusters (name, enabled, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET enabled = excluded.enabled, "
            "updated_at = excluded.updated_at", [name, int(enabled), now])

    def get_worker(self, worker_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM workers WHERE id = ?", [worker_id]).fetchone()
        return dict(row) if row else None

    def heartbeat_view(self, worker_id: str, job_id: str | None
                       ) -> tuple[str | None, dict[str, Any] | None]:
        """The hot path's one read: the worker's status and the lease fields of its job.
        Runs on the event loop's thread over the read-only connection (no store-thread hop);
        it sees every transaction the writer has committed, so every change already awaited."""
        conn = self.reader
        row = conn.execute("SELECT status FROM workers WHERE id = ?", [worker_id]).fetchone()
        job = None
        if job_id is not None:
            found = conn.execute(
                "SELECT status, attempt, worker_id FROM jobs WHERE id = ?", [job_id]
            ).fetchone()
            if found:
                job = {"status": found[0], "attempt": found[1], "worker_id": found[2]}
        return (row[0] if row else None), job

    def list_workers(self, statuses: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if statuses:
            marks = ", ".join("?" for _ in statuses)
            rows = self.conn.execute(
                f"SELECT * FROM workers WHERE status IN ({marks}) ORDER BY registered_at",
                list(statuses),
            ).fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM workers ORDER BY registered_at").fetchall()
        return [dict(r) for r in rows]

    def count_workers_by_status(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT status, COUNT(*) FROM workers GROUP BY status").fetchall()
        return {r[0]: r[1] for r in rows}

    def worker_tokens(self) -> dict[str, str]:
        """token_hash -> worker id, for every worker whose session token is still valid."""
        rows = self.conn.execute(
            "SELECT token_hash, id FROM workers WHERE token_hash IS NOT NULL "
            "AND status NOT IN (?, ?)", [WorkerStatus.gone.value, WorkerStatus.quarantined.value]
        ).fetchall()
        return {r[0]: r[1] for r in rows}

    def change_worker(
        self, worker_id: str, from_states: Iterable[str], fields: dict[str, Any],
        event: dict[str, Any],
    ) -> dict[str, Any] | None:
        states = list(from_states)
        sets, params = self._set_clause(fields)
        marks = ", ".join("?" for _ in states)
        with self._transaction():
            row = self.conn.execute(
                f"UPDATE workers SET {sets} WHERE id = ? AND status IN ({marks}) RETURNING *",
                [*params, worker_id, *states],
            ).fetchone()
            if row is None:
                return None
            self._event(event)
        return dict(row)

    def write_heartbeats(self, items: Iterable[tuple[str, float]]) -> None:
        rows = [(t, w) for w, t in items]
        if not rows:
            return
        with self._transaction():
            self.conn.executemany(
                "UPDATE workers SET last_heartbeat_at = ? WHERE id = ? "
                "AND (last_heartbeat_at IS NULL OR last_heartbeat_at < ?)",
                [(t, w, t) for t, w in rows],
            )


def load_json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


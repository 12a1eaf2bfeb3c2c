"""Every SQL statement about jobs, their checkpoints and events."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from relaymd.models import LEASED_JOB_STATES, WorkerStatus
from relaymd.server.scheduling import Candidate, Rival, choose
from relaymd.server.store.changes import ClaimMove, JobChange
from relaymd.server.store.core import StoreCore, dumps, load_json

# The state set the queries below read by; the statuses themselves are the models'.
LEASED = sorted(s.value for s in LEASED_JOB_STATES)


class JobQueries(StoreCore):
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
        if change.checkpoint_seq is not None:
            where.append("? < next_seq AND (latest_checkpoint IS NULL OR latest_checkpoint < ?)")
            wparams.extend([change.checkpoint_seq, change.checkpoint_seq])
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

    def usage_jobs(self) -> list[dict[str, Any]]:
        """Every job ever claimed, with what tells whether its history changed (accounting)."""
        rows = self.conn.execute(
            "SELECT id, title, status, gpus, attempt, failures, checkpoints, latest_checkpoint, "
            "updated_at, progress FROM jobs WHERE attempt > 0 ORDER BY rowid").fetchall()
        return [dict(r) for r in rows]

    def usage_events(self, job_ids: Sequence[str], kinds: Sequence[str]) -> list[dict[str, Any]]:
        """These jobs' events of these kinds, oldest first (every one: no limit)."""
        out: list[dict[str, Any]] = []
        ids = list(job_ids)
        marks = ", ".join("?" for _ in kinds)
        for i in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[i:i + 500]
            out.extend(dict(r) for r in self.conn.execute(
                f"SELECT job_id, kind, attempt, worker_id, seq, at FROM events "
                f"WHERE job_id IN ({', '.join('?' * len(chunk))}) AND kind IN ({marks}) "
                "ORDER BY id", [*chunk, *kinds]).fetchall())
        return out

    def attempt_checkpoints(self, job_id: str, attempt: int) -> list[dict[str, Any]]:
        """When each checkpoint of one attempt was accepted, and its progress."""
        rows = self.conn.execute(
            "SELECT created_at, progress FROM checkpoints WHERE job_id = ? AND attempt = ? "
            "ORDER BY seq", [job_id, attempt]).fetchall()
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

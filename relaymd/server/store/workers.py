"""Every SQL statement about workers and clusters."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from relaymd.models import LIVE_WORKER_STATES, JobStatus, WorkerStatus
from relaymd.server.store.core import RegistrationCapped, StoreCore

LIVE_WORKERS = sorted(s.value for s in LIVE_WORKER_STATES)


class WorkerQueries(StoreCore):
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

    def workers_gpus(self, worker_ids: Sequence[str]) -> list[dict[str, Any]]:
        """These workers' GPUs and cluster (accounting: who ran an attempt)."""
        out: list[dict[str, Any]] = []
        ids = list(worker_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            out.extend(dict(r) for r in self.conn.execute(
                f"SELECT id, gpus, cluster FROM workers WHERE id IN ({', '.join('?' * len(chunk))})",
                chunk).fetchall())
        return out

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

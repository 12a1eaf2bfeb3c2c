"""The database schema: sqlite-utils migrations, applied in order at every open (each once)."""

from __future__ import annotations

from sqlite_utils import Database, Migrations

migrations = Migrations("relaymd")


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

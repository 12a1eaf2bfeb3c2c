"""The wire contract: pydantic types shared by the orchestrator, the worker and the CLI.

Every HTTP request and response body is one of these models. Field names are the JSON keys and
are part of the stable `--json` output documented in the README.

Over 400 lines because it is the whole contract in one place: a change to the protocol or to the
`--json` output is one diff in one file, and the state sets beside the statuses are what the rest
of the package reads instead of spelling a status.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator

JOB_ID_LENGTH = 32  # uuid4().hex
# Variables a job's `env:` may not set: the worker's own settings and secrets live there.
RESERVED_ENV_PREFIXES = ("RELAYMD_", "AWS_", "INFISICAL_", "TAILSCALE_")
MIN_ENV_SECRET_LENGTH = 8  # shorter environment values ("1", "true") are never redacted


class JobStatus(StrEnum):
    queued = "queued"
    assigned = "assigned"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


LIVE_JOB_STATES = frozenset({JobStatus.queued, JobStatus.assigned, JobStatus.running})
LEASED_JOB_STATES = frozenset({JobStatus.assigned, JobStatus.running})
TERMINAL_JOB_STATES = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.cancelled})


class WorkerStatus(StrEnum):
    provisioning = "provisioning"  # placeholder for an sbatch/Salad request not yet registered
    idle = "idle"
    busy = "busy"
    stale = "stale"  # heartbeats stopped; its job went back to the queue
    quarantined = "quarantined"  # failed too many jobs in a row; told to exit
    gone = "gone"


LIVE_WORKER_STATES = frozenset({WorkerStatus.idle, WorkerStatus.busy})  # registered, heartbeating


class Strict(BaseModel):
    """Request bodies: unknown fields are refused so typos are loud, not silently ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


MAX_COUNTER = 1 << 53  # attempts, sequence numbers, sizes: far beyond use, inside SQLite's int64


def to_datetime(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


# C0 controls but tab and newline, DEL, and C1 controls (0x9b is a one-character CSI).
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    """`text` without terminal control characters: a worker's text is printed on the operator's
    terminal (`relaymd job`, the console), where ESC sequences could clear the screen, fake
    output or set the clipboard (OSC 52). The escape sequences' printable rest stays visible."""
    return _CONTROLS.sub("", text)


# Text a worker sends that an operator's terminal shows: stripped before it is stored.
CleanText = Annotated[str, AfterValidator(strip_controls)]


# --------------------------------------------------------------------------- bundle spec


class CheckpointSpec(Strict):
    paths: list[str] = Field(default_factory=lambda: ["*.chk", "*.xml"], min_length=1)
    sentinel: str | None = None
    poll_seconds: float = Field(default=60.0, gt=0)
    # The two looks that must agree before a set is packed are this far apart.
    settle_seconds: float = Field(default=0.5, gt=0, le=60)

    @field_validator("paths")
    @classmethod
    def _relative_globs(cls, paths: list[str]) -> list[str]:
        return relative_globs("checkpoint path", paths)


def relative_globs(what: str, paths: list[str]) -> list[str]:
    for p in paths:
        if not p or p.startswith("/") or ".." in p.split("/"):
            raise ValueError(f"{what} {p!r} must be a relative glob inside the job dir")
    return paths


class ResourceSpec(Strict):
    gpus: int = Field(default=1, ge=0, le=64)
    min_vram_gb: float = Field(default=0, ge=0)


class BundleSpec(Strict):
    """`relaymd.yaml` at the root of a job bundle; the worker reads the same schema."""

    command: str = Field(min_length=1)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    # Result files (globs) streamed to storage as they grow, never restored on resume: each
    # attempt's engine appends to fresh ones; `relaymd results` stitches them.
    outputs: list[str] = Field(default_factory=list, max_length=100)
    # A file with the JSON Progress object, or a bare fraction 0..1 (AToM-OpenMM's `progress`).
    progress: str | None = None
    # The simulated ns a fraction of 1.0 stands for: bare-number progress is then shown in ns,
    # with ns/day from its rate.
    progress_total_ns: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    max_attempts: int = Field(default=3, ge=1, le=1000)
    # Run only on workers of trusted clusters (the operator's HPC account, this machine), never
    # on untrusted ones (Salad: strangers' PCs).
    trusted_only: bool = False
    # More environment for the engine (it sees only an allow-list of the worker's own).
    env: dict[str, str] = Field(default_factory=dict, max_length=200)

    @field_validator("outputs")
    @classmethod
    def _output_globs(cls, paths: list[str]) -> list[str]:
        return relative_globs("output path", paths)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name):
                raise ValueError(f"env name {name[:130]!r} is not a variable name")
            if name.upper().startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"env name {name!r}: {', '.join(RESERVED_ENV_PREFIXES)}* "
                                 "variables are the worker's own (its secrets among them)")
            if "\x00" in value or len(value) > 8192:
                raise ValueError(f"env {name}: value has a NUL byte or is over 8192 characters")
        return env


# --------------------------------------------------------------------------- jobs


class Progress(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    done: float = Field(ge=0)
    total: float | None = Field(default=None, ge=0)
    unit: CleanText = Field(default="steps", max_length=32)
    ns_per_day: float | None = Field(default=None, ge=0)


class JobCreate(Strict):
    """Create a job whose bundle was uploaded with `PUT /api/v1/jobs/{id}/bundle`."""

    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    title: str = Field(default="", max_length=200)
    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    gpus: int | None = Field(default=None, ge=0, le=64)
    priority: int = Field(default=0, ge=-1000, le=1000)
    # Run only on workers of these clusters (empty: anywhere).
    preferred_clusters: list[str] | None = Field(default=None, max_length=50)
    trusted_only: bool | None = None  # None: as relaymd.yaml says (default false)

    @field_validator("preferred_clusters")
    @classmethod
    def _cluster_names(cls, names: list[str] | None) -> list[str] | None:
        for name in names or []:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
                raise ValueError(f"cluster name {name[:120]!r} must be 1 to 100 letters, digits, "
                                 "'_', '.' or '-', starting with a letter or digit")
        return names or None


class BundleUploaded(BaseModel):
    job_id: str
    sha256: str
    size: int
    spec: BundleSpec


class Failure(BaseModel):
    attempt: int
    exit_code: int | None
    reason: str
    log_tail: str
    at: datetime


class CheckpointInfo(BaseModel):
    seq: int
    key: str
    sha256: str
    size: int
    attempt: int
    worker_id: str
    created_at: datetime
    progress: Progress | None = None
    # False: written by a worker of an untrusted cluster (a stranger's machine held the job).
    trusted: bool = True


class Event(BaseModel):
    id: int
    job_id: str | None
    worker_id: str | None
    kind: str
    from_status: str | None
    to_status: str | None
    attempt: int | None
    seq: int | None = None  # the checkpoint this event accepted, if any
    reason: str
    at: datetime


class Job(BaseModel):
    id: str
    title: str
    status: JobStatus
    command: str
    spec: BundleSpec
    gpus: int
    priority: int
    max_attempts: int
    attempt: int  # number of claims so far; fences every worker callback
    failures: int  # engine failures counted against max_attempts
    worker_id: str | None
    bundle_sha256: str
    bundle_size: int
    latest_checkpoint: int | None
    checkpoints: int
    progress: Progress | None
    last_failure: Failure | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_checkpoint_at: datetime | None
    preferred_clusters: list[str] | None = None
    queue_blocked_reason: str | None = None  # a queued job that cannot run anywhere now: why
    trusted_only: bool = False  # runs only on workers of trusted clusters


class JobDetail(Job):
    checkpoint_list: list[CheckpointInfo]
    events: list[Event]
    # Rate and compute (relaymd/server/usage.py says exactly how each is derived).
    ns_per_day: float | None = None  # the engine's latest figure
    eta_seconds: float | None = None  # a running job with a known total and rate: time left
    gpu_hours: float = 0.0  # every attempt's wall time times its worker's GPUs
    gpu_hours_useful: float = 0.0  # gpu_hours less the redone part
    gpu_hours_redone: float = 0.0  # computed again after a later attempt resumed from before it


class JobUsage(BaseModel):
    """`GET /api/v1/usage`: one job ever claimed."""

    id: str
    title: str
    status: JobStatus
    gpus: int  # what it asked for
    attempts: int
    gpu_hours: float
    gpu_hours_useful: float
    gpu_hours_redone: float
    ns_per_day: float | None = None
    eta_seconds: float | None = None


class ClusterUsage(BaseModel):
    """`GET /api/v1/usage`: the attempts run by one cluster's workers."""

    cluster: str
    attempts: int
    gpu_hours: float
    gpu_hours_useful: float
    gpu_hours_redone: float


class Usage(BaseModel):
    """`relaymd usage`: GPU-hours per job and per cluster, useful and redone, and the totals."""

    at: datetime
    gpu_hours: float
    gpu_hours_useful: float
    gpu_hours_redone: float
    clusters: list[ClusterUsage]
    jobs: list[JobUsage]


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None


class Conflict(BaseModel):
    """Body of every 409 about a job: what the caller asked for and what the job really is."""

    error: Literal["job_transition_conflict"] = "job_transition_conflict"
    job_id: str
    from_: JobStatus = Field(alias="from", serialization_alias="from")
    to: str
    attempt: int
    message: str = ""

    model_config = ConfigDict(populate_by_name=True)


class ErrorBody(BaseModel):
    error: str
    message: str
    details: Any = None


# --------------------------------------------------------------------------- workers


class WorkerRegister(Strict):
    name: CleanText = Field(default="", max_length=200)
    hostname: CleanText = Field(default="", max_length=255)
    # The cluster comes from the bootstrap token; a body may name it, never another one.
    cluster: str | None = Field(default=None, max_length=100)
    # Ignored, accepted so that workers of earlier releases still register: the provider is
    # the token's cluster's (slurm, salad or local).
    provider: str = Field(default="local", max_length=50)
    provider_id: CleanText | None = Field(default=None, max_length=200)  # e.g. the SLURM job id
    # The compute platform the engine will use: CUDA, OpenCL or CPU (earlier workers sent it as
    # `platform`, a word that also meant the provider; both spellings are accepted).
    compute_platform: CleanText = Field(
        default="", max_length=50, validation_alias=AliasChoices("compute_platform", "platform"))
    gpus: int = Field(default=0, ge=0, le=64)
    gpu_model: CleanText = Field(default="", max_length=200)
    vram_gb: float = Field(default=0, ge=0)
    wall_time_end: datetime | None = None  # when the allocation ends, if known

    @field_validator("wall_time_end")
    @classmethod
    def _plausible_end(cls, when: datetime | None) -> datetime | None:
        if when is None:
            return None
        try:
            epoch = when.timestamp() if when.tzinfo else when.replace(tzinfo=UTC).timestamp()
        except (OverflowError, ValueError, OSError):
            raise ValueError("wall_time_end is not a usable time") from None
        if not 0 <= epoch < 1 << 35:  # 1970 .. year ~3058
            raise ValueError("wall_time_end must lie between 1970 and 3000")
        return when


class WorkerRegistered(BaseModel):
    worker_id: str
    token: str  # this worker's own session token; every later call uses it
    heartbeat_interval: float
    heartbeat_timeout: float


class Worker(BaseModel):
    id: str
    name: str
    hostname: str
    cluster: str
    provider: str
    provider_id: str | None
    compute_platform: str  # CUDA, OpenCL or CPU
    gpus: int
    gpu_model: str
    vram_gb: float
    status: WorkerStatus
    job_id: str | None
    consecutive_failures: int
    registered_at: datetime
    last_heartbeat_at: datetime | None
    wall_time_end: datetime | None
    note: str | None = None  # a placeholder's provider state, e.g. "PENDING (Priority)"


class Heartbeat(Strict):
    job_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    attempt: int | None = Field(default=None, ge=1, le=MAX_COUNTER)
    progress: Progress | None = None


Directive = Literal["continue", "stop", "exit"]


class HeartbeatReply(BaseModel):
    directive: Directive = "continue"  # stop: stop the engine and hand the job back; exit: leave
    reason: str = ""


class CheckpointRef(BaseModel):
    seq: int
    key: str
    sha256: str


class Assignment(BaseModel):
    """What a worker gets from a successful claim."""

    job: Job
    attempt: int
    bundle_key: str
    checkpoint_key: str | None  # newest accepted checkpoint to resume from
    checkpoint_sha256: str | None
    checkpoint_seq: int | None = None
    # The older accepted checkpoints, newest first: where to resume if the newest turns out
    # corrupt in storage (sha256 mismatch) or gone.
    older_checkpoints: list[CheckpointRef] = Field(default_factory=list)


class CheckpointRejected(Strict):
    attempt: int = Field(ge=1, le=MAX_COUNTER)
    reason: CleanText = Field(default="corrupt in storage", max_length=500)


class Lease(Strict):
    attempt: int = Field(ge=1, le=MAX_COUNTER)


class CheckpointReserved(BaseModel):
    seq: int
    key: str
    manifest_key: str


class CheckpointReport(Strict):
    attempt: int = Field(ge=1, le=MAX_COUNTER)
    seq: int = Field(ge=1, le=MAX_COUNTER)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=MAX_COUNTER)
    progress: Progress | None = None


class Release(Strict):
    attempt: int = Field(ge=1, le=MAX_COUNTER)
    reason: CleanText = Field(default="released", max_length=500)
    checkpoint: CheckpointReport | None = None  # its newest checkpoint, handed back with the job


class Complete(Strict):
    attempt: int = Field(ge=1, le=MAX_COUNTER)
    checkpoint: CheckpointReport | None = None


class Fail(Strict):
    attempt: int = Field(ge=1, le=MAX_COUNTER)
    exit_code: int | None = Field(default=None, ge=-(1 << 31), le=1 << 31)
    reason: CleanText = Field(default="engine failed", max_length=2000)
    log_tail: CleanText = Field(default="", max_length=65536)


# --------------------------------------------------------------------------- clusters


class ClusterInfo(BaseModel):
    """`relaymd clusters`: one cluster, its workers and the provisioning loop's last word."""

    name: str
    provider: str
    strategy: str
    enabled: bool
    priority: int
    gpus: int  # GPUs of one of its workers
    max_pending: int
    max_workers: int
    pending: int  # requested, not yet registered
    idle: int
    busy: int
    waiting: int  # queued jobs routed to it in the last cycle
    last_decision: str  # what the loop decided and why
    last_submitted: int  # workers requested in the last cycle
    last_decision_at: datetime | None
    last_error: str | None  # the provider's last failure, if the last cycle had one
    note: str  # what the provider reported (e.g. "squeue failed: ...", "2 replicas starting")
    details: dict[str, Any] = Field(default_factory=dict)


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    uptime_s: float

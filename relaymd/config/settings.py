"""Settings by role. `OrchestratorSettings` is what the orchestrator (and the operator's CLI
beside it) reads; `WorkerSettings` is what `relaymd worker` reads. They share three parts:

- `CommonSettings`: the data directory and where secrets come from;
- `ReachSettings`: how to find and reach an orchestrator (its URL, or the one running from
  `home`: endpoint file, tokens file, host and port);
- `StorageSettings`: the object storage both sides read and write.

A worker never holds the orchestrator's own settings (database, clusters, operator token, Salad
key, scheduling limits), so it cannot leak or misuse them; the config loader drops the other
role's keys from a shared file without validating them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from relaymd.config.clusters import ClusterConfig
from relaymd.config.paths import default_home
from relaymd.models import MIN_ENV_SECRET_LENGTH

if TYPE_CHECKING:
    from relaymd.storage import Storage

ENV_PREFIX = "RELAYMD_"


def _expand(value: Path | None) -> Path | None:
    return None if value is None else value.expanduser()


class CommonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    home: Path = Field(default_factory=default_home)
    # Where secrets (tokens, S3 keys, the Salad and Tailscale keys) come from: the environment
    # (RELAYMD_* variables), a 0600 YAML/JSON file, or Infisical with the machine identity in
    # INFISICAL_CLIENT_ID / INFISICAL_CLIENT_SECRET (one bootstrap credential per container).
    secrets_provider: Literal["env", "file", "infisical"] = "env"
    secrets_file: Path | None = None  # file: default {config dir}/secrets.yaml
    infisical_site_url: str = "https://app.infisical.com"
    infisical_project_id: str | None = None
    infisical_environment: str = "prod"
    infisical_path: str = "/"

    @field_validator("home", "secrets_file")
    @classmethod
    def _expand_common(cls, value: Path | None) -> Path | None:
        return _expand(value)

    def secret_values(self) -> list[str]:
        """Every secret these settings hold, for the log redaction filter."""
        values = [v.get_secret_value() for v in (getattr(self, f) for f in type(self).model_fields)
                  if isinstance(v, SecretStr)]
        return [v for v in values + self._more_secrets() if v]

    def _more_secrets(self) -> list[str]:
        return []


class ReachSettings(BaseModel):
    """How a client finds the orchestrator: `url`, else the one running from `home`."""

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    url: str | None = None  # default: the orchestrator running from this `home`
    tokens_file: Path | None = None  # default: {home}/tokens.json (0600)

    @field_validator("tokens_file")
    @classmethod
    def _expand_reach(cls, value: Path | None) -> Path | None:
        return _expand(value)

    @property
    def tokens_path(self) -> Path:
        return self.tokens_file or self.home / "tokens.json"  # type: ignore[attr-defined]

    @property
    def endpoint_file(self) -> Path:
        """Where a running orchestrator writes the URL it actually bound (port 0 included)."""
        return self.home / "orchestrator.json"  # type: ignore[attr-defined]


class StorageSettings(BaseModel):
    storage_url: str | None = None  # default: file://{home}/storage; or s3://BUCKET/PREFIX
    # s3:// storage (Backblaze B2: endpoint https://s3.REGION.backblazeb2.com, region REGION).
    s3_endpoint_url: str | None = None  # None: AWS
    s3_region: str = "us-east-1"
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    s3_access_key_id: SecretStr | None = None  # None: AWS_ACCESS_KEY_ID and boto3's usual chain
    s3_secret_access_key: SecretStr | None = None
    s3_read_base_url: str | None = None  # reads through this (a Cloudflare Worker), S3 fallback
    s3_part_size_mb: int = Field(default=16, ge=5, le=5120)  # multipart part size
    s3_concurrency: int = Field(default=4, ge=1, le=64)  # parts in flight per transfer
    s3_max_attempts: int = Field(default=5, ge=1, le=20)  # per request (5xx, timeouts)

    @property
    def storage(self) -> str:
        return self.storage_url or f"file://{self.home / 'storage'}"  # type: ignore[attr-defined]

    def open_storage(self) -> Storage:
        """The storage backend these settings name, with the S3 options filled in."""
        from relaymd.storage import open_storage
        from relaymd.storage.s3 import MiB, S3Options

        def secret(value: SecretStr | None) -> str | None:
            return value.get_secret_value() if value is not None else None
        return open_storage(self.storage, S3Options(
            endpoint_url=self.s3_endpoint_url, region=self.s3_region,
            addressing_style=self.s3_addressing_style,
            access_key_id=secret(self.s3_access_key_id),
            secret_access_key=secret(self.s3_secret_access_key),
            read_base_url=self.s3_read_base_url, part_size=self.s3_part_size_mb * MiB,
            concurrency=self.s3_concurrency, max_attempts=self.s3_max_attempts))

    def storage_env(self) -> dict[str, str]:
        """RELAYMD_* variables that give a worker process this storage (secrets included: for a
        child's environment only, never for a log or a file)."""
        env = {"RELAYMD_STORAGE_URL": self.storage}
        for name in S3_FIELDS:
            value = getattr(self, name)
            if value is not None:
                env[ENV_PREFIX + name.upper()] = (
                    value.get_secret_value() if isinstance(value, SecretStr) else str(value))
        return env


S3_FIELDS = tuple(name for name in StorageSettings.model_fields if name.startswith("s3_"))


class WorkerSettings(CommonSettings, ReachSettings, StorageSettings):
    """`relaymd worker` (containers set these as RELAYMD_* variables)."""

    worker_token: SecretStr | None = None  # bootstrap token; default: `worker` in tokens_file
    worker_idle: Literal["immediate_exit", "poll_then_exit"] = "immediate_exit"
    worker_poll_interval: float = Field(default=30.0, gt=0)  # poll_then_exit: between claims
    worker_poll_max: float = Field(default=600.0, ge=0)  # poll_then_exit: idle time before exit
    worker_workdir: Path | None = None  # default: {home}/work
    # The cluster this worker belongs to. Default: the one its bootstrap token was issued for
    # (the orchestrator decides by the token; a worker naming another cluster is refused).
    cluster: str | None = None
    handoff_margin: float = Field(default=300.0, ge=0)  # hand back this long before the end
    min_segment: float = Field(default=600.0, ge=0)  # don't claim with less allocation left
    shutdown_wait: float = Field(default=90.0, gt=0)  # engine's time to write a last checkpoint
    retry_max_delay: float = Field(default=30.0, gt=0)  # cap of the backoff between retries
    # Join a tailnet first when tailscale is in the image (see deploy/README.md).
    tailscale_auth_key: SecretStr | None = None  # an ephemeral auth key; None: no tailnet
    tailscale_proxy_port: int = Field(default=1055, ge=1, le=65535)
    tailscale_hostname: str | None = None  # default relaymd-HOSTNAME

    @field_validator("worker_workdir")
    @classmethod
    def _expand_workdir(cls, value: Path | None) -> Path | None:
        return _expand(value)

    @property
    def workdir(self) -> Path:
        return self.worker_workdir or self.home / "work"


class OrchestratorSettings(CommonSettings, ReachSettings, StorageSettings):
    """The orchestrator (`relaymd`, `relaymd serve`) and the operator's commands beside it."""

    token: SecretStr | None = None  # the operator CLI's token; default: read from tokens_file
    database: Path | None = None  # default: {home}/relaymd.db (keep it on local disk, not NFS)
    checkpoint_keep: int = Field(default=3, ge=1)  # newest checkpoints kept per job; older: deleted
    log_file: Path | None = None  # default: {home}/relaymd.log
    operator_token: SecretStr | None = None  # default: generated into tokens_file
    worker_token: SecretStr | None = None  # this machine's workers' bootstrap token (likewise)

    heartbeat_interval: float = Field(default=15.0, gt=0)
    heartbeat_timeout: float = Field(default=45.0, gt=0)
    reap_interval: float = Field(default=5.0, gt=0)
    quarantine_after: int = Field(default=3, ge=1)  # consecutive job failures before a worker is told to exit
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # JSON request bodies
    max_bundle_bytes: int = Field(default=4 << 30, ge=1024)  # uploaded job bundles
    default_max_attempts: int = Field(default=3, ge=1)
    # The local provider: up to this many `relaymd worker` processes on this machine (0: none).
    local_workers: int = Field(default=1, ge=0, le=256)
    provision_interval: float = Field(default=2.0, gt=0)  # seconds between provider cycles
    # Where else workers come from (SLURM clusters, Salad container groups), HPC first.
    clusters: list[ClusterConfig] = Field(default_factory=list)
    salad_api_key: SecretStr | None = None  # for salad clusters without their own api_key
    # What the orchestrator assumes of workers, under the keys the workers read themselves (a
    # shared config file sets both): how often an idle worker polls (one silent for longer is
    # not counted as claiming), and how long a local worker may take to hand back on shutdown.
    worker_poll_interval: float = Field(default=30.0, gt=0)
    shutdown_wait: float = Field(default=90.0, gt=0)

    @field_validator("clusters")
    @classmethod
    def _unique_names(cls, clusters: list[ClusterConfig]) -> list[ClusterConfig]:
        seen: set[str] = set()
        for c in clusters:
            if c.name in seen:
                raise ValueError(f"two clusters are named {c.name!r}; names must be unique")
            seen.add(c.name)
        return clusters

    @field_validator("database", "log_file")
    @classmethod
    def _expand_files(cls, value: Path | None) -> Path | None:
        return _expand(value)

    @model_validator(mode="after")
    def _timeout_exceeds_interval(self) -> OrchestratorSettings:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat_timeout ({self.heartbeat_timeout:g}s) must be longer than "
                f"heartbeat_interval ({self.heartbeat_interval:g}s)"
            )
        return self

    def _more_secrets(self) -> list[str]:
        values = [c.salad.api_key.get_secret_value() for c in self.clusters
                  if c.salad is not None and c.salad.api_key is not None]
        # A SLURM worker's extra environment is where its keys go: its values count as secrets,
        # except short ones ("1", "4", "true"): no key is that short, and masking every "4" in
        # the log would make it unreadable.
        values += [v for c in self.clusters if c.slurm is not None for v in c.slurm.env.values()
                   if len(v) >= MIN_ENV_SECRET_LENGTH]
        return values

    # Resolved paths: every consumer reads these, never the raw optional fields.
    @property
    def database_path(self) -> Path:
        return self.database or self.home / "relaymd.db"

    @property
    def log_path(self) -> Path:
        return self.log_file or self.home / "relaymd.log"


ROLES: tuple[type[CommonSettings], ...] = (OrchestratorSettings, WorkerSettings)

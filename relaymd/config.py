"""Settings: embedded defaults, overridden by the YAML config file, then by RELAYMD_<FIELD> env vars.

With no file at all the embedded default applies: data under ~/.local/share/relaymd (or
$RELAYMD_HOME), a SQLite file, `file://` storage, API on 127.0.0.1:8765.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from relaymd.models import MIN_ENV_SECRET_LENGTH

if TYPE_CHECKING:
    from relaymd.storage import Storage

ENV_PREFIX = "RELAYMD_"


class ConfigError(Exception):
    """A config file or environment value is unusable; the message names the field and the fix."""


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    env = environ.get("RELAYMD_HOME")
    if env:
        return Path(env).expanduser()
    xdg = environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "relaymd"


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    env = environ.get("RELAYMD_CONFIG")
    if env:
        return Path(env).expanduser()
    xdg = environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "relaymd" / "config.yaml"


ClusterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
# HPC before Salad by default: a higher priority is provisioned (and claims work) first.
DEFAULT_CLUSTER_PRIORITY = {"slurm": 20, "local": 10, "salad": 0}


class SlurmSettings(BaseModel):
    """How the `slurm` provider submits one worker allocation (`sbatch`)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"  # --time of each allocation
    gpus: int = Field(default=1, ge=0, le=64)  # --gpus of each allocation (0: none)
    cpus: int = Field(default=4, ge=1, le=1024)  # --cpus-per-task
    mem: str | None = None  # --mem, e.g. "32G"
    signal_margin: int = Field(default=300, ge=10, le=7200)  # --signal=B:TERM@margin (seconds)
    extra_sbatch: list[str] = Field(default_factory=list)  # more "#SBATCH ..." options, verbatim
    image: str | None = None  # Apptainer .sif path or URI; None: run `worker_command` directly
    apptainer: str = "apptainer"
    worker_command: str | None = None  # default: `relaymd worker` (inside the image if any)
    template: Path | None = None  # default: the packaged deploy/slurm/job.sbatch
    ssh: str | None = None  # login node to run sbatch/squeue on (`ssh HOST sbatch ...`)
    bin_dir: str | None = None  # where sbatch/squeue/scontrol/scancel live (default: PATH)
    orchestrator_url: str | None = None  # how compute nodes reach the API (default: ours)
    output: str | None = None  # --output; default {home}/slurm/{cluster}/%j.out ("relaymd-%j.out" over ssh)
    env: dict[str, str] = Field(default_factory=dict)  # more variables for the worker
    min_segment: float = Field(default=600.0, ge=0)  # the worker claims only with this much left
    command_timeout: float = Field(default=30.0, gt=0)  # per sbatch/squeue/scontrol call
    # squeue at most this often (sites frown on tight squeue loops); sooner after a submit.
    squeue_interval: float = Field(default=30.0, ge=0)
    register_timeout: float = Field(default=900.0, gt=0)  # RUNNING but never registered: cancel

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", value.strip()):
            raise ValueError(f"{value!r} is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
        return value.strip()

    @field_validator("extra_sbatch")
    @classmethod
    def _one_line_each(cls, lines: list[str]) -> list[str]:
        for line in lines:
            if "\n" in line or "\r" in line:
                raise ValueError(f"extra_sbatch entry {line!r} spans lines; give one option each")
        return lines


class SaladSettings(BaseModel):
    """Which Salad Cloud container group the `salad` provider scales, through Salad's API."""

    model_config = ConfigDict(extra="forbid")

    organization: str = Field(min_length=1)
    project: str = Field(min_length=1)
    container_group: str = Field(min_length=1)
    api_key: SecretStr | None = None  # default: RELAYMD_SALAD_API_KEY (from secrets)
    base_url: str = "https://api.salad.com/api/public"
    gpus: int = Field(default=1, ge=0, le=64)  # GPUs of each replica
    idle_grace: float = Field(default=300.0, ge=0)  # no work this long: scale to zero
    request_timeout: float = Field(default=20.0, gt=0)


class ClusterConfig(BaseModel):
    """One place workers come from, and when to ask it for more."""

    model_config = ConfigDict(extra="forbid")

    name: ClusterName
    provider: Literal["slurm", "salad", "local"]
    strategy: Literal["reactive", "continuous", "jit_threshold"] = "reactive"
    target_workers: int = Field(default=1, ge=0, le=10000)  # continuous: keep this many alive
    threshold: int = Field(default=0, ge=0)  # jit_threshold: submit when more jobs wait than this
    max_pending: int = Field(default=1, ge=0, le=1000)  # requests not yet registered
    max_workers: int = Field(default=4, ge=0, le=10000)  # registered + pending
    priority: int | None = None  # default: slurm 20, local 10, salad 0 (higher goes first)
    enabled: bool = True
    # Runs under the operator's own account (HPC, this machine) rather than on strangers' PCs.
    # Default: true, except for provider salad. Jobs submitted --trusted-only never run on an
    # untrusted cluster, and checkpoints its workers write are marked as such.
    trusted: bool | None = None
    slurm: SlurmSettings | None = None
    salad: SaladSettings | None = None

    @model_validator(mode="after")
    def _provider_settings(self) -> ClusterConfig:
        if self.provider == "slurm" and self.slurm is None:
            self.slurm = SlurmSettings()
        if self.provider == "salad" and self.salad is None:
            raise ValueError(f"cluster {self.name}: provider salad needs a `salad:` section "
                             "(organization, project, container_group)")
        if self.priority is None:
            self.priority = DEFAULT_CLUSTER_PRIORITY[self.provider]
        if self.trusted is None:
            self.trusted = self.provider != "salad"
        return self

    @property
    def gpus(self) -> int:
        """GPUs of one worker from this cluster (0 for local workers)."""
        if self.slurm is not None:
            return self.slurm.gpus
        if self.salad is not None:
            return self.salad.gpus
        return 0


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    home: Path = Field(default_factory=default_home)
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    # Client side: the orchestrator to talk to. Default: the one running from this `home`.
    url: str | None = None
    token: SecretStr | None = None  # client token; default: read from tokens_file

    database: Path | None = None  # default: {home}/relaymd.db (keep it on local disk, not NFS)
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
    checkpoint_keep: int = Field(default=3, ge=1)  # newest checkpoints kept per job; older: deleted
    tokens_file: Path | None = None  # default: {home}/tokens.json (0600)
    log_file: Path | None = None  # default: {home}/relaymd.log

    # Where secrets (tokens, S3 keys, the Salad and Tailscale keys) come from: the environment
    # (RELAYMD_* variables), a 0600 YAML/JSON file, or Infisical with the machine identity in
    # INFISICAL_CLIENT_ID / INFISICAL_CLIENT_SECRET (one bootstrap credential per container).
    secrets_provider: Literal["env", "file", "infisical"] = "env"
    secrets_file: Path | None = None  # file: default {config dir}/secrets.yaml
    infisical_site_url: str = "https://app.infisical.com"
    infisical_project_id: str | None = None
    infisical_environment: str = "prod"
    infisical_path: str = "/"

    operator_token: SecretStr | None = None  # default: generated into tokens_file
    worker_token: SecretStr | None = None  # bootstrap token workers register with

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

    # Worker side (`relaymd worker`; containers set these as RELAYMD_* variables).
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

    @field_validator("clusters")
    @classmethod
    def _unique_names(cls, clusters: list[ClusterConfig]) -> list[ClusterConfig]:
        seen: set[str] = set()
        for c in clusters:
            if c.name in seen:
                raise ValueError(f"two clusters are named {c.name!r}; names must be unique")
            seen.add(c.name)
        return clusters

    @field_validator("home", "database", "tokens_file", "log_file", "worker_workdir", "secrets_file")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @model_validator(mode="after")
    def _timeout_exceeds_interval(self) -> Settings:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat_timeout ({self.heartbeat_timeout:g}s) must be longer than "
                f"heartbeat_interval ({self.heartbeat_interval:g}s)"
            )
        return self

    # Resolved paths: every consumer reads these, never the raw optional fields.
    @property
    def database_path(self) -> Path:
        return self.database or self.home / "relaymd.db"

    @property
    def storage(self) -> str:
        return self.storage_url or f"file://{self.home / 'storage'}"

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

    def secret_values(self) -> list[str]:
        """Every secret these settings hold, for the log redaction filter."""
        values = [v.get_secret_value() for v in (getattr(self, f) for f in Settings.model_fields)
                  if isinstance(v, SecretStr)]
        values += [c.salad.api_key.get_secret_value() for c in self.clusters
                   if c.salad is not None and c.salad.api_key is not None]
        # A SLURM worker's extra environment is where its keys go: its values count as secrets,
        # except short ones ("1", "4", "true"): no key is that short, and masking every "4" in
        # the log would make it unreadable.
        values += [v for c in self.clusters if c.slurm is not None for v in c.slurm.env.values()
                   if len(v) >= MIN_ENV_SECRET_LENGTH]
        return [v for v in values if v]

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

    @property
    def tokens_path(self) -> Path:
        return self.tokens_file or self.home / "tokens.json"

    @property
    def log_path(self) -> Path:
        return self.log_file or self.home / "relaymd.log"

    @property
    def workdir(self) -> Path:
        return self.worker_workdir or self.home / "work"

    @property
    def endpoint_file(self) -> Path:
        """Where a running orchestrator writes the URL it actually bound (port 0 included)."""
        return self.home / "orchestrator.json"


S3_FIELDS = tuple(name for name in Settings.model_fields if name.startswith("s3_"))


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            if name == "clusters":  # a list: JSON in the environment
                try:
                    out[name] = json.loads(value)
                except ValueError as exc:
                    raise ConfigError(f"environment ({ENV_PREFIX}CLUSTERS): not valid JSON: "
                                      f"{exc}") from None
                continue
            out[name] = value
    return out


def _fetch_secrets(raw: dict[str, Any], config_path: Path,
                   environ: Mapping[str, str]) -> dict[str, str]:
    """Settings filled by the chosen secrets provider (below the environment and the command
    line, above the config file). The `env` provider adds nothing: the environment layer already
    reads RELAYMD_* variables."""
    from relaymd.secrets import SecretsError, open_secrets, settings_from_secrets

    kind = str(raw.get("secrets_provider") or "env")
    if kind == "env":
        return {}
    file = raw.get("secrets_file")
    try:
        provider = open_secrets(
            kind, environ=environ,
            file=Path(str(file)).expanduser() if file else config_path.with_name("secrets.yaml"),
            infisical={k: str(raw[f"infisical_{k}"]) for k in
                       ("site_url", "project_id", "environment", "path")
                       if raw.get(f"infisical_{k}") is not None})
        return settings_from_secrets(provider.fetch())
    except SecretsError as exc:
        raise ConfigError(f"secrets: {exc}") from None


def _format_errors(exc: ValidationError, sources: dict[str, str], fallback: str) -> str:
    """One line naming each bad field and where its value came from."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(settings)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling)"
        source = sources.get(str(err["loc"][0]) if err["loc"] else "", fallback)
        parts.append(f"{source}: {where}: {msg}")
    return "; ".join(parts)


def load_settings(
    config_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Defaults < config file < environment < explicit overrides (CLI flags), validated once
    together, so a constraint between two settings sees their final values."""
    environ = dict(os.environ) if environ is None else environ
    explicit = config_path is not None or bool(environ.get("RELAYMD_CONFIG"))
    path = config_path or default_config_path(environ)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            problem = str(exc).replace("\n", " ")
            raise ConfigError(f"{path}: not valid YAML: {problem}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, "
                              f"got {type(loaded).__name__}")
        data.update(loaded)
    elif explicit:
        raise ConfigError(f"{path}: config file not found (given by --config or RELAYMD_CONFIG)")
    env = _env_overrides(environ)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    secrets = _fetch_secrets({**data, **env, **flags}, path, environ)
    sources = {k: str(path) for k in data}
    sources.update({k: "secrets" for k in secrets})
    sources.update({k: f"environment ({ENV_PREFIX}{k.upper()})" for k in env})
    sources.update({k: "command line" for k in flags})
    merged = {"home": default_home(environ), **data, **secrets, **env, **flags}
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        fallback = str(path) if data else "settings"
        raise ConfigError(_format_errors(exc, sources, fallback)) from None

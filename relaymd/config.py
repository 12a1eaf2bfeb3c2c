"""Settings: embedded defaults, overridden by the YAML config file, then by RELAYMD_<FIELD> env vars.

With no file at all the embedded default applies: data under ~/.local/share/relaymd (or
$RELAYMD_HOME), a SQLite file, `file://` storage, API on 127.0.0.1:8765.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

ENV_PREFIX = "RELAYMD_"


class ConfigError(Exception):
    """A config file or environment value is unusable; the message names the field and the fix."""


def default_home() -> Path:
    env = os.environ.get("RELAYMD_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "relaymd"


def default_config_path() -> Path:
    env = os.environ.get("RELAYMD_CONFIG")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "relaymd" / "config.yaml"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    home: Path = Field(default_factory=default_home)
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    # Client side: the orchestrator to talk to. Default: the one running from this `home`.
    url: str | None = None
    token: SecretStr | None = None  # client token; default: read from tokens_file

    database: Path | None = None  # default: {home}/relaymd.db (keep it on local disk, not NFS)
    storage_url: str | None = None  # default: file://{home}/storage
    tokens_file: Path | None = None  # default: {home}/tokens.json (0600)
    log_file: Path | None = None  # default: {home}/relaymd.log

    operator_token: SecretStr | None = None  # default: generated into tokens_file
    worker_token: SecretStr | None = None  # bootstrap token workers register with

    heartbeat_interval: float = Field(default=15.0, gt=0)
    heartbeat_timeout: float = Field(default=45.0, gt=0)
    reap_interval: float = Field(default=5.0, gt=0)
    quarantine_after: int = Field(default=3, ge=1)  # consecutive job failures before a worker is told to exit
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # JSON request bodies
    max_bundle_bytes: int = Field(default=4 << 30, ge=1024)  # uploaded job bundles
    default_max_attempts: int = Field(default=3, ge=1)

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

    @property
    def tokens_path(self) -> Path:
        return self.tokens_file or self.home / "tokens.json"

    @property
    def log_path(self) -> Path:
        return self.log_file or self.home / "relaymd.log"

    @property
    def endpoint_file(self) -> Path:
        """Where a running orchestrator writes the URL it actually bound (port 0 included)."""
        return self.home / "orchestrator.json"


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            out[name] = value
    return out


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling)"
        lines.append(f"{source}: {where}: {msg}")
    return "\n".join(lines)


def load_settings(
    config_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Defaults < config file < environment < explicit overrides (CLI flags)."""
    environ = dict(os.environ) if environ is None else environ
    explicit = config_path is not None or "RELAYMD_CONFIG" in environ
    path = config_path or default_config_path()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        data.update(loaded)
    elif explicit:
        raise ConfigError(f"{path}: config file not found (given by --config or RELAYMD_CONFIG)")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path))) from None
    env = _env_overrides(environ)
    try:
        settings = Settings.model_validate({**data, **env})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, "environment (RELAYMD_*)")) from None
    if overrides:
        clean = {k: v for k, v in overrides.items() if v is not None}
        try:
            settings = Settings.model_validate({**settings.model_dump(), **clean})
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, "command line")) from None
    return settings

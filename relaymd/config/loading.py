"""Loading settings for one role: embedded defaults < config file < secrets provider <
environment (RELAYMD_<FIELD>) < explicit overrides (command-line flags), validated once together
so a constraint between two settings sees their final values.

A config file may be shared by both roles (one file on a login node): keys that belong to the
other role are dropped unread; a key no role knows is an error naming the file.

Why not pydantic-settings' sources: its environment source reads `os.environ` itself (we take
the environment as an argument: the worker's children and the tests pass their own), a
validation error there does not say which layer the bad value came from (ours says "environment
(RELAYMD_PORT)" or the file's path), and the secrets layer is configured by the other layers
(`secrets_provider` may be set in the file or the environment), which its independent sources
cannot express. What is left by hand is the merge below.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from relaymd.config.paths import default_config_path, default_home
from relaymd.config.settings import ENV_PREFIX, ROLES, CommonSettings, OrchestratorSettings

S = TypeVar("S", bound=CommonSettings)
JSON_FIELDS = {"clusters"}  # lists: JSON in the environment


class ConfigError(Exception):
    """A config file or environment value is unusable; the message names the field and the fix."""


def _env_overrides(role: type[CommonSettings], environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in role.model_fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is None or value == "":
            continue
        if name in JSON_FIELDS:
            try:
                out[name] = json.loads(value)
            except ValueError as exc:
                raise ConfigError(f"environment ({ENV_PREFIX}{name.upper()}): not valid JSON: "
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


def _read_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise ConfigError(f"{path}: not valid YAML: {problem}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
    return loaded


def _own(role: type[CommonSettings], values: dict[str, Any]) -> dict[str, Any]:
    """`values` less the keys only another role reads (unknown keys stay, to be refused)."""
    others = {name for r in ROLES if r is not role for name in r.model_fields}
    return {k: v for k, v in values.items() if k in role.model_fields or k not in others}


def load_settings(
    config_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    role: type[S] = OrchestratorSettings,  # type: ignore[assignment]
) -> S:
    """The settings of `role` (the orchestrator's unless told), from every layer."""
    environ = dict(os.environ) if environ is None else environ
    explicit = config_path is not None or bool(environ.get("RELAYMD_CONFIG"))
    path = config_path or default_config_path(environ)
    data: dict[str, Any] = {}
    if path.exists():
        data = _own(role, _read_file(path))
    elif explicit:
        raise ConfigError(f"{path}: config file not found (given by --config or RELAYMD_CONFIG)")
    env = _env_overrides(role, environ)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    secrets = _own(role, _fetch_secrets({**data, **env, **flags}, path, environ))
    sources = {k: str(path) for k in data}
    sources.update({k: "secrets" for k in secrets})
    sources.update({k: f"environment ({ENV_PREFIX}{k.upper()})" for k in env})
    sources.update({k: "command line" for k in flags})
    merged = {"home": default_home(environ), **data, **secrets, **env, **flags}
    try:
        return role.model_validate(merged)
    except ValidationError as exc:
        fallback = str(path) if data else "settings"
        raise ConfigError(_format_errors(exc, sources, fallback)) from None

"""Default locations: the data directory (`home`) and the config file, from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


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

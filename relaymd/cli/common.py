"""What every `relaymd` subcommand shares: the error exit, settings and client of the command
line, and the `--url` / `--json` options."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
from pydantic import BaseModel

from relaymd.client import ApiError, Client, discover_token, discover_url
from relaymd.config import CommonSettings, ConfigError, OrchestratorSettings, load_settings

S = TypeVar("S", bound=CommonSettings)


def die(message: str, code: int = 1) -> NoReturn:
    click.echo(f"relaymd: {message}", err=True)
    sys.exit(code)


def settings_of(ctx: click.Context, role: type[S] = OrchestratorSettings,  # type: ignore[assignment]
                **overrides: Any) -> S:
    """The settings of `role` (the orchestrator's, which the operator's commands share; or the
    worker's), from the config file, the environment and the command line."""
    obj = ctx.find_root().obj or {}
    try:
        return load_settings(obj.get("config"), {**obj.get("overrides", {}), **overrides},
                             role=role)
    except ConfigError as exc:
        die(str(exc), 2)


def client_of(ctx: click.Context, url: str | None) -> Client:
    settings = settings_of(ctx, url=url)
    return Client(discover_url(settings), discover_token(settings))


def call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ApiError as exc:
        die(exc.message)


def emit_json(value: BaseModel | list[BaseModel]) -> None:
    if isinstance(value, list):
        data: Any = [v.model_dump(mode="json", by_alias=True) for v in value]
    else:
        data = value.model_dump(mode="json", by_alias=True)
    click.echo(json.dumps(data, indent=2))


url_option = click.option("--url", help="orchestrator URL (default: the one of this RELAYMD_HOME)")
json_option = click.option("--json", "as_json", is_flag=True, help="stable JSON output")

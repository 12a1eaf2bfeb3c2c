"""The fleet commands: workers, clusters (and switching one on or off), and each cluster's
bootstrap token."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from relaymd.cli.common import call, client_of, emit_json, json_option, url_option
from relaymd.cli.tables import clusters_table, tokens_table, workers_table
from relaymd.client import Client


@click.group(invoke_without_command=True)
@url_option
@json_option
@click.pass_context
def clusters(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List clusters: pending and active workers, and the last provisioning decision."""
    if ctx.invoked_subcommand is not None:
        return
    _listing(ctx, url, as_json, Client.clusters, clusters_table,
             "no clusters (add them under `clusters:` in the config file)")


def _listing(ctx: click.Context, url: str | None, as_json: bool,
             fetch: Callable[[Client], list[Any]], table: Callable[[list[Any]], Table],
             empty: str) -> None:
    """A listing command: JSON, a line saying there is nothing, or the table."""
    with client_of(ctx, url) as client:
        listed = call(lambda: fetch(client))
    if as_json:
        emit_json(listed)
    elif not listed:
        click.echo(empty)
    else:
        Console().print(table(listed))


def _switch(ctx: click.Context, name: str, url: str | None, as_json: bool, on: bool) -> None:
    with client_of(ctx, url) as client:
        info = call(lambda: client.set_cluster_enabled(name, on))
    if as_json:
        emit_json(info)
    else:
        click.echo(f"cluster {info.name}: {'enabled' if info.enabled else 'disabled'}")


@clusters.command("enable")
@click.argument("name")
@url_option
@json_option
@click.pass_context
def clusters_enable(ctx: click.Context, name: str, url: str | None, as_json: bool) -> None:
    """Let the orchestrator request workers from cluster NAME again."""
    _switch(ctx, name, url, as_json, True)


@clusters.command("disable")
@click.argument("name")
@url_option
@json_option
@click.pass_context
def clusters_disable(ctx: click.Context, name: str, url: str | None, as_json: bool) -> None:
    """Stop requesting workers from cluster NAME (running workers finish their jobs)."""
    _switch(ctx, name, url, as_json, False)


@click.group(invoke_without_command=True)
@url_option
@json_option
@click.pass_context
def tokens(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List each cluster's bootstrap token (masked): a worker's cluster is the one whose token
    it registers with."""
    if ctx.invoked_subcommand is not None:
        return
    with client_of(ctx, url) as client:
        listed = call(client.tokens)
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    Console().print(tokens_table(listed))


@tokens.command("show")
@click.argument("cluster")
@url_option
@click.pass_context
def tokens_show(ctx: click.Context, cluster: str, url: str | None) -> None:
    """Print CLUSTER's bootstrap token in clear (to paste into Salad or a secrets store)."""
    with client_of(ctx, url) as client:
        click.echo(call(lambda: client.token(cluster)))


@tokens.command("rotate")
@click.argument("cluster")
@url_option
@click.pass_context
def tokens_rotate(ctx: click.Context, cluster: str, url: str | None) -> None:
    """Replace CLUSTER's bootstrap token: the old one is refused at once (registered workers
    keep running); prints the new one. SLURM and local workers get it by themselves; update
    Salad's container group (or your secrets store) with it."""
    with client_of(ctx, url) as client:
        token = call(lambda: client.rotate_token(cluster))
    click.echo(f"relaymd: cluster {cluster}: new bootstrap token (the old one no longer "
               "works):", err=True)
    click.echo(token)


@click.command()
@url_option
@json_option
@click.pass_context
def workers(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List workers."""
    _listing(ctx, url, as_json, Client.workers, workers_table, "no workers")

"""`relaymd usage`: GPU-hours per cluster and per job, useful and redone, with each running
job's ns/day and ETA (the definitions are in relaymd/server/usage.py)."""

from __future__ import annotations

import click
from rich.console import Console

from relaymd.cli.common import call, client_of, emit_json, json_option, url_option
from relaymd.cli.tables import clusters_usage_table, gpu_hours_text, jobs_usage_table


@click.command()
@url_option
@json_option
@click.pass_context
def usage(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """GPU-hours spent, per cluster and per job: useful, and redone (computed again after a
    kill or hand-off because a later attempt resumed from an earlier checkpoint)."""
    with client_of(ctx, url) as client:
        report = call(client.usage)
    if as_json:
        emit_json(report)
        return
    out = Console()
    out.print(f"total  {gpu_hours_text(report.gpu_hours, report.gpu_hours_redone)}")
    if report.clusters:
        out.print(clusters_usage_table(report.clusters))
    if not report.jobs:
        out.print("no job has run yet")
        return
    out.print()
    out.print(jobs_usage_table(report.jobs))

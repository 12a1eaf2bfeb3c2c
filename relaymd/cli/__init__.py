"""The `relaymd` command: bare `relaymd` opens the console; subcommands serve and script it.

Client subcommands talk to a running orchestrator over HTTP only (they never open the SQLite
file). Exit codes: 0 success, 1 refused or failed operation, 2 usage error.

The commands live by group: run (console, serve, web, worker), jobs (submit ... purge), fleet
(workers, clusters, tokens), usage (GPU-hours), offline (config check, example); common holds
what they share and tables how they print. Every command module is imported here, statically,
and registered on `main` below: that is also what lets PyInstaller's analysis of
relaymd/__main__.py find them.
"""

from __future__ import annotations

from pathlib import Path

import click
from click_default_group import DefaultGroup

from relaymd import __version__
from relaymd.cli import fleet, jobs, offline, run, usage
from relaymd.cli.common import call, client_of, die, emit_json, json_option, settings_of, url_option

__all__ = ["call", "client_of", "die", "emit_json", "json_option", "main", "settings_of",
           "url_option"]


@click.group(cls=DefaultGroup, default="console", default_if_no_args=True)
@click.option("--config", type=click.Path(path_type=Path), help="config file (RELAYMD_CONFIG)")
@click.version_option(__version__, prog_name="relaymd")
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """RelayMD: molecular dynamics jobs that hop between short-lived GPU workers."""
    ctx.obj = {"config": config, "overrides": {}}


for command in (run.console, run.serve, run.web, run.worker,
                offline.config, offline.example,
                jobs.submit, jobs.jobs, jobs.job, jobs.cancel, jobs.requeue, jobs.checkpoints,
                jobs.purge, jobs.results,
                fleet.workers, fleet.clusters, fleet.tokens, usage.usage):
    main.add_command(command)
del command

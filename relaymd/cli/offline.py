"""The commands that need no orchestrator: `config check` and `example openmm`."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from relaymd.cli.common import die, json_option
from relaymd.config import ConfigError, default_config_path, load_settings


@click.group()
def config() -> None:
    """Check a configuration file."""


@config.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@json_option
@click.pass_context
def config_check(ctx: click.Context, file: Path | None, as_json: bool) -> None:
    """Validate FILE (default: the config in use) and print the effective configuration
    (defaults, file, environment) with every secret masked."""
    obj = ctx.find_root().obj or {}
    path = file or obj.get("config")
    try:
        settings = load_settings(path, obj.get("overrides", {}))
    except ConfigError as exc:
        die(f"config is not valid: {exc}", 2)
    effective = settings.model_dump(mode="json")  # SecretStr dumps as "**********"
    for cluster in effective.get("clusters") or []:
        # A worker's extra environment often carries its keys: show the names, not the values.
        env = (cluster.get("slurm") or {}).get("env") or {}
        for name in env:
            env[name] = "**********"
    if as_json:
        click.echo(json.dumps(effective, indent=2))
        return
    source = path or default_config_path()
    where = f"{source}" if Path(source).exists() else f"{source} (absent: defaults apply)"
    click.echo(f"# config ok: {where}")
    click.echo(yaml.safe_dump(effective, sort_keys=False), nl=False)


@click.group()
def example() -> None:
    """Write ready-to-submit example jobs."""


@example.command("openmm")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--atoms", type=click.IntRange(300, 2_000_000),
              help="a TIP3P water box of about N atoms (default: villin in water, 8,867 atoms)")
@click.option("--ns", type=click.FloatRange(min=0, min_open=True), default=0.02,
              show_default=True, help="simulated time")
@click.option("--platform", default="auto", show_default=True,
              help="OpenMM platform for the run: auto (CUDA, OpenCL, CPU) or a name")
def example_openmm(directory: Path, atoms: int | None, ns: float, platform: str) -> None:
    """A small solvated OpenMM system as a job bundle in DIRECTORY."""
    try:
        import openmm  # noqa: F401
    except ImportError:
        die("OpenMM is not installed: pip install 'relaymd[md]'")
    from relaymd.engines.openmm.example import write_example

    if directory.exists() and any(directory.iterdir()):
        die(f"{directory} is not empty; choose a new directory", 2)
    click.echo(f"building the system in {directory} ...", err=True)
    write_example(directory, atoms=atoms, ns=ns, platform=platform)
    click.echo(f"wrote {directory}; submit it with: relaymd submit {directory}")

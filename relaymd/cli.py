"""The `relaymd` command: bare `relaymd` opens the console; subcommands serve and script it.

Client subcommands talk to a running orchestrator over HTTP only (they never open the SQLite
file). Exit codes: 0 success, 1 refused or failed operation, 2 usage error.
"""

from __future__ import annotations

import asyncio
import json
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml
from click_default_group import DefaultGroup
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relaymd import __version__
from relaymd.client import ApiError, Client, discover_token, discover_url
from relaymd.config import ConfigError, Settings, default_config_path, load_settings
from relaymd.models import ClusterInfo, Job, JobCreate, JobStatus, Worker

STATUS_STYLE = {
    "queued": "yellow", "assigned": "cyan", "running": "green", "completed": "bold green",
    "failed": "bold red", "cancelled": "dim", "idle": "cyan", "busy": "green", "stale": "red",
    "provisioning": "yellow", "quarantined": "bold red", "gone": "dim",
}


def die(message: str, code: int = 1) -> NoReturn:
    click.echo(f"relaymd: {message}", err=True)
    sys.exit(code)


def settings_of(ctx: click.Context, **overrides: Any) -> Settings:
    obj = ctx.find_root().obj or {}
    try:
        return load_settings(obj.get("config"), {**obj.get("overrides", {}), **overrides})
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


def age(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "-"
    seconds = max(0, int(((now or datetime.now(UTC)) - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def progress_text(job: Job) -> str:
    p = job.progress
    if p is None:
        return "-"
    if p.total:
        return f"{100 * p.done / p.total:5.1f}% {p.done:g}/{p.total:g} {p.unit}"
    return f"{p.done:g} {p.unit}"


def trust_text(trusted: bool) -> str:
    """Who wrote a checkpoint: a trusted cluster, or a stranger's machine (Salad)."""
    return "trusted" if trusted else "[yellow]untrusted worker[/]"


def styled(status: str) -> str:
    style = STATUS_STYLE.get(status, "")
    return f"[{style}]{status}[/]" if style else status


url_option = click.option("--url", help="orchestrator URL (default: the one of this RELAYMD_HOME)")
json_option = click.option("--json", "as_json", is_flag=True, help="stable JSON output")


@click.group(cls=DefaultGroup, default="console", default_if_no_args=True)
@click.option("--config", type=click.Path(path_type=Path), help="config file (RELAYMD_CONFIG)")
@click.version_option(__version__, prog_name="relaymd")
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """RelayMD: molecular dynamics jobs that hop between short-lived GPU workers."""
    ctx.obj = {"config": config, "overrides": {}}


def fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: it halves the API's per-request CPU (bench/README.md)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


demo_option = click.option(
    "--demo", is_flag=True,
    help="queue the example OpenMM job (villin in water) if no job is queued or running")


@main.command()
@click.option("--host", help="interface to listen on (default 127.0.0.1)")
@click.option("--port", type=int, help="port to listen on (default 8765)")
@click.option("--connect", "connect", metavar="URL",
              help="watch and drive an orchestrator running elsewhere (RELAYMD_TOKEN)")
@demo_option
@click.pass_context
def console(ctx: click.Context, host: str | None, port: int | None, connect: str | None,
            demo: bool) -> None:
    """Open the operator console hosting the orchestrator (the default command)."""
    from relaymd.server.orchestrator import OrchestratorError, setup_file_logging

    if not sys.stdin.isatty() or not sys.stdout.isatty():
        die("the console needs a terminal; use `relaymd serve` to run headless", 2)
    settings = settings_of(ctx, host=host, port=port)
    try:
        if connect:
            from relaymd.tui.run import run_remote

            asyncio.run(run_remote(connect, discover_token(settings)))
            return
        from relaymd.tui.run import run_console

        setup_file_logging(settings.log_path)
        asyncio.run(run_console(settings, demo=demo))
    except OrchestratorError as exc:
        die(str(exc))
    except ApiError as exc:
        die(f"{connect}: {exc.message}")
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--host", help="interface to listen on (default 127.0.0.1)")
@click.option("--port", type=int, help="port to listen on (default 8765)")
@demo_option
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, demo: bool) -> None:
    """Run the orchestrator headless until SIGINT/SIGTERM."""
    from relaymd.server.orchestrator import (
        OrchestratorError,
        serve_until_signalled,
        setup_file_logging,
    )

    settings = settings_of(ctx, host=host, port=port)
    setup_file_logging(settings.log_path)
    try:
        with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
            runner.run(serve_until_signalled(settings, demo=demo))
    except OrchestratorError as exc:
        die(str(exc))
    except KeyboardInterrupt:
        pass


def read_token_file(path: Path) -> str:
    """`relaymd worker --token-file`: the file's text, stripped. Like the tokens file, a file
    other users can read (or write) is refused: they would hold the cluster's bootstrap token."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            die(f"--token-file {path}: readable by other users (mode {stat.S_IMODE(mode):04o}); "
                f"run `chmod 600 {path}`", 2)
        token = path.read_text().strip()
    except FileNotFoundError:
        die(f"--token-file {path}: no such file", 2)
    except (OSError, UnicodeDecodeError) as exc:
        die(f"--token-file {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}", 2)
    if not token:
        die(f"--token-file {path}: the file is empty; write the worker bootstrap token in it", 2)
    return token


@main.command()
@click.option("--orchestrator", "url", help="orchestrator URL (RELAYMD_URL)")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="file holding the worker bootstrap token, mode 0600 (or RELAYMD_WORKER_TOKEN)")
@click.option("--idle", type=click.Choice(["immediate_exit", "poll_then_exit"]),
              help="when no job is claimable: exit at once, or poll a while first")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="where job dirs are unpacked (RELAYMD_WORKER_WORKDIR)")
@click.pass_context
def worker(ctx: click.Context, url: str | None, token_file: Path | None, idle: str | None,
           workdir: Path | None) -> None:
    """Run a worker: claim jobs, run their engine, ship checkpoints, hand back in time."""
    from relaymd.worker.main import run_worker, setup_worker_logging
    from relaymd.worker.tailscale import TailscaleError

    settings = settings_of(ctx, url=url, worker_idle=idle, worker_workdir=workdir)
    setup_worker_logging()
    # No --token: a token on the command line is on `ps` for every user of the node.
    bootstrap = read_token_file(token_file) if token_file else discover_token(settings, "worker")
    if not bootstrap:
        die("no worker token: pass --token-file FILE (mode 0600) or set RELAYMD_WORKER_TOKEN", 2)
    try:
        code = asyncio.run(run_worker(settings, discover_url(settings), bootstrap))
    except ApiError as exc:
        die(exc.message)
    except TailscaleError as exc:
        die(f"tailscale: {exc}")
    sys.exit(code)


@main.group()
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


@main.group()
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


def bundle_spec_for(src: Path, command: str | None, checkpoint: tuple[str, ...],
                    gpus: int | None, max_attempts: int | None) -> dict[str, Any]:
    """relaymd.yaml contents: the directory's own file with the command-line flags on top."""
    from relaymd.submitting import SpecError, build_spec

    if command is None and not (src / "relaymd.yaml").exists():
        die(f"{src} has no relaymd.yaml; pass --command (and --checkpoint) to write one", 2)
    try:
        return build_spec(src, command, list(checkpoint), gpus, max_attempts)
    except SpecError as exc:
        die(str(exc), 2)


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--title", default=None, help="a name for the job (default: the directory name)")
@click.option("--command", "command", help="engine command, run in the job dir")
@click.option("--checkpoint", multiple=True, help="glob of checkpoint files (repeatable)")
@click.option("--gpus", type=click.IntRange(0, 64), help="GPUs the job needs")
@click.option("--max-attempts", type=click.IntRange(1, 1000), help="engine failures allowed")
@click.option("--priority", type=click.IntRange(-1000, 1000), default=0, show_default=True)
@click.option("--cluster", "clusters", multiple=True, metavar="NAME",
              help="run only on workers of this cluster (repeatable; default: anywhere)")
@click.option("--trusted-only", is_flag=True, default=None,
              help="never run on an untrusted cluster (Salad); also `trusted_only: true` in "
              "relaymd.yaml")
@url_option
@json_option
@click.pass_context
def submit(ctx: click.Context, directory: Path, title: str | None, command: str | None,
           checkpoint: tuple[str, ...], gpus: int | None, max_attempts: int | None,
           priority: int, clusters: tuple[str, ...], trusted_only: bool | None, url: str | None,
           as_json: bool) -> None:
    """Pack DIRECTORY into a bundle, upload it and queue the job."""
    from relaymd.storage.bundle import BundleError, pack_directory

    spec = bundle_spec_for(directory, command, checkpoint, gpus, max_attempts)
    job_id = uuid.uuid4().hex
    with client_of(ctx, url) as client, tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle.tar.gz"
        try:
            info = pack_directory(directory, bundle, extra_files={
                "relaymd.yaml": yaml.safe_dump(spec, sort_keys=False).encode()})
        except BundleError as exc:
            die(f"{directory}: {exc}")
        if not as_json:
            click.echo(f"uploading {directory} ({info.size / 1e6:.1f} MB, {info.members} files)",
                       err=True)
        call(lambda: client.upload_bundle(job_id, bundle))
        job = call(lambda: client.create_job(JobCreate(
            id=job_id, title=title if title is not None else directory.resolve().name,
            max_attempts=max_attempts, gpus=gpus, priority=priority,
            preferred_clusters=list(clusters) or None, trusted_only=trusted_only or None)))
    if as_json:
        emit_json(job)
    else:
        click.echo(f"submitted job {job.id[:8]} ({job.title}): {job.status}")


JOB_COLUMN_MIN = {"ID": 8, "STATUS": 9, "PROGRESS": 10, "TITLE": 8}  # what 80 columns can keep


def jobs_table(jobs: list[Job]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "TITLE", "STATUS", "PROGRESS", "ATT", "CKPT", "WORKER", "AGE", "LAST CKPT"):
        table.add_column(col, no_wrap=True, overflow="ellipsis", min_width=JOB_COLUMN_MIN.get(col),
                         max_width=28 if col == "TITLE" else None)
    for j in jobs:
        table.add_row(j.id[:8], escape(j.title), styled(j.status), progress_text(j),
                      f"{j.attempt}", f"{j.checkpoints}", (j.worker_id or "-")[:8],
                      age(j.created_at), age(j.last_checkpoint_at))
    return table


@main.command()
@click.option("--status", "statuses", multiple=True,
              type=click.Choice([s.value for s in JobStatus]), help="only these states")
@url_option
@json_option
@click.pass_context
def jobs(ctx: click.Context, statuses: tuple[str, ...], url: str | None, as_json: bool) -> None:
    """List jobs."""
    with client_of(ctx, url) as client:
        listed = call(lambda: client.all_jobs(list(statuses) or None))
    if as_json:
        emit_json(listed)
    elif not listed:
        click.echo("no jobs")
    else:
        Console().print(jobs_table(listed))


@main.command()
@click.argument("job_ref")
@url_option
@json_option
@click.pass_context
def job(ctx: click.Context, job_ref: str, url: str | None, as_json: bool) -> None:
    """Show one job (a unique id prefix is enough): state, checkpoints, history."""
    with client_of(ctx, url) as client:
        detail = call(lambda: client.get_job(job_ref))
    if as_json:
        emit_json(detail)
        return
    out = Console()
    out.print(f"[bold]job {detail.id}[/]  {escape(detail.title)}")
    out.print(f"  status     {styled(detail.status)}   attempt {detail.attempt}   "
              f"failures {detail.failures}/{detail.max_attempts}")
    out.print(f"  command    {escape(detail.command)}")
    out.print(f"  progress   {progress_text(detail)}")
    out.print(f"  worker     {detail.worker_id or '-'}")
    if detail.preferred_clusters:
        out.print(f"  clusters   {escape(', '.join(detail.preferred_clusters))} only")
    if detail.trusted_only:
        out.print("  trust      trusted clusters only")
    if detail.queue_blocked_reason:
        out.print(f"  [yellow]waiting[/]    {escape(detail.queue_blocked_reason)}")
    out.print(f"  created    {detail.created_at:%Y-%m-%d %H:%M:%S} UTC ({age(detail.created_at)} ago)")
    if detail.last_failure:
        f = detail.last_failure
        out.print(f"  last failure (attempt {f.attempt}, exit {f.exit_code}): {escape(f.reason)}")
        for line in f.log_tail.splitlines()[-10:]:
            out.print(f"    | {line}", markup=False, highlight=False)
    if detail.checkpoint_list:
        table = Table("SEQ", "SIZE", "ATTEMPT", "WORKER", "AGE", "WRITTEN BY", box=None,
                      header_style="bold")
        for c in detail.checkpoint_list:
            table.add_row(str(c.seq), f"{c.size / 1e6:.2f} MB", str(c.attempt), c.worker_id[:8],
                          age(c.created_at), trust_text(c.trusted))
        out.print("  checkpoints")
        out.print(table)
    table = Table("TIME", "EVENT", "FROM", "TO", "ATT", "WORKER", "REASON", box=None,
                  header_style="bold")
    for e in detail.events:
        table.add_row(f"{e.at:%m-%d %H:%M:%S}", e.kind, e.from_status or "-", e.to_status or "-",
                      str(e.attempt or "-"), (e.worker_id or "-")[:8], escape(e.reason))
    out.print("  events")
    out.print(table)


def _transition(ctx: click.Context, job_ref: str, url: str | None, as_json: bool,
                verb: str, fn: Callable[[Client, str], Job]) -> None:
    with client_of(ctx, url) as client:
        changed = call(lambda: fn(client, job_ref))
    if as_json:
        emit_json(changed)
    else:
        click.echo(f"{verb} job {changed.id[:8]}: {changed.status}")


@main.command()
@click.argument("job_ref")
@url_option
@json_option
@click.pass_context
def cancel(ctx: click.Context, job_ref: str, url: str | None, as_json: bool) -> None:
    """Cancel a queued or running job (its worker is told to stop)."""
    _transition(ctx, job_ref, url, as_json, "cancelled", Client.cancel)


@main.command()
@click.argument("job_ref")
@url_option
@json_option
@click.pass_context
def requeue(ctx: click.Context, job_ref: str, url: str | None, as_json: bool) -> None:
    """Put a job back in the queue (failed and cancelled jobs get a fresh failure budget)."""
    _transition(ctx, job_ref, url, as_json, "requeued", Client.requeue)


def workers_table(workers: list[Worker]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "CLUSTER", "PROVIDER", "HOST", "COMPUTE", "GPUS", "STATUS", "JOB",
                "HEARTBEAT", "ALLOC LEFT"):
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    now = datetime.now(UTC)
    for w in workers:
        left = "-"
        if w.wall_time_end is not None:
            left = age(now, w.wall_time_end) if w.wall_time_end > now else "ended"
        table.add_row(w.id[:8], escape(w.cluster), w.provider, escape(w.hostname),
                      escape(w.compute_platform or "-"),
                      escape(f"{w.gpus} {w.gpu_model}".strip()), styled(w.status), (w.job_id or "-")[:8],
                      age(w.last_heartbeat_at, now), left)
    return table


def clusters_table(clusters: list[ClusterInfo]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("CLUSTER", "PROVIDER", "STRATEGY", "ON", "GPUS", "PENDING", "IDLE", "BUSY",
                "WAITING", "LAST DECISION"):
        table.add_column(col, no_wrap=col != "LAST DECISION")
    for c in clusters:
        decision = c.last_decision
        if c.last_submitted:
            decision = f"requested {c.last_submitted}: {decision}"
        if c.last_error:
            decision += f" [red]({escape(c.last_error)})[/]"
        if c.note:
            decision += f" [dim]{escape(c.note)}[/]"
        table.add_row(escape(c.name), c.provider, c.strategy,
                      "yes" if c.enabled else "[yellow]no[/]", str(c.gpus),
                      f"{c.pending}/{c.max_pending}", str(c.idle),
                      f"{c.busy}", str(c.waiting), decision)
    return table


@main.group(invoke_without_command=True)
@url_option
@json_option
@click.pass_context
def clusters(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List clusters: pending and active workers, and the last provisioning decision."""
    if ctx.invoked_subcommand is not None:
        return
    with client_of(ctx, url) as client:
        listed = call(client.clusters)
    if as_json:
        emit_json(listed)
    elif not listed:
        click.echo("no clusters (add them under `clusters:` in the config file)")
    else:
        Console().print(clusters_table(listed))


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


@main.group(invoke_without_command=True)
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
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("CLUSTER", "PROVIDER", "TRUSTED", "TOKEN"):
        table.add_column(col, no_wrap=True)
    for t in listed:
        table.add_row(escape(t["cluster"]), escape(t["provider"]),
                      "yes" if t["trusted"] else "[yellow]no[/]", escape(t["token"] or "-"))
    Console().print(table)


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


@main.command()
@url_option
@json_option
@click.pass_context
def workers(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List workers."""
    with client_of(ctx, url) as client:
        listed = call(client.workers)
    if as_json:
        emit_json(listed)
    elif not listed:
        click.echo("no workers")
    else:
        Console().print(workers_table(listed))



@main.command()
@click.argument("job_ref")
@click.option("--download", "download", is_flag=False, flag_value="", default=None,
              metavar="[DIR]", help="fetch, verify and extract a checkpoint into DIR "
              "(default ./JOBID-checkpoint-SEQ)")
@click.option("--seq", type=int, help="which checkpoint to download (default: the latest)")
@url_option
@json_option
@click.pass_context
def checkpoints(ctx: click.Context, job_ref: str, download: str | None, seq: int | None,
                url: str | None, as_json: bool) -> None:
    """List a job's stored checkpoints, or download one (sha256 checked) and extract it."""
    with client_of(ctx, url) as client:
        detail = call(lambda: client.get_job(job_ref))
    kept = detail.checkpoint_list
    if download is None:
        if seq is not None:
            die("--seq goes with --download")
        if as_json:
            emit_json(kept)
        elif not kept:
            click.echo(f"job {detail.id[:8]} has no checkpoints yet")
        else:
            table = Table("SEQ", "SIZE", "ATTEMPT", "WORKER", "CREATED", "PROGRESS", "SHA256",
                          "WRITTEN BY", box=None, header_style="bold")
            for c in kept:
                done = f"{c.progress.done:g}/{c.progress.total:g} {c.progress.unit}" \
                    if c.progress else "-"
                table.add_row(str(c.seq), f"{c.size / 1e6:.2f} MB", str(c.attempt), c.worker_id[:8],
                              f"{c.created_at:%Y-%m-%d %H:%M:%S}", done, c.sha256[:12],
                              trust_text(c.trusted))
            Console().print(table)
        return
    if not kept:
        die(f"job {detail.id[:8]} has no checkpoints to download")
    chosen = kept[-1] if seq is None else next((c for c in kept if c.seq == seq), None)
    if chosen is None:
        die(f"job {detail.id[:8]} has no checkpoint {seq}; stored: "
            f"{', '.join(str(c.seq) for c in kept)} (older ones are deleted after newer ones)")
    dest = Path(download or f"{detail.id[:12]}-checkpoint-{chosen.seq}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        die(f"{dest} exists and is not an empty directory; name another with --download DIR")
    from relaymd.storage import StorageError
    from relaymd.storage.bundle import BundleError, extract_bundle

    storage = settings_of(ctx).open_storage()
    with tempfile.TemporaryDirectory(prefix="relaymd-ckpt-") as tmp:
        archive = Path(tmp) / "checkpoint.tar.gz"
        try:
            storage.get_file(chosen.key, archive, expected_sha256=chosen.sha256)
            info = extract_bundle(archive, dest)
        except (StorageError, BundleError) as exc:
            die(f"checkpoint {chosen.seq} of job {detail.id[:8]}: {exc}")
    if as_json:
        click.echo(json.dumps({"job_id": detail.id, "seq": chosen.seq, "dir": str(dest.resolve()),
                               "sha256": chosen.sha256, "members": info.members}))
    else:
        click.echo(f"checkpoint {chosen.seq} of job {detail.id[:8]} (sha256 verified) extracted "
                   f"into {dest}/ ({info.members} entries)")


@main.command()
@click.argument("job_ref")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@url_option
@json_option
@click.pass_context
def purge(ctx: click.Context, job_ref: str, yes: bool, url: str | None, as_json: bool) -> None:
    """Delete a finished job everywhere: its record, checkpoints, bundle and logs. Irreversible."""
    with client_of(ctx, url) as client:
        if not yes:
            detail = call(lambda: client.get_job(job_ref))
            what = (f"job {detail.id} ({detail.title or 'untitled'}, {detail.status}, "
                    f"{len(detail.checkpoint_list)} stored checkpoint(s))")
            if not sys.stdin.isatty():
                die(f"refusing to purge {what} without --yes (no terminal to confirm on)")
            if not click.confirm(f"Delete {what} and every stored object of it? This cannot be "
                                 "undone", default=False):
                die("purge aborted; nothing deleted")
        result = call(lambda: client.purge(job_ref))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"purged job {result['job_id'][:8]}: {result['objects_deleted']} stored "
                   "object(s) deleted")


if __name__ == "__main__":
    main()

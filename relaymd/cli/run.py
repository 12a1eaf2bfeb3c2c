"""The long-running commands: the console (which hosts the orchestrator), `serve` (the same,
headless), `web` (the console in a browser) and `worker`. Server, console and worker code is
imported inside each command, so the scripting commands start without it."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import click

from relaymd.cli.common import die, settings_of, url_option
from relaymd.client import ApiError, discover_token, discover_url


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


@click.command()
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

    # Under `relaymd web` a Textual driver other than the terminal's (TEXTUAL_DRIVER) runs it.
    if not os.environ.get("TEXTUAL_DRIVER") and (not sys.stdin.isatty() or not sys.stdout.isatty()):
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


@click.command()
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


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface to listen on; keep it loopback and reach it through `ssh -L`")
@click.option("--port", type=int, default=8766, show_default=True, help="port to listen on")
@url_option
@click.pass_context
def web(ctx: click.Context, host: str, port: int, url: str | None) -> None:
    """Serve the console to a browser: each tab runs `relaymd console --connect URL`.

    \b
    By default it listens on loopback only; from your own machine:
      ssh -L 8766:127.0.0.1:8766 ORCHESTRATOR-HOST
    then open http://127.0.0.1:8766/ and enter the operator token (a POSTed form, never a URL).
    """
    try:
        from relaymd.tui.web import WebConsole, check_reachable, listen
    except ImportError as exc:
        die(f"the web console needs textual-serve ({exc}); pip install textual-serve")

    settings = settings_of(ctx, url=url)
    orchestrator = discover_url(settings)
    try:
        check_reachable(orchestrator)
    except ApiError as exc:
        die(exc.message)
    try:
        sock = listen(host, port)
    except OSError as exc:
        die(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    config = (ctx.find_root().obj or {}).get("config")  # the consoles load the same settings
    env = {"RELAYMD_CONFIG": str(config)} if config else {}
    WebConsole(orchestrator, host, port, env).run(sock)


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


@click.command()
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
    from relaymd.config import WorkerSettings
    from relaymd.worker.logs import setup_worker_logging
    from relaymd.worker.main import run_worker
    from relaymd.worker.tailscale import TailscaleError

    settings = settings_of(ctx, WorkerSettings, url=url, worker_idle=idle,
                           worker_workdir=workdir)
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

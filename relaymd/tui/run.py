"""Running the console: the orchestrator and the Textual app share one event loop (uvicorn is
started before the app, so a taken port or a second orchestrator is a plain error printed before
the screen switches), log records go to the log pane and the log file, never to the terminal."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from relaymd.config import OrchestratorSettings

log = logging.getLogger("relaymd.console")


async def run_console(settings: OrchestratorSettings, demo: bool = False) -> None:
    from relaymd.server.orchestrator import Orchestrator
    from relaymd.tui.app import PanelHandler, RelayApp
    from relaymd.tui.source import ServiceSource

    orch = Orchestrator(settings)
    await orch.start()  # OrchestratorError (port taken, database locked) before the screen opens
    app = RelayApp(ServiceSource(orch))
    handler = PanelHandler(app)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, app.exit)
    demo_task: asyncio.Task[Any] | None = None
    if demo:
        demo_task = loop.create_task(_demo(settings, orch.url))
    try:
        log.info("orchestrator on %s; log file %s", orch.url, settings.log_path)
        await app.run_async()
    finally:
        root.removeHandler(handler)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if demo_task is not None:
            demo_task.cancel()
        print("relaymd: stopping the orchestrator (local workers hand their jobs back) ...",
              flush=True)
        await orch.stop()


async def _demo(settings: OrchestratorSettings, url: str) -> None:
    from relaymd.demo import submit_demo

    try:
        await asyncio.to_thread(submit_demo, settings, url, lambda line: log.info("%s", line))
    except Exception as exc:
        log.error("demo: could not submit the example job: %s", exc)


async def run_remote(url: str, token: str) -> None:
    from relaymd.client import Client
    from relaymd.tui.app import PanelHandler, RelayApp
    from relaymd.tui.source import HttpSource

    with Client(url, token) as client:
        client.health()  # unreachable or refused: a plain error before the screen opens
        app = RelayApp(HttpSource(client), poll=2.0)
        # The log pane shows this console's own lines (failed requests, refused actions); the
        # orchestrator's log stays on its machine.
        handler = PanelHandler(app)
        root = logging.getLogger()
        root.addHandler(handler)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
        logging.getLogger("relaymd").setLevel(logging.INFO)
        try:
            log.info("connected to the orchestrator at %s (its own log is on its machine)", url)
            await app.run_async()
        finally:
            root.removeHandler(handler)

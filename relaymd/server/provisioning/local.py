"""The `local` provider: `relaymd worker` processes on the orchestrator's own machine.

Every cycle it reaps workers that have exited and, when jobs are queued and no registered worker
is idle, starts one more (up to `local_workers`). A worker it started gets a few seconds to
register and claim before the next may start, so one queued job never spawns a crowd. Workers
run in their own sessions (a Ctrl+C meant for the console does not reach them) and log to
`{home}/logs/worker-N.log`. On stop they get SIGTERM, hand their jobs back with a last
checkpoint while the API is still up, and are killed only if they overrun the hand-off wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from relaymd.config import Settings
from relaymd.server.service import Service

log = logging.getLogger(__name__)

SPAWN_GRACE = 5.0  # seconds a new worker has to register and claim before another may start


@dataclass
class LocalWorker:
    number: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float


class LocalProvider:
    def __init__(self, settings: Settings, service: Service, url: str) -> None:
        self.settings = settings
        self.service = service
        self.url = url
        self.max_workers = settings.local_workers
        self.workers: list[LocalWorker] = []
        self.started_total = 0
        self.log_dir = settings.home / "logs"

    @property
    def live(self) -> int:
        return sum(1 for w in self.workers if w.proc.poll() is None)

    def reap(self) -> None:
        for w in list(self.workers):
            code = w.proc.poll()
            if code is not None:
                self.workers.remove(w)
                log.info("local worker %d (pid %d) exited with %d; log %s", w.number,
                         w.proc.pid, code, w.log_path)

    async def cycle(self) -> None:
        """Reap, then start a worker if queued work has nobody to run it."""
        self.reap()
        if self.max_workers <= 0 or len(self.workers) >= self.max_workers:
            return
        if any(time.monotonic() - w.started < SPAWN_GRACE for w in self.workers):
            return
        jobs, workers = await self.service.counts()
        if jobs.get("queued", 0) == 0 or workers.get("idle", 0) > 0:
            return
        self.spawn()

    def spawn(self) -> LocalWorker:
        self.started_total += 1
        number = self.started_total
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"worker-{number}.log"
        env = {**os.environ, **self.settings.storage_env(), "RELAYMD_HOME": str(self.settings.home),
               "RELAYMD_URL": self.url, "RELAYMD_PLATFORM": "local",
               "RELAYMD_WORKER_IDLE": "immediate_exit"}
        env.pop("RELAYMD_TOKEN", None)  # the worker registers with the bootstrap token
        with open(log_path, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "relaymd", "worker"], env=env,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        worker = LocalWorker(number, proc, log_path, time.monotonic())
        self.workers.append(worker)
        log.info("started local worker %d (pid %d) for queued work; log %s", number, proc.pid,
                 log_path)
        return worker

    async def stop(self, wait: float | None = None) -> None:
        """SIGTERM every live worker, wait for their hand-offs, SIGKILL what is left."""
        wait = self.settings.shutdown_wait + 10 if wait is None else wait
        live = [w for w in self.workers if w.proc.poll() is None]
        for w in live:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        if live:
            log.info("waiting up to %.0fs for %d local worker(s) to hand back their jobs",
                     wait, len(live))
        deadline = time.monotonic() + wait
        while any(w.proc.poll() is None for w in live) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        for w in live:
            if w.proc.poll() is None:
                log.warning("local worker %d did not stop in %.0fs; killing it", w.number, wait)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait()
        self.reap()

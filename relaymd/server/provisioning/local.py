"""The `local` provider: `relaymd worker` processes on the orchestrator's own machine.

Every cycle it reaps workers that have exited; a started worker counts as pending until it has
registered, so one queued job never spawns a crowd; the provisioning loop's strategy (reactive
by default, up to `local_workers`) decides when to start one more. Workers run in their own
sessions (a Ctrl+C meant for the console does not reach them) and log to
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaymd.config import ENV_PREFIX, LOCAL_CLUSTER, ClusterConfig, OrchestratorSettings, WorkerSettings
from relaymd.models import LIVE_WORKER_STATES
from relaymd.server.provisioning.base import Seen
from relaymd.server.service import Service

log = logging.getLogger(__name__)


def local_gpus() -> int:
    """GPUs on this machine (`nvidia-smi -L`), 0 when there is no driver: what a local worker
    will offer, so the loop knows which queued jobs it can take."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """This process's environment less the orchestrator's own RELAYMD_* settings (the operator
    token, the Salad key, ...): a worker is given only what a worker reads."""
    return {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX) or k == "RELAYMD_CONFIG"
            or k[len(ENV_PREFIX):].lower() in WorkerSettings.model_fields}


def local_cluster(settings: OrchestratorSettings) -> ClusterConfig:
    """The cluster the embedded default provisions: this machine, `local_workers` at most."""
    return ClusterConfig(name=LOCAL_CLUSTER,
                         provider="local", strategy="reactive", max_pending=1,
                         max_workers=settings.local_workers)


@dataclass
class LocalWorker:
    number: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float


class LocalProvider:
    def __init__(self, settings: OrchestratorSettings, service: Service, url: str,
                 cluster: ClusterConfig | None = None,
                 token: Callable[[], str] | None = None) -> None:
        self.cluster = cluster or local_cluster(settings)
        self.token = token  # the cluster's bootstrap token (None: the worker finds its own)
        self.settings = settings
        self.service = service
        self.url = url
        self.gpus = local_gpus()
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

    async def reconcile(self, workers: list[dict[str, Any]]) -> Seen:
        self.reap()
        registered = sum(1 for w in workers if w["status"] in LIVE_WORKER_STATES)
        pending = max(0, self.live - registered)
        return Seen(pending=pending, details={"processes": self.live, "gpus": self.gpus})

    async def submit(self, count: int) -> int:
        for _ in range(count):
            self.spawn()
        return count

    async def scale_in(self, workers: list[dict[str, Any]]) -> None:
        """Idle local workers exit by themselves (immediate_exit)."""

    def spawn(self) -> LocalWorker:
        self.started_total += 1
        number = self.started_total
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"worker-{number}.log"
        env = {**worker_environment(os.environ), **self.settings.storage_env(),
               "RELAYMD_HOME": str(self.settings.home), "RELAYMD_URL": self.url,
               "RELAYMD_CLUSTER": self.cluster.name, "RELAYMD_WORKER_IDLE": "immediate_exit"}
        if self.token is not None:
            env["RELAYMD_WORKER_TOKEN"] = self.token()
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

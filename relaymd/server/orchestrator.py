"""The orchestrator runtime: store + storage + service + uvicorn + scheduler on one event loop.

Both the console and `relaymd serve` build one `Orchestrator` and `await start()` / `stop()` it
on their own loop. uvicorn runs as an asyncio task on a socket bound here (so "port in use" is a
plain error before anything else starts) and never installs signal handlers or logs to the
terminal. A lock file next to the database refuses a second orchestrator on the same data.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import logging.handlers
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from relaymd.config import ClusterConfig, OrchestratorSettings
from relaymd.fsutil import private_dir, private_path
from relaymd.secrets import redact_logs
from relaymd.server.api import create_app
from relaymd.server.auth import Authenticator, Tokens, load_or_create_tokens
from relaymd.server.metrics import Metrics
from relaymd.server.provisioning.base import Provider, ProviderError
from relaymd.server.provisioning.local import LocalProvider, local_cluster
from relaymd.server.provisioning.provisioner import Provisioner, build_provider
from relaymd.server.service import Service
from relaymd.server.store import Store

log = logging.getLogger(__name__)
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "gpfs", "lustre", "cifs", "smb2", "fuse.sshfs", "beegfs"}


class OrchestratorError(Exception):
    """Cannot start: port taken, database owned by another orchestrator, bad storage."""


class EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The host (console or `relaymd serve`) owns SIGINT/SIGTERM/SIGHUP.
        yield


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose every file is 0600: the log names jobs, workers and hosts. `_open`
    runs for the first file and again for each fresh one after a rollover."""

    def _open(self) -> Any:
        private_path(Path(self.baseFilename))
        return super()._open()


def setup_file_logging(path: Path, level: int = logging.INFO) -> None:
    """Log to a rotating file only: nothing may write to the terminal under the console."""
    private_dir(path.parent, fix_existing=False)
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == str(path) for h in root.handlers):
        return
    handler = PrivateRotatingFileHandler(path, maxBytes=10 << 20, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # APScheduler logs every run of every job at INFO: the provisioning cycle alone would
    # write tens of thousands of lines a day.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.captureWarnings(True)


def filesystem_type(path: Path) -> str | None:
    """The mount type holding `path` (Linux /proc/mounts), for the network-filesystem warning."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


class Orchestrator:
    def __init__(self, settings: OrchestratorSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.store = Store(settings.database_path)
        self.metrics = Metrics()
        self.host = settings.host
        self.port = settings.port
        self.service: Service | None = None
        self.server: EmbeddedServer | None = None
        self.scheduler: AsyncIOScheduler | None = None
        self.provisioner: Provisioner | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._server_error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ start / stop

    def _take_lock(self) -> None:
        path = self.settings.database_path.with_name(self.settings.database_path.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise OrchestratorError(
                f"{self.settings.database_path}: another orchestrator is running on this database"
                f" ({owner or 'owner unknown'}); stop it first, or point RELAYMD_HOME elsewhere"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto must say TCP: asyncio sets TCP_NODELAY on accepted sockets only when it does,
        # and without it every response waits ~40 ms on the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OrchestratorError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror}; is another "
                "orchestrator running? choose another port with --port or RELAYMD_PORT"
            ) from None
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        return sock

    async def start(self) -> None:
        settings = self.settings
        # 0700 even if it already existed or the umask is loose: on a shared login node the
        # other users must not read the database, tokens, log or stored bundles under it.
        private_dir(settings.home)
        self._take_lock()
        try:
            fs = filesystem_type(settings.database_path.parent)
            if fs in NETWORK_FILESYSTEMS:
                log.warning("database %s is on a network filesystem (%s): SQLite WAL is unsafe "
                            "there; move RELAYMD_HOME/database to local disk",
                            settings.database_path, fs)
            try:
                storage = settings.open_storage()
            except Exception as exc:
                raise OrchestratorError(f"storage {settings.storage}: {exc}") from None
            clusters = self._clusters()
            names = [c.name for c in clusters]
            tokens = load_or_create_tokens(settings, names)
            redact_logs([*settings.secret_values(), tokens.operator,
                         *tokens.bootstrap().values()])
            sock = self._bind()
            await self.store.open()
            self.service = Service(settings, self.store, storage,
                                   Authenticator(tokens, active=set(names)), self.clock,
                                   clusters=clusters)
            await self.service.load()
            app = create_app(self.service, self.metrics, lambda: self.provisioner)
            config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=5, server_header=False,
                                    proxy_headers=False, date_header=False)
            self.server = EmbeddedServer(config)
            self._task = asyncio.create_task(self._serve(sock), name="relaymd-api")
            while not self.server.started:
                if self._task.done():
                    raise OrchestratorError(f"API server failed to start: {self._server_error!r}")
                await asyncio.sleep(0.01)
            self.scheduler = AsyncIOScheduler(timezone="UTC")
            self.scheduler.add_job(self.service.reap, "interval", seconds=settings.reap_interval,
                                   id="reap", coalesce=True, max_instances=1,
                                   replace_existing=True)
            self.provisioner = self._provisioner(clusters, tokens)
            await self.provisioner.load()
            self.scheduler.add_job(self.provisioner.cycle, "interval",
                                   seconds=settings.provision_interval, id="provision",
                                   coalesce=True, max_instances=1, replace_existing=True)
            self.scheduler.start()
            self._write_endpoint()
            log.info("orchestrator listening on %s (database %s, storage %s)", self.url,
                     settings.database_path, settings.storage)
        except BaseException:
            await self.stop()
            raise

    @property
    def provider(self) -> LocalProvider | None:
        """The local provider, when this orchestrator starts workers on its own machine."""
        return self.provisioner.local if self.provisioner is not None else None

    def _clusters(self) -> list[ClusterConfig]:
        """The configured clusters, plus this machine's when it runs local workers."""
        settings = self.settings
        clusters = list(settings.clusters)
        if settings.local_workers > 0 and not any(c.provider == "local" for c in clusters):
            local = local_cluster(settings)
            if any(c.name == local.name for c in clusters):
                local = local.model_copy(update={"name": "local-machine"})
            clusters.append(local)
        return clusters

    def _provisioner(self, clusters: list[ClusterConfig], tokens: Tokens) -> Provisioner:
        settings = self.settings
        assert self.service is not None
        providers: dict[str, Provider] = {}
        for c in clusters:
            try:
                providers[c.name] = build_provider(c, settings, self.service, self.url, tokens)
            except ProviderError as exc:
                raise OrchestratorError(str(exc)) from None
        return Provisioner(settings, self.service, clusters, providers, self.clock)

    async def _serve(self, sock: socket.socket) -> None:
        assert self.server is not None
        try:
            await self.server.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn sys.exit()s on startup failure
            self._server_error = exc
        except BaseException as exc:
            self._server_error = exc
            raise

    def _write_endpoint(self) -> None:
        path = self.settings.endpoint_file
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"url": self.url, "pid": os.getpid()}))
        os.replace(tmp, path)

    async def stop(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
            await asyncio.sleep(0)
        if self.provisioner is not None:  # while the API is up: their hand-offs need it
            await self.provisioner.stop()
        if self.server is not None and self._task is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=10)
        if self.service is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.service.drain(), timeout=30)
            with contextlib.suppress(Exception):
                await self.service.flush()
        if self.store.db is not None:
            await self.store.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                data: dict[str, Any] = json.loads(self.settings.endpoint_file.read_text())
                if data.get("pid") == os.getpid():
                    self.settings.endpoint_file.unlink()
        self._release_lock()
        log.info("orchestrator stopped")


async def serve_until_signalled(settings: OrchestratorSettings, demo: bool = False) -> None:
    """`relaymd serve`: run until SIGINT/SIGTERM, then stop gracefully. With `demo`, queue the
    example OpenMM job when no work is queued or running."""
    import signal

    orch = Orchestrator(settings)
    await orch.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    print(f"relaymd orchestrator on {orch.url} (Ctrl+C to stop; log: {settings.log_path})",
          flush=True)
    try:
        if demo:
            from relaymd.demo import submit_demo

            def say(line: str) -> None:
                print(line, flush=True)

            try:
                await asyncio.to_thread(submit_demo, settings, orch.url, say)
            except Exception as exc:  # the orchestrator itself is fine: keep serving
                log.exception("demo job could not be submitted")
                say(f"demo: could not submit the example job: {exc}")
        await stop.wait()
    finally:
        await orch.stop()

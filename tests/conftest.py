"""Shared fixtures: a real orchestrator (uvicorn on a loopback port, SQLite file, file:// storage)
running on its own event loop in a background thread, and clients that talk to it over HTTP."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

os.environ.pop("NO_COLOR", None)  # changes Textual snapshots

# Property tests explore new examples on every developer's run (that is how the API fuzzer found
# its bugs); in CI (CI=true) they replay a fixed sequence, so a pass or a failure there is the
# commit's, not the luck of the draw. A failure found locally is kept in .hypothesis/ and replayed.
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

from relaymd.client import Client  # noqa: E402
from relaymd.config import OrchestratorSettings  # noqa: E402
from relaymd.models import JobCreate, WorkerRegister  # noqa: E402
from relaymd.server.orchestrator import Orchestrator  # noqa: E402
from relaymd.storage.bundle import pack_directory  # noqa: E402

# Each test file's layer (default: integration). `make test-fast` leaves out `system`.
LAYERS = {
    "unit": {
        "test_bundle.py", "test_transitions.py", "test_scheduling.py", "test_config.py",
        "test_secrets.py", "test_worker_units.py", "test_deploy_files.py", "test_docs.py",
        "test_state_properties.py", "test_usage.py",
    },
    "system": {
        "test_worker.py", "test_slurm.py", "test_chaos.py", "test_crash_safety.py",
        "test_console_tmux.py", "test_bench_smoke.py", "test_bench_md_smoke.py",
        "test_bench_storage_smoke.py", "test_bench_gpu_smoke.py", "test_binary.py", "test_disk_full.py",
        "test_storage_outage.py", "test_openmm.py", "test_hostile_workers.py",
        "test_local_provider.py", "test_tailscale.py", "test_images.py", "test_outputs.py",
        "test_web.py", "test_bench_outputs_smoke.py", "test_atom.py",
    },
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        layer = next((k for k, files in LAYERS.items() if name in files), "integration")
        item.add_marker(getattr(pytest.mark, layer))


class FakeClock:
    """A settable wall clock for deterministic liveness tests."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RunningOrchestrator:
    def __init__(self, settings: OrchestratorSettings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.orch = Orchestrator(settings, clock) if clock else Orchestrator(settings)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.orch.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> RunningOrchestrator:
        self.thread.start()
        self._ready.wait(30)
        if self._error:
            raise self._error
        return self

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the orchestrator's loop (e.g. `service.reap()`) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.call(self.orch.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop.close()

    @property
    def url(self) -> str:
        return self.orch.url

    @property
    def service(self) -> Any:
        return self.orch.service

    def tokens(self) -> dict[str, Any]:
        import json

        return dict(json.loads(self.settings.tokens_path.read_text()))

    def bootstrap_token(self, cluster: str | None = None) -> str:
        """The bootstrap token of `cluster` (default: this machine's, "local")."""
        tokens = self.tokens()
        if cluster in (None, "local"):
            return str(tokens["worker"])
        token = tokens.get("clusters", {}).get(cluster)
        assert token, f"no bootstrap token for cluster {cluster!r}: configure it in `clusters`"
        return str(token)

    def operator(self) -> Client:
        return Client(self.url, self.tokens()["operator"])

    def worker(self, **register: Any) -> tuple[Client, str]:
        """Register a worker with the token of the cluster it names."""
        client = Client(self.url, self.bootstrap_token(register.get("cluster")))
        reg = client.register(WorkerRegister(**{"hostname": "test", "gpus": 1, **register}))
        client.set_token(reg.token)
        return client, reg.worker_id


def free_port() -> int:
    """A loopback port free right now (for a server a test starts in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(home: Path, **kw: Any) -> OrchestratorSettings:
    kw.setdefault("local_workers", 0)  # tests start the workers they want themselves
    return OrchestratorSettings(home=home, host="127.0.0.1", port=0, reap_interval=3600, **kw)


@pytest.fixture
def settings(tmp_path: Path) -> OrchestratorSettings:
    return make_settings(tmp_path / "home")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(settings: OrchestratorSettings, clock: FakeClock) -> Iterator[RunningOrchestrator]:
    running = RunningOrchestrator(settings, clock).start()
    yield running
    running.stop()


def write_job_dir(root: Path, command: str = "python run.py", **spec: Any) -> Path:
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    (root / "run.py").write_text("print('hello')\n")
    (root / "relaymd.yaml").write_text(yaml.safe_dump({"command": command, **spec}))
    return root


def submit(op: Client, tmp_path: Path, title: str = "", **create: Any) -> str:
    """Pack a small job dir, upload it and create the job; returns the job id."""
    job_id = uuid.uuid4().hex
    src = write_job_dir(tmp_path / f"src-{job_id[:8]}")
    bundle = tmp_path / f"{job_id}.tar.gz"
    pack_directory(src, bundle)
    op.upload_bundle(job_id, bundle)
    op.create_job(JobCreate(id=job_id, title=title, **create))
    return job_id


# --------------------------------------------------------------------------- S3 servers


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Any]:
    from .s3servers import start_moto

    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server() -> Iterator[Any]:
    from .s3servers import start_seaweedfs

    server = start_seaweedfs()
    yield server
    server.stop()


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_server(request: pytest.FixtureRequest) -> Any:
    """Each S3 test runs on both servers: moto (fast) and SeaweedFS (checks signatures)."""
    return request.getfixturevalue(f"{request.param}_server")


def s3_settings(server: Any, home: Path, **kw: Any) -> OrchestratorSettings:
    """OrchestratorSettings whose storage is a fresh bucket on `server`."""
    return make_settings(home, storage_url=f"s3://{server.new_bucket()}/relaymd",
                         s3_endpoint_url=server.url, s3_access_key_id=server.key,
                         s3_secret_access_key=server.secret, **kw)

"""Regenerate the README's pictures of the console in a browser:

    .venv/bin/python docs/screenshots.py

It starts a real orchestrator (`relaymd serve`) in a temporary RELAYMD_HOME with two SLURM
clusters (`delta`, whose stand-in sbatch/squeue keep its one allocation PENDING (Priority), and
`bridges2`, switched off), submits nine jobs through the API and plays their workers over the
API (claims, heartbeats with progress, checkpoints, a completion, a failure, a hand-back, a
cancel), then serves the console with `relaymd web` on a free loopback port, logs in with
Playwright and Debian's headless chromium, and saves docs/images/web-console.png (jobs view) and
docs/images/clusters-view.png (clusters view). Nothing else is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, sync_playwright

from relaymd.client import Client
from relaymd.config import load_settings
from relaymd.models import CheckpointReport, Progress, WorkerRegister
from relaymd.storage import open_storage
from relaymd.submitting import build_spec, submit_directory

IMAGES = Path(__file__).resolve().parent / "images"
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1200, "height": 700}
# The console draws on a canvas: what it shows is read from the websocket, escapes stripped.
ESCAPES = re.compile(rb"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|.)")

CONFIG = """\
port: {port}
local_workers: 0
heartbeat_timeout: 900   # the scripted workers below beat only now and then
clusters:
  - name: delta
    provider: slurm
    max_pending: 1
    slurm: {{partition: gpuA100x4, account: bbka-delta-gpu, time: "48:00:00", gpus: 4,
            bin_dir: {bin}}}
  - name: bridges2
    provider: slurm
    enabled: false
    slurm: {{partition: GPU-shared, time: "48:00:00", gpus: 1, bin_dir: {bin}}}
"""
# Stand-ins for SLURM's commands: sbatch takes the script, squeue says every job still waits.
SBATCH = "#!/bin/sh\ncat >/dev/null\necho 4242017\n"
SQUEUE = """#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = -j ] && ids=$2; shift; done
for id in $(echo "$ids" | tr , ' '); do echo "$id|PENDING|Priority"; done
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(ok: Callable[[], Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            sys.exit(f"screenshots: timed out waiting for {what}")
        time.sleep(0.2)


@contextmanager
def running(args: list[str], env: dict[str, str], log: Path, port: int) -> Iterator[None]:
    """`relaymd ARGS` in the background until it listens on `port`; SIGTERM at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relaymd", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)

    def listening() -> bool:
        if proc.poll() is not None:
            sys.exit(f"screenshots: relaymd {args[0]} exited:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    try:
        wait(listening, f"relaymd {args[0]} to listen")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


class Fleet:
    """Jobs submitted through the API and the workers that play them, over the API too."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.settings = load_settings(environ=env)
        self.tokens = json.loads(self.settings.tokens_path.read_text())
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.op = Client(self.url, self.tokens["operator"])
        self.storage = open_storage(self.settings.storage)
        self.src = home / "job"
        self.src.mkdir()
        (self.src / "system.xml").write_text("<System/>\n")

    def submit(self, title: str, gpus: int = 1, max_attempts: int | None = None) -> str:
        spec = build_spec(self.src, "python -m relaymd.engines.openmm --system system.xml "
                          "--integrator integrator.xml --state state.xml --ns 50",
                          ["checkpoint.*"], gpus, max_attempts)
        return submit_directory(self.op, self.src, spec, title, gpus, max_attempts).id

    def worker(self, host: str, gpus: int, model: str, hours_left: float) -> tuple[Client, str]:
        client = Client(self.url, self.tokens["clusters"]["delta"])
        end = datetime.now(UTC) + timedelta(hours=hours_left)
        reg = client.register(WorkerRegister(name=host, hostname=host, gpus=gpus, gpu_model=model,
                                             compute_platform="CUDA", wall_time_end=end))
        client.set_token(reg.token)
        return client, reg.worker_id

    def run(self, worker: tuple[Client, str], job_id: str, ns: list[float], total: float,
            rate: float) -> int:
        """Claim `job_id`, then a checkpoint at each of `ns`; returns the attempt."""
        client, wid = worker
        claim = client.claim()
        assert claim is not None and claim.job.id == job_id, claim
        client.heartbeat(wid, job_id, claim.attempt, Progress(done=0, total=total, unit="ns"))
        for done in ns:
            data = os.urandom(4096 * int(1 + done))
            reserved = client.reserve_checkpoint(job_id, claim.attempt)
            self.storage.put_bytes(reserved.key, data)
            client.report_checkpoint(job_id, CheckpointReport(
                attempt=claim.attempt, seq=reserved.seq, sha256=hashlib.sha256(data).hexdigest(),
                size=len(data), progress=Progress(done=done, total=total, unit="ns",
                                                  ns_per_day=rate)))
        return claim.attempt


def populate(fleet: Fleet) -> Callable[[], None]:
    """Nine jobs in every state, run by workers of cluster delta; returns what keeps the
    running ones' heartbeats fresh."""
    spare = fleet.worker("gpub041", 4, "NVIDIA A100", 0.5)
    for title, ns, total in (("t4-lysozyme-l99a", [5, 10, 15, 20], 20),
                             ("kras-g12c-apo", [25, 50], 50)):
        job_id = fleet.submit(title, gpus=4)
        spare[0].complete(job_id, fleet.run(spare, job_id, ns, total, 151.0))
    job_id = fleet.submit("hsp90-series-b", gpus=4, max_attempts=1)
    spare[0].fail(job_id, fleet.run(spare, job_id, [0.5], 10, 160.0), 1, "engine exited 1",
                  log_tail="openmm.OpenMMException: Particle coordinate is NaN.\n")
    spare[0].deregister(spare[1])  # an idle worker with as many GPUs would get the next jobs
    fleet.op.cancel(fleet.submit("scratch-test"))

    running = []
    for title, host, gpus, hours_left, ns, total, rate in (
            ("abl1-complex-fep", "gpua017", 4, 39.5, [8, 16, 24, 31], 50, 142.0),
            ("villin-nvt", "gpua052", 1, 6.2, [2.4, 4.8], 20, 612.0)):
        worker = fleet.worker(host, gpus, "NVIDIA A100", hours_left)
        job_id = fleet.submit(title, gpus=gpus)
        attempt = fleet.run(worker, job_id, ns, total, rate)
        running.append((worker, job_id, attempt, Progress(done=ns[-1] + 0.4, total=total,
                                                          unit="ns", ns_per_day=rate)))
    # Handed back at the end of its allocation: queued again, resumes from 2 of 10 ns.
    ending = fleet.worker("gpub063", 4, "NVIDIA A100", 0.1)
    job_id = fleet.submit("brd4-ligand-12", gpus=4)
    ending[0].release(job_id, fleet.run(ending, job_id, [1, 2], 10, 160.0), "allocation ending")
    ending[0].deregister(ending[1])
    for title in ("brd4-ligand-13", "brd4-ligand-14"):
        fleet.submit(title, gpus=4)

    def beat() -> None:
        for (client, wid), job_id, attempt, progress in running:
            client.heartbeat(wid, job_id, attempt, progress)
    return beat


def screen_text(frames: list[bytes]) -> str:
    return ESCAPES.sub(b"", b"".join(frames)).decode("utf-8", "replace")


def on_screen(page: Page, frames: list[bytes], needle: str) -> None:
    deadline = time.monotonic() + 30
    while needle not in screen_text(frames):
        if time.monotonic() > deadline:
            sys.exit(f"screenshots: {needle!r} never appeared:\n{screen_text(frames)[-2000:]}")
        page.wait_for_timeout(100)  # Playwright delivers the websocket's frames meanwhile


def shoot(page: Page, frames: list[bytes], needle: str, path: Path) -> None:
    on_screen(page, frames, needle)
    page.wait_for_timeout(1500)  # let the frame settle and xterm.js paint it
    page.screenshot(path=str(path))
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relaymd-shots-")))
        bin_dir = home / "slurm-bin"
        bin_dir.mkdir()
        for name, text in (("sbatch", SBATCH), ("squeue", SQUEUE)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        api_port, web_port = free_port(), free_port()
        (home / "config.yaml").write_text(CONFIG.format(port=api_port, bin=bin_dir))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYMD_")}
        env.update(RELAYMD_HOME=str(home), RELAYMD_CONFIG=str(home / "config.yaml"),
                   HOME=str(home), TZ="UTC", PYTHONUNBUFFERED="1")
        stack.enter_context(running(["serve"], env, home / "serve.log", api_port))
        fleet = Fleet(home, env)
        beat = populate(fleet)
        wait(lambda: any("Priority" in (c.note or "") for c in fleet.op.clusters()),
             "delta's allocation to be PENDING (Priority)")
        stack.enter_context(running(["web", "--port", str(web_port)], env, home / "web.log",
                                    web_port))

        frames: list[bytes] = []
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport=VIEWPORT)
        page.on("websocket", lambda ws: ws.on("framereceived", lambda data: frames.append(
            data if isinstance(data, bytes) else data.encode())))
        page.goto(f"http://127.0.0.1:{web_port}/login")
        page.fill("#token", fleet.tokens["operator"])
        with page.expect_navigation(url=f"http://127.0.0.1:{web_port}/"):
            page.click("#login")
        page.focus(".xterm-helper-textarea")
        beat()
        shoot(page, frames, "brd4-ligand-14", IMAGES / "web-console.png")
        page.keyboard.press("2")
        beat()
        shoot(page, frames, "provider says", IMAGES / "clusters-view.png")
        browser.close()


if __name__ == "__main__":
    main()

"""The worker as a real process against a real orchestrator, running a real engine subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relaymd.client import Client
from relaymd.models import JobCreate
from relaymd.storage import open_storage
from relaymd.storage.bundle import pack_directory

from .conftest import RunningOrchestrator, make_settings

ENGINE = Path(__file__).parent / "engines" / "stepper.py"
A, M = 1103515245, 2**31


def expected_result(total: int) -> int:
    x = 1
    for n in range(total):
        x = (A * x + n) % M
    return x


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[RunningOrchestrator]:
    settings = make_settings(tmp_path / "home", heartbeat_interval=0.3, heartbeat_timeout=2.0)
    settings.reap_interval = 0.3
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()


def submit_stepper(orch: RunningOrchestrator, tmp_path: Path, *, total: int = 60,
                   step_s: float = 0.03, every: int = 10, env: dict[str, str] | None = None,
                   max_attempts: int = 3) -> str:
    job_id = uuid.uuid4().hex
    src = tmp_path / f"job-{job_id[:6]}"
    src.mkdir()
    (src / "stepper.py").write_text(ENGINE.read_text())
    vars_ = {"TOTAL": total, "STEP_S": step_s, "EVERY": every, "STEPS_LOG": str(
        tmp_path / f"steps-{job_id[:6]}.log"), **(env or {})}
    command = " ".join(f"{k}={v}" for k, v in vars_.items()) + f" {sys.executable} stepper.py"
    (src / "relaymd.yaml").write_text(yaml.safe_dump({
        "command": command, "progress": "progress.json", "max_attempts": max_attempts,
        "checkpoint": {"paths": ["state.json", "result.json"], "poll_seconds": 0.1},
        "resources": {"gpus": 0}}))
    bundle = tmp_path / f"{job_id}.tar.gz"
    pack_directory(src, bundle)
    op = orch.operator()
    op.upload_bundle(job_id, bundle)
    op.create_job(JobCreate(id=job_id, title="stepper"))
    return job_id


def start_worker(orch: RunningOrchestrator, tmp_path: Path, name: str = "w",
                 **env: str) -> subprocess.Popen[str]:
    full = {**os.environ, "RELAYMD_HOME": str(orch.settings.home), "RELAYMD_URL": orch.url,
            "RELAYMD_WORKER_WORKDIR": str(tmp_path / f"work-{name}"),
            "RELAYMD_WORKER_IDLE": "immediate_exit", **env}
    full.pop("RELAYMD_CONFIG", None)
    log = open(tmp_path / f"worker-{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-m", "relaymd", "worker"], env=full,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def final_result(orch: RunningOrchestrator, job_id: str, tmp_path: Path) -> dict[str, int]:
    detail = orch.operator().get_job(job_id)
    latest = detail.checkpoint_list[-1]
    dest = tmp_path / f"final-{job_id[:6]}.tar.gz"
    open_storage(orch.settings.storage).get_file(latest.key, dest, expected_sha256=latest.sha256)
    with tarfile.open(dest) as tar:
        member = tar.extractfile("result.json")
        assert member is not None
        return dict(json.load(member))


def worker_log(tmp_path: Path, name: str = "w") -> str:
    return (tmp_path / f"worker-{name}.log").read_text()


def test_job_runs_to_completion_with_the_uninterrupted_result(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    job_id = submit_stepper(orch, tmp_path)
    proc = start_worker(orch, tmp_path)
    assert proc.wait(60) == 0, worker_log(tmp_path)
    job = orch.operator().get_job(job_id)
    assert job.status == "completed", worker_log(tmp_path)
    assert final_result(orch, job_id, tmp_path) == {"x": expected_result(60), "n": 60}
    assert job.checkpoints >= 2  # periodic ones and the final one
    steps = (tmp_path / f"steps-{job_id[:6]}.log").read_text().split()
    assert len(steps) == 60
    logs = open_storage(orch.settings.storage).list(f"jobs/{job_id}/logs/")
    assert logs == [f"jobs/{job_id}/logs/attempt-1.log.gz"]
    # the worker said goodbye
    assert {w.status for w in orch.operator().workers()} == {"gone"}

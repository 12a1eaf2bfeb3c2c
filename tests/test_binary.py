"""The one-file operator CLI (`make binary`: PyInstaller) works on its own against a live
orchestrator. Slow to build, so it runs where the binary exists (`make test-binary` builds it
first; CI does) and is skipped, saying so, elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RunningOrchestrator, make_settings, submit

BINARY = Path(os.environ.get("RELAYMD_BINARY",
                             Path(__file__).resolve().parent.parent / "dist" / "relaymd"))
pytestmark = pytest.mark.skipif(not BINARY.exists(),
                                reason=f"no one-file binary at {BINARY} (build it: make binary)")


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[RunningOrchestrator]:
    running = RunningOrchestrator(make_settings(tmp_path / "home")).start()
    yield running
    running.stop()


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # No Python on PATH and no virtualenv: what a bare login node gives it.
    return subprocess.run([str(BINARY), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": env["HOME"], **env})


def test_the_binary_runs_help_and_lists_jobs_of_a_live_orchestrator(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "RELAYMD_HOME": str(orch.settings.home)}
    out = run("--help", env=env)
    assert out.returncode == 0 and "submit" in out.stdout and "clusters" in out.stdout, out
    job_id = submit(orch.operator(), tmp_path, title="from-binary")
    out = run("jobs", "--json", env=env)
    assert out.returncode == 0, out.stderr
    jobs = json.loads(out.stdout)
    assert [(j["id"], j["title"], j["status"]) for j in jobs] == [(job_id, "from-binary", "queued")]
    out = run("jobs", "--json", env={**env, "RELAYMD_URL": orch.url, "RELAYMD_TOKEN": "wrong"})
    assert out.returncode == 1 and "token" in out.stderr.lower(), out

"""End to end, as an operator sees it: `relaymd` (the console hosting the orchestrator) runs in a
real tmux pane; a job submitted with `relaymd submit` goes queued -> running -> completed on a
local worker, read off the captured pane; `q` quits and the orchestrator stops cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

ENGINE = Path(__file__).parent / "engines" / "stepper.py"
RELAYMD = Path(sys.executable).with_name("relaymd")

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (make test installs it)")


def tmux(*args: str, check: bool = True) -> str:
    out = subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True,
                         timeout=20)
    if check and out.returncode != 0:
        raise AssertionError(f"tmux {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


SOCKET = f"relaymd-test-{uuid.uuid4().hex[:8]}"  # a private tmux server, never the user's


def pane() -> str:
    return tmux("capture-pane", "-p", "-t", "console")


def test_console_in_tmux_runs_a_submitted_job_to_completion(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "RELAYMD_HOME": str(home), "RELAYMD_PORT": "0",
           "RELAYMD_LOCAL_WORKERS": "1", "RELAYMD_PROVISION_INTERVAL": "0.3",
           "RELAYMD_HEARTBEAT_INTERVAL": "0.5", "HOME": str(tmp_path / "user"), "TERM": "xterm"}
    env.pop("RELAYMD_CONFIG", None)
    env.pop("NO_COLOR", None)
    src = tmp_path / "job"
    src.mkdir()
    (src / "stepper.py").write_text(ENGINE.read_text())
    (src / "relaymd.yaml").write_text(yaml.safe_dump({
        "command": f"TOTAL=60 STEP_S=0.08 EVERY=10 {sys.executable} stepper.py",
        "progress": "progress.json", "resources": {"gpus": 0},
        "checkpoint": {"paths": ["state.json", "result.json"], "poll_seconds": 0.2}}))

    tmux("new-session", "-d", "-s", "console", "-x", "120", "-y", "34",
         *[f"-e{k}={v}" for k, v in env.items() if k.startswith(("RELAYMD_", "HOME", "TERM"))],
         f"{RELAYMD}; echo CONSOLE-EXIT=$?; sleep 60")
    try:
        deadline = time.time() + 30
        while "checkpoints/h" not in pane():
            assert time.time() < deadline, f"the console did not come up:\n{pane()}"
            time.sleep(0.2)
        sub = subprocess.run([str(RELAYMD), "submit", str(src), "--title", "e2e-stepper"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0, sub.stderr

        seen: list[str] = []
        deadline = time.time() + 90
        while time.time() < deadline:
            screen = pane()
            line = next((ln for ln in screen.splitlines() if "e2e-stepper" in ln), "")
            state = next((s for s in ("queued", "assigned", "running", "completed", "failed")
                          if f" {s} " in f" {line} "), None)
            if state and (not seen or seen[-1] != state):
                seen.append(state)
            if state in ("completed", "failed"):
                break
            time.sleep(0.1)
        assert seen and seen[-1] == "completed", f"states seen {seen}; pane:\n{pane()}"
        assert "running" in seen, f"never saw it running: {seen}"
        assert seen.index("running") < seen.index("completed")
        assert "100%" in next(ln for ln in pane().splitlines() if "e2e-stepper" in ln)

        tmux("send-keys", "-t", "console", "q")
        deadline = time.time() + 30
        while "CONSOLE-EXIT=" not in pane():
            assert time.time() < deadline, f"q did not quit the console:\n{pane()}"
            time.sleep(0.2)
        assert "CONSOLE-EXIT=0" in pane(), pane()
        assert not (home / "orchestrator.json").exists(), "the orchestrator did not stop cleanly"
    finally:
        tmux("kill-server", check=False)

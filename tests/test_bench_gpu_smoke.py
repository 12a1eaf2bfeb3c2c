"""The GPU check still runs end to end on the CPU platform (a tiny water box, short runs, a real
serve and worker), so the one call a GPU session makes does not fail on something a CPU finds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openmm")

CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_runs_on_the_cpu_platform(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(CHECK), "--platform", "CPU", "--threads", "1", "--systems", "water",
         "--water-atoms", "600", "--seconds", "1.5", "--checkpoint-seconds", "0.5",
         "--calibrate-seconds", "0.3", "--openmm-seconds", "0.3", "--poll-seconds", "0.2",
         "--heartbeat-interval", "1", "--timeout", "60", "--home-parent", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the check ends its processes and removes its homes
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError("the check took over 90 s:\n" + stdout + stderr) from None
    out = stdout + stderr
    assert proc.returncode == 0, out
    lines = stdout.splitlines()
    assert lines[0].startswith("command: "), out
    # step 1: testInstallation's output and a Context on the platform
    assert re.search(r"^\d+ CPU - Successfully computed forces$", stdout, re.M), out
    assert re.search(r"^CPU Context: created in .*Threads=1", stdout, re.M), out
    assert "platform CPU: works" in stdout, out
    # steps 2-4: the system, OpenMM alone, the calibration that sizes the runs
    assert re.search(r"^water: \d{3} atoms, built", stdout, re.M), out
    assert re.search(r"^  water: OpenMM alone [\d.]+ ns/day", stdout, re.M), out
    assert re.search(r"^  water: calibration, runner [\d.]+ ns/day \([\d.]+ steps/s", stdout,
                     re.M), out
    steps = re.search(r"^  water engine: .* --steps (\d+) .*--checkpoint-steps 1000000000$",
                      stdout, re.M)
    assert steps and int(steps[1]) >= 10, out
    # step 5: a bare and a worker run of those steps, on the platform asked for
    bare = re.search(r"^  water repeat 1 bare  : runner [\d.]+ ns/day, .*\((\d+) steps.* on CPU;",
                     stdout, re.M)
    worker = re.search(r"^  water repeat 1 worker: runner [\d.]+ ns/day, .*\((\d+) steps.* on CPU;"
                       r".*checkpoints uploaded: [1-9]", stdout, re.M)
    assert bare and worker and bare[1] == worker[1] == steps[1], out
    row = re.search(r"^water +\d+ +(\d+)( +[\d.]+){5} +[\d.]+ +[\d.]+s$", stdout, re.M)
    assert row and row[1] == steps[1], out
    result = re.fullmatch(r"RESULT platform=CPU water_openmm_ns_day=([\d.]+) "
                          r"water_bare_ns_day=([\d.]+) water_worker_ns_day=([\d.]+) "
                          r"water_ratio=([\d.]+) min_ratio=([\d.]+)", lines[-1])
    assert result and all(float(v) > 0 for v in result.groups()), out
    assert result[5] == result[4], out
    assert not list(tmp_path.iterdir()), "the check's temporary directories were not removed"

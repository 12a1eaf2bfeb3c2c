"""The MD overhead benchmark still runs end to end (a tiny water box, a real serve and worker)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openmm")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "md_overhead.py"


def test_md_overhead_benchmark_runs(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), "--atoms", "600", "--steps", "200", "--platform", "CPU",
         "--threads", "1", "--checkpoint-seconds", "1", "--poll-seconds", "0.2", "--repeat", "1",
         "--home-parent", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark ends its processes and removes its home
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError("benchmark took over 60 s:\n" + stdout + stderr) from None
    out = stdout + stderr
    assert proc.returncode == 0, out
    assert stdout.splitlines()[0].startswith("command: "), out
    result = re.search(r"^RESULT bare_ns_day=([\d.]+) worker_ns_day=([\d.]+) ratio=([\d.]+)$",
                       stdout.splitlines()[-1])
    assert result, out
    assert float(result[1]) > 0 and float(result[2]) > 0 and float(result[3]) > 0, out
    assert re.search(r"^platform CPU \(asked: CPU\), threads 1, 200 steps", stdout, re.M), out
    assert re.search(r"repeat 1 worker: .*; checkpoints uploaded: [1-9]", stdout), out
    assert not list(tmp_path.iterdir()), "the benchmark's temporary directory was not removed"

"""The control-plane benchmark still runs end to end (tiny numbers, a real `relaymd serve`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "control_plane.py"


def test_control_plane_benchmark_runs(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), "--workers", "20", "--jobs", "15", "--duration", "2",
         "--heartbeat-interval", "0.1", "--connections", "8", "--home-parent", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark stops its server and removes its home
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError("benchmark took over 20 s:\n" + stdout + stderr) from None
    out = stdout + stderr
    assert proc.returncode == 0, out
    result = re.search(r"^RESULT heartbeats/s=(\d+) p99_ms=([\d.]+) claims/s=(\d+) errors=(\d+)$",
                       stdout, re.M)
    assert result, out
    assert int(result[1]) > 0 and int(result[3]) > 0 and result[4] == "0", out
    assert "15 distinct job ids -> no job double-assigned" in stdout, out
    for row in ("heartbeat", "claim (storm)", "checkpoint report", "job listing (page)"):
        assert re.search(rf"^{re.escape(row)}\s+[1-9]\d*\s", stdout, re.M), out
    assert not list(tmp_path.iterdir()), "the temporary RELAYMD_HOME was not removed"

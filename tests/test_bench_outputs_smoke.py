"""The output streaming benchmark still runs end to end (a real serve and worker, short runs)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "outputs.py"


def test_outputs_benchmark_runs_and_streaming_sends_less(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), "--minutes", "0.2", "--frame-kb", "40", "--frame-seconds",
         "0.25", "--state-kb", "16", "--checkpoint-seconds", "1.5", "--poll-seconds", "0.2",
         "--home-parent", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark ends its processes and removes its home
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError("benchmark took over 120 s:\n" + stdout + stderr) from None
    out = stdout + stderr
    assert proc.returncode == 0, out
    assert stdout.splitlines()[0].startswith("command: "), out
    result = re.fullmatch(r"RESULT before_mb_h=(\d+) after_mb_h=(\d+) ratio=([\d.]+) "
                          r"hour_before_gb=([\d.]+) hour_after_gb=([\d.]+) "
                          r"before_cpu_ms=(\d+) after_cpu_ms=(\d+)", stdout.splitlines()[-1])
    assert result, out
    before, after = int(result[1]), int(result[2])
    # The trajectory re-sent whole at each checkpoint costs more than sending it once.
    assert before > after > 0, out
    assert float(result[4]) > float(result[5]) > 0, out
    for mode in ("before", "after"):
        m = re.search(rf"^  {mode} *: .* (\d+) checkpoints, trajectory ([\d.]+) MiB", stdout, re.M)
        assert m and int(m[1]) >= 3 and float(m[2]) > 0, out
    assert not list(tmp_path.iterdir()), "the benchmark's temporary directory was not removed"

"""The storage benchmark still runs end to end (a small file, moto_server out of process)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("moto.server")
pytest.importorskip("boto3")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "storage.py"


def test_storage_benchmark_runs(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), "--size-mb", "24", "--part-mb", "5", "--repeat", "1",
         "--server", "moto", "--home-parent", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark stops its server and removes its directory
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError("benchmark took over 60 s:\n" + stdout + stderr) from None
    out = stdout + stderr
    assert proc.returncode == 0, out
    assert stdout.splitlines()[0].startswith("command: "), out
    num = r"(\d+(?:\.\d+)?)"
    result = re.search(rf"^RESULT up_ratio={num} down_ratio={num} down_ratio_vs_fsync={num} "
                       rf"ours_up_MBps={num} ours_down_MBps={num} boto3_up_MBps={num} "
                       rf"boto3_down_MBps={num} ours_peak_rss_MB={num} ours_rss_increase_MB={num} "
                       rf"boto3_peak_rss_MB={num}$", stdout.splitlines()[-1])
    assert result, out
    assert all(float(x) > 0 for x in result.groups()), out
    for impl in ("ours ", "boto3"):
        for op in ("upload  ", "download"):
            assert re.search(rf"^  repeat 1 {impl} {op}: +[\d.]+ MB/s", stdout, re.M), out
    assert not list(tmp_path.iterdir()), "the benchmark's temporary directory was not removed"

"""Process plumbing shared by the benchmarks (run as `python bench/NAME.py`, so this directory
is on sys.path): children that die with the benchmark, and SIGTERM that unwinds cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def die_with_parent() -> None:
    """In a child (preexec_fn): get SIGTERM if the benchmark dies without cleaning up (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def terminated(signum: int, frame: object) -> None:
    """Signal handler: unwind, so every process is ended and the temporary home removed."""
    raise SystemExit(128 + signum)


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def stop_gently(proc: subprocess.Popen[str] | subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a child and wait for it (SIGKILL after 30 s)."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


STEPPER_A, STEPPER_M = 1103515245, 2**31  # tests/engines/stepper.py's recurrence


def expected_result(total: int) -> int:
    """The stepper engine's x after `total` steps, run without interruption."""
    x = 1
    for n in range(total):
        x = (STEPPER_A * x + n) % STEPPER_M
    return x

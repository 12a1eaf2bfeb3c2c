"""Process plumbing shared by the benchmarks (run as `python bench/NAME.py`, so this directory
is on sys.path): children that die with the benchmark, and SIGTERM that unwinds cleanly."""

from __future__ import annotations

import signal


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

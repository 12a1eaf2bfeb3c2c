"""What this worker runs on: GPUs (nvidia-smi), host, and the SLURM allocation's end time.

Every probe tolerates failure: a missing or broken tool means "unknown", never a crash.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import datetime

log = logging.getLogger(__name__)
PROBE_TIMEOUT = 15.0


@dataclass(frozen=True)
class Gpus:
    count: int = 0
    model: str = ""
    vram_gb: float = 0.0


def _run(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("probe %s failed: %s", argv[0], exc)
        return None
    if out.returncode != 0:
        log.debug("probe %s exited %s: %s", argv[0], out.returncode, out.stderr.strip()[:200])
        return None
    return out.stdout


def parse_nvidia_smi(text: str) -> Gpus:
    """`nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` output."""
    names, mems = [], []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.rsplit(",", 1)]
        if len(parts) != 2:
            continue
        names.append(parts[0])
        try:
            mems.append(float(parts[1]) / 1024)
        except ValueError:
            mems.append(0.0)
    if not names:
        return Gpus()
    return Gpus(len(names), names[0], round(min(mems), 1))


def detect_gpus() -> Gpus:
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    if out is None:
        return Gpus()
    gpus = parse_nvidia_smi(out)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and gpus.count:
        ids = [v for v in visible.split(",") if v.strip()]
        gpus = Gpus(min(gpus.count, len(ids)), gpus.model, gpus.vram_gb)
    return gpus


def parse_slurm_time(text: str) -> float | None:
    """squeue's %e (local time, e.g. 2026-11-25T12:00:00) as an epoch, or None if unknown."""
    text = text.strip()
    if not text or text in ("N/A", "Unknown", "NONE", "INVALID"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()  # naive = local time, as SLURM prints
    except ValueError:
        return None


def slurm_end_time(job_id: str | None) -> float | None:
    if not job_id:
        return None
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%e"])
    if out is not None:
        end = parse_slurm_time(out.splitlines()[0] if out.strip() else "")
        if end is not None:
            return end
    out = _run(["scontrol", "show", "job", job_id])
    for token in (out or "").split():
        if token.startswith("EndTime="):
            return parse_slurm_time(token.split("=", 1)[1])
    return None


def hostname() -> str:
    return socket.gethostname()

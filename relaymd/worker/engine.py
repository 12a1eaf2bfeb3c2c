"""The engine subprocess: started in its own process group, output to a log file, stopped
politely (SIGTERM to the group) and then firmly (SIGKILL) if it does not exit in time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)


# What the engine may see of the worker's environment: an allow-list, because the worker's
# environment holds its secrets (bootstrap and session tokens, S3 keys, the Infisical machine
# identity, a Tailscale key; on a login node even the operator token) and an engine is the job
# owner's code, which may print its environment into a log that lands in the database and in
# storage. Anything else a job needs goes in `env:` of its relaymd.yaml.
ENGINE_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR",
    "HOSTNAME", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONHASHSEED",
    "VIRTUAL_ENV", "CONDA_PREFIX",
})
ENGINE_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "OPENMM_", "OMP_", "MKL_", "OPENBLAS_",
                       "NCCL_", "SLURM_", "SALAD_")


def engine_env(extra: dict[str, str] | None,
               environ: dict[str, str] | None = None) -> dict[str, str]:
    """The engine's environment: the allow-listed part of the worker's, then `extra` (the
    job's `env:` and RELAYMD_JOB_ID and friends), with the worker's own Python first on PATH:
    a job's `python -m relaymd.engines.openmm ...` then runs where relaymd and OpenMM are
    installed (a venv or a container), not whatever `python` the login shell found."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items()
           if k in ENGINE_ENV_NAMES or k.startswith(ENGINE_ENV_PREFIXES)}
    env.update(extra or {})
    bindir = os.path.dirname(sys.executable)
    path = env.get("PATH", "")
    if bindir and bindir not in path.split(os.pathsep):
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    return env


class Engine:
    def __init__(self, command: str, job_dir: Path, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.command = command
        self.job_dir = job_dir
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.stopped_by_us = False

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:  # noqa: ASYNC230 (a local file, opened once)
            self.proc = await asyncio.create_subprocess_shell(
                self.command, cwd=self.job_dir, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                env=engine_env(self.env),
            )
        log.info("engine started", extra={"pid": self.proc.pid, "command": self.command})

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def group_alive(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return any(state != "Z" for state in group_states(self.proc.pid))

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the engine's process group; SIGKILL it if anything in it is still alive after
        `grace` s. The whole group gets the grace, not just its leader: a `sh -c` wrapper dies of
        SIGTERM at once while the engine under it is still writing its last checkpoint."""
        if self.proc is None:
            return None
        self.stopped_by_us = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.proc.returncode is None or self.group_alive():
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                pass
            while self.group_alive() and loop.time() < deadline:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.05)
            if self.group_alive():
                log.warning("engine ignored SIGTERM for %.0fs; killing it", grace)
        self.signal_group(signal.SIGKILL)  # also reaps helpers it left in its group
        return await self.proc.wait()

    def tail(self, max_bytes: int = 16384) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_bytes))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


def group_states(pgid: int) -> list[str]:
    """The states (R, S, Z, ...) of the processes in group `pgid`; ['?'] where /proc cannot say.
    A zombie is dead: as PID 1 without an init (a container), the engine orphaned by its `sh -c`
    becomes our child when it exits, and nobody reaps it."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return ["?"]
    states = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            states.append(fields[0])
    return states or ["?"]

"""The `slurm` provider: worker allocations through `sbatch`, watched through `squeue`.

Each request renders the job script template and runs `sbatch --parsable`; the SLURM job id it
prints becomes a placeholder worker (`provisioning`, provider id = the SLURM job id) until the
worker inside registers with that id and takes the placeholder's place. Every cycle the
placeholders and this cluster's registered workers are reconciled with `squeue -t all` (falling
back to `scontrol show job`, then `sacct` where accounting exists, for ids squeue no longer
lists):

- a placeholder whose job ended before its worker registered is dropped (gone, with the state);
- a registered worker whose job ended (TIMEOUT, NODE_FAIL, PREEMPTED, CANCELLED...) is
  deregistered, so its job goes straight back to the queue as an interruption, not a failure;
- a job SLURM has forgotten (purged after MinJobAge) is dead; a failed `squeue` is not.

Commands run as subprocesses with a timeout, locally or on a login node over `ssh`. Secrets
(bootstrap token, storage keys) never appear in argv or on disk: the submission is a small
bash program on stdin that exports them and feeds the script to sbatch, which passes them to the
job by name (`--export=NAMES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from relaymd.config import ClusterConfig, OrchestratorSettings, SlurmSettings
from relaymd.models import WorkerStatus
from relaymd.server.provisioning.base import ProviderError, Seen
from relaymd.server.service import Service

log = logging.getLogger(__name__)
NOT_GONE = frozenset(WorkerStatus) - {WorkerStatus.gone}

TEMPLATE = Path(__file__).with_name("job.sbatch")
# Job states after which nothing of the allocation runs any more.
ENDED = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})
SLURM_COMMANDS = frozenset({"sbatch", "squeue", "scontrol", "scancel", "sacct"})
# How long a fresh submission may be missing from squeue before it counts as gone.
LIST_GRACE = 60.0
_PLACEHOLDER = re.compile(r"{{\s*([a-z_]+)\s*}}")
_SBATCH_ID = re.compile(r"^(\d+)(?:_\d+)?(?:;[\w.-]+)?$")


class TemplateError(ProviderError):
    pass


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill `{{name}}` placeholders; an unknown one is an error, not an empty string."""
    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise TemplateError(f"job script template: unknown placeholder {{{{{name}}}}}; "
                                f"known: {', '.join(sorted(values))}")
        return values[name]
    return _PLACEHOLDER.sub(fill, template)


def parse_sbatch(stdout: str) -> str:
    """`sbatch --parsable` prints `ID` or `ID;CLUSTER`; anything else is garbage."""
    lines = [ln.strip() for ln in stdout.strip().splitlines() if ln.strip()]
    if lines:
        m = _SBATCH_ID.match(lines[-1])
        if m:
            return m.group(1)
    raise ProviderError(f"sbatch printed no job id (got {stdout.strip()[:200]!r})")


def parse_squeue(stdout: str) -> dict[str, tuple[str, str]]:
    """Lines of `%i|%T|%r` -> {job id: (state, reason)}; malformed lines are an error."""
    out: dict[str, tuple[str, str]] = {}
    for line in stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split("|")
        if len(parts) != 3 or not parts[0].split("_")[0].isdigit() or not parts[1].isupper():
            raise ProviderError(f"squeue printed an unexpected line {line[:200]!r}")
        out[parts[0].split("_")[0]] = (parts[1].rstrip("+"), parts[2])
    return out


def parse_scontrol_state(stdout: str) -> str | None:
    m = re.search(r"\bJobState=([A-Z_]+)", stdout)
    return m.group(1) if m else None


class SlurmProvider:
    def __init__(self, cluster: ClusterConfig, settings: OrchestratorSettings, service: Service, url: str,
                 worker_token: str | Callable[[], str],
                 clock: Callable[[], float] = time.time) -> None:
        assert cluster.slurm is not None
        self.cluster = cluster
        self.slurm: SlurmSettings = cluster.slurm
        self.settings = settings
        self.service = service
        self.url = self.slurm.orchestrator_url or url
        # The cluster's own bootstrap token (a callable: a rotated token applies at once).
        self.worker_token = worker_token if callable(worker_token) else lambda: worker_token
        self.clock = clock
        self.submitted = 0
        self.first_running: dict[str, float] = {}  # placeholder SLURM id -> first seen RUNNING
        self.last_note = ""
        self.next_look = 0.0  # monotonic time of the next squeue
        self.script_dir = settings.home / "slurm" / cluster.name

    # ------------------------------------------------------------------ commands

    def _argv(self, command: list[str]) -> list[str]:
        if self.slurm.bin_dir and not self.slurm.ssh and command[0] in SLURM_COMMANDS:
            command = [str(Path(self.slurm.bin_dir) / command[0]), *command[1:]]
        if self.slurm.ssh:
            remote = shlex.join(command)
            if self.slurm.bin_dir:
                remote = f"PATH={shlex.quote(self.slurm.bin_dir)}:$PATH {remote}"
            return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", self.slurm.ssh,
                    remote]
        return command

    async def _run(self, command: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
        """Run one SLURM command with the cluster's timeout. Raises ProviderError when it cannot
        start or does not finish in time (the process is killed)."""
        argv = self._argv(command)
        what = command[0]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else
                asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise ProviderError(f"cluster {self.cluster.name}: cannot run {argv[0]}: "
                                f"{exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin),
                                              self.slurm.command_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            with contextlib.suppress(Exception):
                await proc.wait()
            raise ProviderError(f"cluster {self.cluster.name}: {what} did not answer in "
                                f"{self.slurm.command_timeout:g}s") from None
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    # ------------------------------------------------------------------ submit

    def worker_env(self) -> dict[str, str]:
        """What the worker in the allocation needs (secrets included: for sbatch's
        environment only)."""
        s = self.slurm
        env = {
            **self.settings.storage_env(),
            "RELAYMD_URL": self.url,
            "RELAYMD_WORKER_TOKEN": self.worker_token(),
            "RELAYMD_CLUSTER": self.cluster.name,
            "RELAYMD_WORKER_IDLE": "immediate_exit",
            # Hand back when the warning signal comes or this long before the end, whichever
            # is first; claim only with room for a useful segment.
            "RELAYMD_HANDOFF_MARGIN": str(s.signal_margin),
            "RELAYMD_MIN_SEGMENT": f"{s.min_segment:g}",
            **s.env,
        }
        return env

    def worker_command(self) -> str:
        s = self.slurm
        if s.worker_command:
            inner = s.worker_command
        else:
            inner = "relaymd worker"
        if s.image:
            gpu = " --nv" if s.gpus else ""
            return f"{shlex.quote(s.apptainer)} exec{gpu} {shlex.quote(s.image)} {inner}"
        return inner

    def output_path(self) -> str:
        if self.slurm.output:
            return self.slurm.output
        if self.slurm.ssh:
            return "relaymd-%j.out"
        return str(self.script_dir / "%j.out")

    def script(self, export: list[str]) -> str:
        s = self.slurm
        options = []
        for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                            ("mem", s.mem)):
            if value:
                options.append(f"#SBATCH --{flag}={value}")
        options.append(f"#SBATCH --cpus-per-task={s.cpus}")
        if s.gpus:
            options.append(f"#SBATCH --gpus={s.gpus}")
        options.extend(line if line.lstrip().startswith("#SBATCH") else f"#SBATCH {line}"
                       for line in s.extra_sbatch)
        path = s.template or TEMPLATE
        try:
            template = Path(path).read_text()
        except OSError as exc:
            raise TemplateError(f"cluster {self.cluster.name}: cannot read job script template "
                                f"{path}: {exc.strerror}") from None
        return render(template, {
            "cluster": self.cluster.name, "job_name": f"relaymd-{self.cluster.name}",
            "time": s.time, "signal_margin": str(s.signal_margin), "output": self.output_path(),
            "export": ",".join(export), "sbatch_options": "\n".join(options),
            "worker_command": self.worker_command(),
        })

    async def submit(self, count: int) -> int:
        done = 0
        for _ in range(count):
            await self.submit_one()
            done += 1
        return done

    async def submit_one(self) -> str:
        env = self.worker_env()
        names = ["PATH", "HOME", "USER", *env]
        script = self.script(names)
        if "\nRELAYMD_SBATCH_EOF\n" in f"\n{script}\n":
            raise TemplateError(f"cluster {self.cluster.name}: the job script contains the "
                                "line RELAYMD_SBATCH_EOF, which ends its here-document")
        self.script_dir.mkdir(parents=True, exist_ok=True)
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        sbatch = shlex.join(self._argv_local("sbatch") + ["--parsable"])
        program = (f"set -e\n{exports}exec {sbatch} <<'RELAYMD_SBATCH_EOF'\n{script}\n"
                   "RELAYMD_SBATCH_EOF\n")
        code, out, err = await self._run(["bash", "-s"], stdin=program.encode())
        if code != 0:
            raise ProviderError(f"cluster {self.cluster.name}: sbatch exited {code}: "
                                f"{(err or out).strip()[-400:] or 'no output'}")
        job_id = parse_sbatch(out)
        self.submitted += 1
        # Look again soon: the new job's first state (and a quick failure) matter most.
        self.next_look = min(self.next_look, time.monotonic() + 5.0)
        with contextlib.suppress(OSError):  # for the operator: what was submitted (no secrets)
            (self.script_dir / f"{job_id}.sbatch").write_text(script)
        await self.service.add_placeholder(self.cluster.name, "slurm", job_id,
                                           self.slurm.gpus, f"{self.cluster.name}:{job_id}")
        log.info("cluster %s: submitted SLURM job %s (%s, signal %ds before the end)",
                 self.cluster.name, job_id, self.slurm.time, self.slurm.signal_margin)
        return job_id

    def _argv_local(self, name: str) -> list[str]:
        """The SLURM command as the bash program on the submit host names it."""
        if self.slurm.bin_dir:
            return [str(Path(self.slurm.bin_dir) / name)]
        return [name]

    # ------------------------------------------------------------------ reconcile

    async def states(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        """SLURM's state of each id it still knows; raises ProviderError when squeue fails."""
        code, out, err = await self._run(
            ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"])
        if code != 0:
            if "Invalid job id" in err:  # every id already purged
                return {}
            raise ProviderError(f"squeue exited {code}: {(err or out).strip()[-300:]}")
        return parse_squeue(out)

    async def forgotten(self, job_id: str, submitted: float) -> str | None:
        """For an id squeue does not list: its state from scontrol, else from accounting (sacct,
        with an explicit start time: without one it only looks at today), "PURGED" when SLURM no
        longer knows it at all, None when we cannot tell."""
        try:
            code, out, err = await self._run(["scontrol", "show", "job", job_id])
        except ProviderError:
            return None
        if code == 0:
            return parse_scontrol_state(out)
        if "Invalid job id" not in err:
            return None
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(submitted - 3600))
        try:
            code, out, _ = await self._run(["sacct", "-n", "-X", "-P", "-j", job_id, "-S", since,
                                            "-o", "State"])
        except ProviderError:
            return "PURGED"
        words = out.split()
        if code == 0 and words and words[0].isupper():
            return words[0].rstrip("+")
        return "PURGED"  # no accounting (or no record): slurmctld forgot it, so it is over

    async def reconcile(self, workers: list[dict[str, Any]]) -> Seen:
        mine = [w for w in workers if w["provider_id"]
                and w["status"] in NOT_GONE]
        placeholders = [w for w in mine if w["status"] == WorkerStatus.provisioning]
        if not mine:
            return Seen(pending=0)
        if time.monotonic() < self.next_look:  # between looks: our own rows are the truth
            return Seen(pending=len(placeholders), note=self.last_note)
        self.next_look = time.monotonic() + self.slurm.squeue_interval
        ids = sorted({w["provider_id"] for w in mine})
        try:
            states = await self.states(ids)
        except ProviderError as exc:
            log.warning("cluster %s: %s; keeping what we knew", self.cluster.name, exc)
            self.last_note = f"squeue failed: {exc}"
            return Seen(pending=len(placeholders), note=self.last_note)
        now = self.clock()
        pending = 0
        waiting_reasons: list[str] = []
        for w in mine:
            job_id = w["provider_id"]
            state, why = states.get(job_id, ("", ""))
            if not state:
                if now - (w["registered_at"] or 0) < LIST_GRACE:
                    pending += w["status"] == WorkerStatus.provisioning
                    continue
                state = await self.forgotten(job_id, w["registered_at"] or now) or ""
                why = "no longer known to SLURM" if state == "PURGED" else why
            if not state:  # cannot tell: not death
                pending += w["status"] == WorkerStatus.provisioning
                continue
            if state in ENDED or state == "PURGED":
                await self._ended(w, state, why)
                continue
            if w["status"] != WorkerStatus.provisioning:
                continue
            note = state if not why or why == "None" else f"{state} ({why})"
            if state == "RUNNING":
                started = self.first_running.setdefault(job_id, now)
                if now - started > self.slurm.register_timeout:
                    await self._never_registered(w, now - started)
                    continue
            else:
                self.first_running.pop(job_id, None)
                if state == "PENDING" and why and why != "None":
                    waiting_reasons.append(why)
            await self.service.set_worker_note(w["id"], note)
            pending += 1
        note = ""
        if waiting_reasons:
            note = f"{len(waiting_reasons)} pending in SLURM: {', '.join(sorted(set(waiting_reasons)))}"
        self.last_note = note
        return Seen(pending=pending, note=note)

    async def _ended(self, w: dict[str, Any], state: str, why: str) -> None:
        job_id = w["provider_id"]
        self.first_running.pop(job_id, None)
        what = f"SLURM job {job_id} {'was purged' if state == 'PURGED' else 'ended ' + state}"
        if why and why != "None" and state != "PURGED":
            what += f" ({why})"
        if w["status"] == WorkerStatus.provisioning:
            log.info("cluster %s: %s before its worker registered", self.cluster.name, what)
            await self.service.drop_placeholder(w["id"], f"{what} before its worker registered")
        else:
            log.warning("cluster %s: worker %s: %s; its job goes back to the queue",
                        self.cluster.name, w["id"][:8], what)
            await self.service.worker_lost(w["id"], what)

    async def _never_registered(self, w: dict[str, Any], waited: float) -> None:
        job_id = w["provider_id"]
        log.warning("cluster %s: SLURM job %s has run %.0fs without its worker registering; "
                    "cancelling it (check %s)", self.cluster.name, job_id, waited,
                    self.output_path().replace("%j", job_id))
        with contextlib.suppress(ProviderError):
            await self._run(["scancel", job_id])
        self.first_running.pop(job_id, None)
        await self.service.drop_placeholder(
            w["id"], f"SLURM job {job_id} ran {waited:.0f}s without its worker registering; "
            "cancelled (is the orchestrator reachable from the compute node?)")

    async def scale_in(self, workers: list[dict[str, Any]]) -> None:
        """Pending allocations are left to start: their workers exit at once when no work is
        queued (immediate_exit), and a running allocation is never cancelled to scale down."""

    async def stop(self) -> None:
        """Allocations keep running: their workers reconnect to the next orchestrator."""

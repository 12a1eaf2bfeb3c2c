"""Where workers come from: one `clusters:` entry each (provider, strategy, limits, trust) with
its provider's own section (`slurm:` or `salad:`). Read by the orchestrator only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

ClusterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
Provider = Literal["slurm", "salad", "local"]
LOCAL_CLUSTER = "local"  # this machine's own workers (`local_workers`, the `worker` token)
# HPC before Salad by default: a higher priority is provisioned (and claims work) first.
DEFAULT_CLUSTER_PRIORITY: dict[str, int] = {"slurm": 20, "local": 10, "salad": 0}


class SlurmSettings(BaseModel):
    """How the `slurm` provider submits one worker allocation (`sbatch`)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"  # --time of each allocation
    gpus: int = Field(default=1, ge=0, le=64)  # --gpus of each allocation (0: none)
    cpus: int = Field(default=4, ge=1, le=1024)  # --cpus-per-task
    mem: str | None = None  # --mem, e.g. "32G"
    signal_margin: int = Field(default=300, ge=10, le=7200)  # --signal=B:TERM@margin (seconds)
    extra_sbatch: list[str] = Field(default_factory=list)  # more "#SBATCH ..." options, verbatim
    image: str | None = None  # Apptainer .sif path or URI; None: run `worker_command` directly
    apptainer: str = "apptainer"
    worker_command: str | None = None  # default: `relaymd worker` (inside the image if any)
    template: Path | None = None  # default: the packaged deploy/slurm/job.sbatch
    ssh: str | None = None  # login node to run sbatch/squeue on (`ssh HOST sbatch ...`)
    bin_dir: str | None = None  # where sbatch/squeue/scontrol/scancel live (default: PATH)
    orchestrator_url: str | None = None  # how compute nodes reach the API (default: ours)
    output: str | None = None  # --output; default {home}/slurm/{cluster}/%j.out ("relaymd-%j.out" over ssh)
    env: dict[str, str] = Field(default_factory=dict)  # more variables for the worker
    min_segment: float = Field(default=600.0, ge=0)  # the worker claims only with this much left
    command_timeout: float = Field(default=30.0, gt=0)  # per sbatch/squeue/scontrol call
    # squeue at most this often (sites frown on tight squeue loops); sooner after a submit.
    squeue_interval: float = Field(default=30.0, ge=0)
    register_timeout: float = Field(default=900.0, gt=0)  # RUNNING but never registered: cancel

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", value.strip()):
            raise ValueError(f"{value!r} is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
        return value.strip()

    @field_validator("extra_sbatch")
    @classmethod
    def _one_line_each(cls, lines: list[str]) -> list[str]:
        for line in lines:
            if "\n" in line or "\r" in line:
                raise ValueError(f"extra_sbatch entry {line!r} spans lines; give one option each")
        return lines


class SaladSettings(BaseModel):
    """Which Salad Cloud container group the `salad` provider scales, through Salad's API."""

    model_config = ConfigDict(extra="forbid")

    organization: str = Field(min_length=1)
    project: str = Field(min_length=1)
    container_group: str = Field(min_length=1)
    api_key: SecretStr | None = None  # default: RELAYMD_SALAD_API_KEY (from secrets)
    base_url: str = "https://api.salad.com/api/public"
    gpus: int = Field(default=1, ge=0, le=64)  # GPUs of each replica
    idle_grace: float = Field(default=300.0, ge=0)  # no work this long: scale to zero
    request_timeout: float = Field(default=20.0, gt=0)


class ClusterConfig(BaseModel):
    """One place workers come from, and when to ask it for more."""

    model_config = ConfigDict(extra="forbid")

    name: ClusterName
    provider: Provider
    strategy: Literal["reactive", "continuous", "jit_threshold"] = "reactive"
    target_workers: int = Field(default=1, ge=0, le=10000)  # continuous: keep this many alive
    threshold: int = Field(default=0, ge=0)  # jit_threshold: submit when more jobs wait than this
    max_pending: int = Field(default=1, ge=0, le=1000)  # requests not yet registered
    max_workers: int = Field(default=4, ge=0, le=10000)  # registered + pending
    priority: int | None = None  # default: slurm 20, local 10, salad 0 (higher goes first)
    enabled: bool = True
    # Runs under the operator's own account (HPC, this machine) rather than on strangers' PCs.
    # Default: true, except for provider salad. Jobs submitted --trusted-only never run on an
    # untrusted cluster, and checkpoints its workers write are marked as such.
    trusted: bool | None = None
    slurm: SlurmSettings | None = None
    salad: SaladSettings | None = None

    @model_validator(mode="after")
    def _provider_settings(self) -> ClusterConfig:
        if self.provider == "slurm" and self.slurm is None:
            self.slurm = SlurmSettings()
        if self.provider == "salad" and self.salad is None:
            raise ValueError(f"cluster {self.name}: provider salad needs a `salad:` section "
                             "(organization, project, container_group)")
        if self.priority is None:
            self.priority = DEFAULT_CLUSTER_PRIORITY[self.provider]
        if self.trusted is None:
            self.trusted = self.provider != "salad"
        return self

    @property
    def gpus(self) -> int:
        """GPUs of one worker from this cluster (0 for local workers)."""
        if self.slurm is not None:
            return self.slurm.gpus
        if self.salad is not None:
            return self.salad.gpus
        return 0

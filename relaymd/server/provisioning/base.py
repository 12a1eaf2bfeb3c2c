"""What every provider does for the provisioning loop, and the errors it may raise.

A provider is one cluster's way of getting workers: `local` starts processes here, `slurm` calls
`sbatch`, `salad` scales a Salad Cloud container group. The loop (`provisioner.py`) decides how
many workers a cluster should ask for; the provider only carries that out and reports what it
sees. A provider never decides to kill running work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from relaymd.config import ClusterConfig


class ProviderError(Exception):
    """A provider call failed (timeout, non-zero exit, garbage output, HTTP error). The loop logs
    it, records it as the cluster's last decision and tries again next cycle: never a crash, and
    never a reason to fail a job."""


@dataclass
class Seen:
    """One cycle's look at a cluster's provider."""

    pending: int  # requests made but not yet registered as workers (placeholders, starting replicas)
    note: str = ""  # what the operator should know ("squeue failed: ...", "2 replicas starting")
    details: dict[str, Any] = field(default_factory=dict)  # provider-specific, for `relaymd clusters`


class Provider(Protocol):
    cluster: ClusterConfig

    async def reconcile(self, workers: list[dict[str, Any]]) -> Seen:
        """Bring the provider's state and this cluster's worker rows in line and say how many
        requests are pending. `workers` are the cluster's worker rows (store dicts: id, status,
        provider_id, job_id, registered_at...) in every status but gone. Must not raise for a
        provider that cannot be reached: report it in `Seen.note` and keep the last count."""
        ...

    async def submit(self, count: int) -> int:
        """Ask for `count` more workers; returns how many were requested. Raises
        ProviderError when the request failed (nothing half-done is left recorded)."""
        ...

    async def scale_in(self, workers: list[dict[str, Any]]) -> None:
        """Nothing is queued for this cluster: give back capacity that is idle (never busy)."""
        ...

    async def stop(self) -> None:
        """The orchestrator is stopping. Workers that run elsewhere keep running."""
        ...

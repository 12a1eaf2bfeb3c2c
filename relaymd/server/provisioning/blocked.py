"""Why a queued job waits: one sentence naming the mismatch, then the fix. Pure: the provisioning
loop (`provisioner.py`) hands in what it sees, nothing here touches the database or the clock.

A job can run on a registered live worker, or on one a configured, enabled cluster starts. The
sentence says what the job wants (GPUs, trusted clusters, preferred clusters), what the
registered workers have, and why no configured cluster can start a fitting worker; the fix
names the one change that would let it run (enable a cluster, add one, or resubmit it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Offer:
    """A configured cluster (what its workers would have) or a registered live worker."""

    cluster: str
    gpus: int
    trusted: bool
    enabled: bool = True  # clusters only: switched on
    busy: bool = False  # workers only: running a job now
    asking: bool = True  # workers only: idle and still asking for work (else it is leaving)

    @property
    def free(self) -> bool:
        return not self.busy and self.asking


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def names(items: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(items))


def fits(offer: Offer, gpus: int, allowed: Sequence[str] | None, trusted_only: bool) -> bool:
    """Whether a worker like this may take the job (the claim's own rule)."""
    return (offer.gpus >= gpus and (allowed is None or offer.cluster in allowed)
            and (offer.trusted or not trusted_only))


def wants(gpus: int, allowed: Sequence[str] | None, trusted_only: bool) -> str:
    text = f"wants {plural(gpus, 'GPU')}"
    if trusted_only:
        text += " on a trusted cluster"
    if allowed is not None:
        text += f" on {names(allowed)} only"
    return text


def workers_clause(gpus: int, allowed: Sequence[str] | None, trusted_only: bool,
                   workers: Sequence[Offer]) -> str:
    """What the registered workers lack, by the first rule that rules them all out."""
    if not workers:
        return "no worker is registered"
    there = [w for w in workers if allowed is None or w.cluster in allowed]
    if not there:
        return (f"no worker of {names(allowed or [])} is registered (the "
                f"{plural(len(workers), 'registered worker')} "
                f"{'is' if len(workers) == 1 else 'are'} on {names([w.cluster for w in workers])})")
    trusted = [w for w in there if w.trusted or not trusted_only]
    if not trusted:
        return (f"the {plural(len(there), 'registered worker')} "
                f"{'is' if len(there) == 1 else 'are'} untrusted "
                f"({names([w.cluster for w in there])})")
    have = sorted({w.gpus for w in trusted})
    amount = plural(have[0], "GPU") if len(have) == 1 else f"at most {plural(have[-1], 'GPU')}"
    return (f"the {plural(len(trusted), 'registered worker')} "
            f"{'has' if len(trusted) == 1 else 'have'} {amount}")


def cluster_problem(c: Offer, gpus: int, trusted_only: bool) -> str | None:
    """What keeps a configured cluster from starting a worker for the job; disabled only when
    switching it on would be enough."""
    if trusted_only and not c.trusted:
        return f"{c.cluster} is untrusted"
    if c.gpus < gpus:
        return f"{c.cluster} starts workers with {plural(c.gpus, 'GPU')}"
    if not c.enabled:
        return f"{c.cluster} is disabled"
    return None


def clusters_clause(gpus: int, allowed: Sequence[str] | None, trusted_only: bool,
                    clusters: Sequence[Offer]) -> str:
    """Why no configured cluster can start a worker for the job, cluster by cluster."""
    if not clusters:
        return "no cluster is configured to start workers"
    configured = {c.cluster for c in clusters}
    problems = [p for c in clusters if allowed is None or c.cluster in allowed
                if (p := cluster_problem(c, gpus, trusted_only))]
    problems += [f"{n}: no such cluster is configured" for n in dict.fromkeys(allowed or [])
                 if n not in configured]
    return "no configured cluster can start one" + (f" ({'; '.join(problems)})" if problems
                                                     else "")


def why_blocked(gpus: int, allowed: Sequence[str] | None, trusted_only: bool,
                clusters: Sequence[Offer], workers: Sequence[Offer]) -> str | None:
    """Why no configured cluster can start a worker for the job and no registered one can take
    it, and the fix; None when a free registered worker can take it (nothing blocks it).

    `clusters`: every configured cluster; `workers`: every registered live worker."""
    able = [w for w in workers if fits(w, gpus, allowed, trusted_only)]
    if any(w.free for w in able):
        return None
    if able:  # it runs when one of them is free; only more of them is out of reach
        state = "busy" if all(w.busy for w in able) else "busy or no longer asking for work"
        return (f"waiting for capacity: the {plural(len(able), 'registered worker')} that can "
                f"run it {'is' if len(able) == 1 else 'are'} {state}, and "
                f"{clusters_clause(gpus, allowed, trusted_only, clusters)}")
    return (f"{wants(gpus, allowed, trusted_only)}; "
            f"{workers_clause(gpus, allowed, trusted_only, workers)}, and "
            f"{clusters_clause(gpus, allowed, trusted_only, clusters)}. "
            f"Fix: {fix(gpus, allowed, trusted_only, clusters)}")


def fix(gpus: int, allowed: Sequence[str] | None, trusted_only: bool,
        clusters: Sequence[Offer]) -> str:
    """The one change that would let the job run, the least disruptive first."""
    considered = [c for c in clusters if allowed is None or c.cluster in allowed]
    unknown = [n for n in allowed or [] if n not in {c.cluster for c in clusters}]
    switch_on = [c.cluster for c in considered if not c.enabled
                 and fits(c, gpus, allowed, trusted_only)]
    if switch_on:
        return " and ".join(f"`relaymd clusters enable {n}`" for n in switch_on)
    if unknown:
        text = f"add {names(unknown)} under `clusters:`"
        if clusters:
            text += (" or submit it again with --cluster naming a configured one "
                     f"({names([c.cluster for c in clusters])})")
        return text
    short = [c for c in considered if c.gpus < gpus and (c.trusted or not trusted_only)]
    if gpus > 0 and (short or not considered or not trusted_only):
        return (f"add a cluster whose workers have {plural(gpus, 'GPU')} (`gpus: {gpus}` under "
                "`clusters:`), or submit it again with fewer (--gpus)")
    if trusted_only:
        return ("add a trusted cluster (a SLURM account, or local_workers on this machine), or "
                "submit it again without --trusted-only")
    return "add a cluster under `clusters:`, or set local_workers"

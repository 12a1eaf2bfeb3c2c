"""Prometheus metrics for `/metrics`, kept and rendered by prometheus_client: request counts and
latency per route, jobs and workers by state, GPU-hours per cluster.

Each `Metrics` has a `CollectorRegistry` of its own (a test process runs many orchestrators), and
nothing is registered in the library's global registry. The request metrics are recorded on
every request (`RequestMetrics` in api/middleware.py, and the heartbeat fast path), so `observe`
reuses each (route, status)'s labelled children instead of looking them up by label each time.
The job and worker gauges are set from the database's counts at scrape time (`render`), and the
GPU-hours gauge from the accounting (`service/accounting.py`, `usage.py`) at the same time:
nothing is added to the heartbeat path.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics import disable_created_metrics

from relaymd.models import JobStatus, WorkerStatus

# Latency buckets in seconds (the library adds +Inf).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format: "text/plain; version=0.0.4; ..."

# No `*_created` series next to each counter and histogram: /metrics exposes the five metrics
# below and nothing else. (A process-wide switch of the library; only the orchestrator uses it.)
disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("relaymd_jobs", "Jobs by state.", ["state"], registry=self.registry)
        self.workers = Gauge("relaymd_workers", "Workers by state.", ["state"],
                             registry=self.registry)
        # A gauge, not a counter: purging a job takes its hours away.
        self.gpu_hours = Gauge("relaymd_gpu_hours", "GPU-hours of job attempts by the cluster "
                               "that ran them; kind: useful, or redone (computed again after a "
                               "later attempt resumed from an earlier checkpoint).",
                               ["cluster", "kind"], registry=self.registry)
        self.requests = Counter("relaymd_http_requests", "API requests by route and status.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("relaymd_http_request_duration_seconds", "API latency by route.",
                                 ["route"], buckets=BUCKETS, registry=self.registry)
        # (route, status) -> (its counter's inc, its route's histogram's observe)
        self._children: dict[tuple[str, int], tuple[Callable[[], None],
                                                    Callable[[float], None]]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        """One request answered: count it and its latency (hot: ~12,000 times a second)."""
        try:
            count, latency = self._children[route, status]
        except KeyError:
            count = self.requests.labels(route, str(status)).inc
            latency = self.latency.labels(route).observe
            self._children[route, status] = count, latency
        count()
        latency(seconds)

    def render(self, jobs: dict[str, int], workers: dict[str, int],
               gpu_hours: dict[str, tuple[float, float]] | None = None) -> bytes:
        """The text exposition, with the gauges set to these counts (read from the database by
        the caller just now); every state is listed, zero included. `gpu_hours`: cluster ->
        (useful, redone)."""
        for state in JobStatus:
            self.jobs.labels(state.value).set(jobs.get(state, 0))
        for state in WorkerStatus:
            self.workers.labels(state.value).set(workers.get(state, 0))
        self.gpu_hours.clear()
        for cluster, (useful, redone) in (gpu_hours or {}).items():
            self.gpu_hours.labels(cluster, "useful").set(useful)
            self.gpu_hours.labels(cluster, "redone").set(redone)
        return generate_latest(self.registry)

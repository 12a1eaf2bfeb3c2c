"""Prometheus text metrics: request counts and latency per route, jobs and workers by state."""

from __future__ import annotations

from collections import defaultdict

from relaymd.models import JobStatus, WorkerStatus

# Latency buckets in seconds (Prometheus histogram, cumulative on render).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] += 1
        self.latency_sum[route] += seconds
        self.latency_count[route] += 1
        buckets = self.latency_buckets.setdefault(route, [0] * len(BUCKETS))
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
                break

    def render(self, jobs: dict[str, int], workers: dict[str, int]) -> str:
        out = ["# HELP relaymd_jobs Jobs by state.", "# TYPE relaymd_jobs gauge"]
        out += [f'relaymd_jobs{{state="{s}"}} {jobs.get(s, 0)}' for s in JobStatus]
        out += ["# HELP relaymd_workers Workers by state.", "# TYPE relaymd_workers gauge"]
        out += [f'relaymd_workers{{state="{s}"}} {workers.get(s, 0)}' for s in WorkerStatus]
        out += ["# HELP relaymd_http_requests_total API requests by route and status.",
                "# TYPE relaymd_http_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'relaymd_http_requests_total{{route="{route}",status="{status}"}} {n}')
        out += ["# HELP relaymd_http_request_duration_seconds API latency by route.",
                "# TYPE relaymd_http_request_duration_seconds histogram"]
        for route in sorted(self.latency_count):
            running = 0
            for bound, n in zip(BUCKETS, self.latency_buckets[route], strict=True):
                running += n
                out.append(f'relaymd_http_request_duration_seconds_bucket'
                           f'{{route="{route}",le="{bound}"}} {running}')
            name = "relaymd_http_request_duration_seconds"
            out.append(f'{name}_bucket{{route="{route}",le="+Inf"}} {self.latency_count[route]}')
            out.append(f'{name}_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
            out.append(f'{name}_count{{route="{route}"}} {self.latency_count[route]}')
        return "\n".join(out) + "\n"

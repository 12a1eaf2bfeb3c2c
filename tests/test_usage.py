"""GPU-hours (useful and redone), rates and ETAs from constructed job histories, with numbers
worked out by hand in the comments (relaymd/server/usage.py defines each figure)."""

from __future__ import annotations

import pytest

from relaymd.server.usage import (
    HistoryEvent,
    attempt_usage,
    by_cluster,
    eta_seconds,
    history,
    ns_per_day,
    rate,
    totals,
)

H = 3600.0
WORKERS = {"w1": (1, "hpc"), "w2": (2, "cloud")}  # worker -> (GPUs, cluster)


def gpus_of(worker_id: str | None) -> int:
    return WORKERS[worker_id][0] if worker_id in WORKERS else 4  # 4: the job's own gpus


def cluster_of(worker_id: str | None) -> str:
    return WORKERS[worker_id][1] if worker_id in WORKERS else "unknown"


def ev(kind: str, hours: float, attempt: int | None = None, worker: str | None = None,
       seq: int | None = None) -> HistoryEvent:
    return HistoryEvent(kind, hours * H, attempt, worker, seq)


# A job killed twice, handed off once, then completed:
#   attempt 1  w1 (1 GPU)  0h-2.5h  checkpoint 1 at 1h; killed (lost) at 2.5h
#   attempt 2  w2 (2 GPUs) 3h-4h    resumed from 1; no checkpoint; its engine failed at 4h
#   attempt 3  w1 (1 GPU)  5h-7h    resumed from 1; checkpoint 2 at 6h; handed off with 3 at 7h
#   attempt 4  w2 (2 GPUs) 8h-10h   resumed from 3; completed
KILLED_AND_RESUMED = [
    ev("submit", 0), ev("claim", 0, 1, "w1"), ev("start", 0.01, 1, "w1"),
    ev("checkpoint", 1, 1, "w1", seq=1), ev("lose", 2.5, 1, "w1"),
    ev("claim", 3, 2, "w2"), ev("fail", 4, 2, "w2"),
    ev("claim", 5, 3, "w1"), ev("checkpoint", 6, 3, "w1", seq=2),
    ev("release", 7, 3, "w1", seq=3),
    ev("claim", 8, 4, "w2"), ev("complete", 10, 4, "w2"),
]


def test_a_killed_and_resumed_job_splits_useful_from_redone() -> None:
    h = history(KILLED_AND_RESUMED)
    assert [(a.number, a.resumed_from) for a in h.attempts] == [(1, None), (2, 1), (3, 1), (4, 3)]
    used = attempt_usage(h, gpus_of, now=99 * H)
    # wall x GPUs: 2.5h x 1, 1h x 2, 2h x 1, 2h x 2
    assert [round(a.gpu_hours, 9) for a in used] == [2.5, 2.0, 2.0, 4.0]
    # attempt 1: after checkpoint 1 (1h) to its end (2.5h), 1 GPU; attempt 2: all of it (its
    # successor resumed from a checkpoint older than it), 2 GPUs; attempt 3: none (attempt 4
    # resumed from the checkpoint it ended with); attempt 4: last, nothing after it
    assert [round(a.gpu_hours_redone, 9) for a in used] == [1.5, 2.0, 0.0, 0.0]
    t = totals(used)
    assert (t.attempts, round(t.gpu_hours, 9), round(t.gpu_hours_redone, 9),
            round(t.gpu_hours_useful, 9)) == (4, 10.5, 3.5, 7.0)
    clusters = by_cluster(used, cluster_of)
    assert {n: (c.attempts, round(c.gpu_hours, 9), round(c.gpu_hours_redone, 9))
            for n, c in clusters.items()} == {"hpc": (2, 4.5, 1.5), "cloud": (2, 6.0, 2.0)}


def test_a_rejected_resume_point_makes_the_fallback_the_resume_point() -> None:
    # Attempt 1 checkpoints at 1h and 2h and is killed at 2.5h; attempt 2 finds checkpoint 2
    # corrupt and resumes from 1: everything after 1h is redone (1.5h), not after 2h (0.5h).
    h = history([ev("claim", 0, 1, "w1"), ev("checkpoint", 1, 1, "w1", seq=1),
                 ev("checkpoint", 2, 1, "w1", seq=2), ev("lose", 2.5, 1, "w1"),
                 ev("claim", 3, 2, "w1"), ev("checkpoint_rejected", 3.1, 2, "w1", seq=2)])
    assert h.attempts[1].resumed_from == 1
    first, running = attempt_usage(h, gpus_of, now=4 * H)
    assert (first.gpu_hours, first.gpu_hours_redone) == (2.5, 1.5)
    assert (running.gpu_hours, running.gpu_hours_redone) == (1.0, 0.0)  # 3h to now (4h)


def test_a_running_attempt_counts_up_to_now_and_an_unknown_worker_uses_the_jobs_gpus() -> None:
    h = history([ev("claim", 1, 1, "gone-worker"), ev("checkpoint", 2, 1, "gone-worker", seq=1)])
    (a,) = attempt_usage(h, gpus_of, now=2.5 * H)
    assert (a.seconds, a.gpus, a.gpu_hours, a.gpu_hours_redone) == (1.5 * H, 4, 6.0, 0.0)
    assert by_cluster([a], cluster_of).keys() == {"unknown"}


def test_operator_actions_on_an_idle_job_do_not_stretch_its_last_attempt() -> None:
    # Failed for good at 2h, requeued by the operator at 5h, cancelled from the queue at 6h:
    # the attempt ended at 2h.
    h = history([ev("claim", 0, 1, "w2"), ev("fail", 2, 1, "w2"), ev("requeue", 5, 1),
                 ev("cancel", 6, 1)])
    (a,) = attempt_usage(h, gpus_of, now=100 * H)
    assert (a.gpu_hours, a.gpu_hours_redone) == (4.0, 0.0)


def test_a_job_never_claimed_has_used_nothing() -> None:
    t = totals(attempt_usage(history([ev("submit", 0), ev("cancel", 1, 0)]), gpus_of, 5 * H))
    assert (t.attempts, t.gpu_hours, t.gpu_hours_redone, t.gpu_hours_useful) == (0, 0, 0, 0)


# --------------------------------------------------------------------------- rates and ETAs

PROGRESS = {"done": 12.0, "total": 100.0, "unit": "ns", "ns_per_day": 200.0}


def test_the_eta_divides_what_is_left_by_the_rate_between_checkpoints() -> None:
    # 10 ns per hour between the attempt's checkpoints; 88 ns left: 8.8 h = 31680 s. The
    # engine's 200 ns/day (which would give 88 / (200/86400) = 38016 s) is not used.
    points = [(0.0, 2.0), (1800.0, 7.0), (3600.0, 12.0)]
    assert rate(points) == pytest.approx(10 / 3600)
    assert eta_seconds(PROGRESS, points) == pytest.approx(31680.0)


def test_without_two_checkpoints_the_eta_uses_the_engines_ns_per_day() -> None:
    # 240 ns/day = 10 ns/h: 88 ns left is 8.8 h
    progress = {**PROGRESS, "ns_per_day": 240.0}
    assert eta_seconds(progress, [(0.0, 2.0)]) == pytest.approx(31680.0)
    assert eta_seconds(progress, [(0.0, 5.0), (60.0, 5.0)]) == pytest.approx(31680.0)  # no growth
    assert ns_per_day(progress) == 240.0


@pytest.mark.parametrize(("progress", "points", "eta"), [
    (None, [], None),  # no progress reported
    ({"done": 5.0, "total": None, "unit": "ns", "ns_per_day": 240.0}, [], None),  # no total
    ({"done": 5.0, "total": 10.0, "unit": "steps", "ns_per_day": 240.0}, [], None),  # not ns
    ({"done": 5.0, "total": 10.0, "unit": "ns", "ns_per_day": None}, [], None),  # no rate
    ({"done": 10.0, "total": 10.0, "unit": "steps"}, [], 0.0),  # done
    ({"done": 5.0, "total": 10.0, "unit": "steps"}, [(100.0, 1.0), (50.0, 0.0)], 250.0),
])
def test_eta_edge_cases(progress: dict | None, points: list[tuple[float, float]],
                        eta: float | None) -> None:
    assert eta_seconds(progress, points) == eta

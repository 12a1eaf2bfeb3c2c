"""Claim ranking and set-aside (relaymd/server/scheduling.py) as tables: pure functions, no
database, no clock."""

from __future__ import annotations

import pytest

from relaymd.server.scheduling import Candidate, Rival, can_run, choose, claiming, rank


def job(id_: str, gpus: int = 1, clusters: tuple[str, ...] | None = None,
        trusted_only: bool = False) -> Candidate:
    return Candidate(id_, gpus, clusters, trusted_only)


HPC2 = Rival(2, "hpc", True)
HPC1 = Rival(1, "hpc", True)
SALAD1 = Rival(1, "salad", False)


@pytest.mark.parametrize(("candidates", "better", "chosen"), [
    ([], [], None),  # nothing queued
    ([job("a")], [], "a"),  # nobody better: the first job
    ([job("a")], [HPC1], None),  # the only job is set aside for the better worker
    ([job("a"), job("b")], [HPC1], "b"),  # the better one gets a, the claimer b
    ([job("a", gpus=2), job("b")], [HPC2], "b"),  # big job to the big worker
    ([job("a", gpus=2), job("b")], [HPC1], "a"),  # HPC1 cannot run a: a is not set aside
    ([job("a", gpus=2), job("b")], [HPC1, HPC2], None),  # a set aside for HPC2, b for HPC1
    ([job("a", clusters=("hpc",)), job("b")], [SALAD1], "a"),  # salad cannot take a pinned job
    ([job("a", trusted_only=True), job("b")], [SALAD1], "a"),  # nor a trusted-only one
    ([job("a", trusted_only=True), job("b")], [HPC1], "b"),  # a trusted rival can
    ([job("a"), job("b"), job("c")], [HPC1, SALAD1], "c"),  # one job set aside per rival
])
def test_choose(candidates: list[Candidate], better: list[Rival], chosen: str | None) -> None:
    assert choose(candidates, better) == chosen


def test_choose_sets_aside_in_rank_order_of_the_rivals() -> None:
    # HPC1 (first, best) cannot run the 2-GPU job; HPC2 can: a goes to HPC2, b to HPC1.
    assert choose([job("a", gpus=2), job("b"), job("c")], [HPC1, HPC2]) == "c"


@pytest.mark.parametrize(("rival", "candidate", "ok"), [
    (HPC1, job("a"), True),
    (HPC1, job("a", gpus=2), False),
    (HPC1, job("a", clusters=("hpc",)), True),
    (SALAD1, job("a", clusters=("hpc",)), False),
    (SALAD1, job("a", trusted_only=True), False),
    (HPC1, job("a", trusted_only=True), True),
])
def test_can_run(rival: Rival, candidate: Candidate, ok: bool) -> None:
    assert can_run(rival, candidate) is ok


def test_rank_orders_gpus_then_priority_then_vram() -> None:
    workers = {"salad-4gpu": rank(4, 0, 24), "hpc-1gpu": rank(1, 20, 80),
               "local-1gpu": rank(1, 10, 80), "hpc-1gpu-small": rank(1, 20, 16)}
    assert sorted(workers, key=workers.__getitem__) == [
        "salad-4gpu", "hpc-1gpu", "hpc-1gpu-small", "local-1gpu"]


@pytest.mark.parametrize(("last", "now", "window", "ok"), [
    (100.0, 100.0, 45.0, True), (60.0, 100.0, 45.0, True), (54.0, 100.0, 45.0, False),
])
def test_claiming(last: float, now: float, window: float, ok: bool) -> None:
    assert claiming(last, now, window) is ok

"""The `salad` provider against a fake Salad API on loopback (tests/salad_fake.py): scaling up
from stopped, the max_workers and Salad caps, pending replicas, scale to zero only after idle_grace
with nothing busy, and every kind of API failure as a ProviderError (submit) or a note
(reconcile) that never shows the API key."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from relaymd.config import ClusterConfig, SaladSettings
from relaymd.server.provisioning.base import ProviderError
from relaymd.server.provisioning.salad import SaladProvider

from .salad_fake import FakeSalad

KEY = "sk-salad-7f3e9c1d2b4a"  # distinctive, so a leak into a message is easy to spot


class Clock:
    """The injected monotonic clock: moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> Iterator[FakeSalad]:
    with FakeSalad(api_key=KEY) as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_cluster(fake: FakeSalad, *, max_workers: int = 3, idle_grace: float = 60.0,
                 request_timeout: float = 2.0, group: str | None = None) -> ClusterConfig:
    g = fake.group
    return ClusterConfig(name="salad-test", provider="salad", max_workers=max_workers,
                         salad=SaladSettings(organization=g.organization, project=g.project,
                                             container_group=group or g.name,
                                             base_url=fake.base_url, idle_grace=idle_grace,
                                             request_timeout=request_timeout))


@pytest.fixture
async def make(fake: FakeSalad, clock: Clock) -> AsyncIterator[Callable[..., SaladProvider]]:
    made: list[SaladProvider] = []

    def build(key: str = KEY, **kwargs: Any) -> SaladProvider:
        p = SaladProvider(make_cluster(fake, **kwargs), key, clock=clock)
        made.append(p)
        return p

    yield build
    for p in made:
        await p.stop()


def worker(status: str, provider_id: str | None = None, n: int = 0) -> dict[str, Any]:
    return {"id": f"w{n}-{status}", "status": status, "provider_id": provider_id,
            "job_id": "job-1" if status == "busy" else None}


# -- scaling up ---------------------------------------------------------------------------------


async def test_submit_on_a_stopped_group_patches_replicas_then_starts_it(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    p = make()
    assert fake.group.status == "stopped" and fake.group.replicas == 0
    assert await p.submit(2) == 2
    patches = fake.calls("PATCH")
    assert [r.body for r in patches] == [{"replicas": 2}]
    assert patches[0].content_type == "application/merge-patch+json"
    assert all(r.authorized for r in fake.calls()), "a request went out without the right key"
    starts = fake.calls("POST", "/start")
    assert len(starts) == 1
    assert fake.requests.index(patches[0]) < fake.requests.index(starts[0]), \
        "the group was started before its replica count was set"
    assert fake.group.status == "running" and len(fake.group.instances) == 2


async def test_submit_on_a_running_group_adds_replicas_without_a_start(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    fake.set_group(replicas=1, status="running")
    p = make(max_workers=4)
    assert await p.submit(2) == 2
    assert [r.body for r in fake.calls("PATCH")] == [{"replicas": 3}]
    assert fake.calls("POST") == [], "a running group was started again"


async def test_submit_is_capped_at_max_workers(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    fake.set_group(replicas=2, status="running")
    p = make(max_workers=3)
    assert await p.submit(5) == 1
    assert [r.body for r in fake.calls("PATCH")] == [{"replicas": 3}]
    fake.clear_requests()
    assert await p.submit(1) == 0, "scaled past max_workers"
    assert fake.mutations() == [], "a request that changes the group went out at max_workers"
    assert fake.group.replicas == 3


async def test_submit_respects_salads_replica_limit(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    fake.set_group(replicas=499, status="running")
    p = make(max_workers=10000)
    assert await p.submit(10) == 1
    assert [r.body for r in fake.calls("PATCH")] == [{"replicas": 500}]
    assert await p.submit(1) == 0


async def test_submit_resets_the_idle_countdown(
        fake: FakeSalad, make: Callable[..., SaladProvider], clock: Clock) -> None:
    fake.set_group(replicas=2, status="running")
    p = make(max_workers=4, idle_grace=60)
    idle = [worker("idle", m, n) for n, m in enumerate(fake.group.machine_ids())]
    await p.reconcile(idle)
    await p.scale_in(idle)  # the countdown starts at t=1000
    clock.now += 50
    await p.submit(1)  # work came in at t=1050
    clock.now += 20
    await p.scale_in(idle)  # t=1070: the countdown starts over here
    clock.now += 59
    await p.scale_in(idle)
    assert fake.calls("POST", "/stop") == [], "stopped less than idle_grace after a submit"
    clock.now += 2
    await p.scale_in(idle)
    assert len(fake.calls("POST", "/stop")) == 1


# -- what reconcile reports ---------------------------------------------------------------------


async def test_reconcile_counts_replicas_not_yet_registered(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    fake.new_instance_state = "allocating"
    fake.set_group(replicas=4, status="running")
    m = fake.group.machine_ids()
    fake.set_instance_state(m[0], "running")
    fake.set_instance_state(m[1], "running")
    p = make(max_workers=4)
    workers = [worker("idle", m[0], 0), worker("busy", m[1], 1), worker("stale", "old-machine", 2),
               worker("quarantined", "bad-machine", 3), worker("provisioning", None, 4)]
    seen = await p.reconcile(workers)
    assert seen.pending == 2, seen  # 4 asked for, 2 registered (idle + busy)
    assert seen.details["replicas"] == 4
    assert seen.details["state"] == "running"
    assert seen.details["instances"] == 4
    assert seen.details["instance_states"] == {"running": 2, "allocating": 2}
    assert "2 replicas starting" in seen.note
    assert fake.mutations() == [], "reconcile changed the group"


async def test_reconcile_on_a_deploying_group_counts_every_replica(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    fake.new_instance_state = "downloading"
    fake.set_group(replicas=3, status="deploying")
    seen = await make().reconcile([])
    assert seen.pending == 3 and seen.details["state"] == "deploying"
    assert "3 replicas starting" in seen.note


async def test_reconcile_on_a_stopped_group_reports_nothing_pending(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    fake.set_group(replicas=3, status="stopped")  # a stale count on a stopped group runs nothing
    seen = await make().reconcile([])
    assert seen.pending == 0
    assert seen.details["state"] == "stopped" and seen.details["instances"] == 0
    assert "stopped" in seen.note


async def test_reconcile_reports_a_failed_group_with_the_fix(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    fake.set_group(replicas=2, status="failed")
    fake.group.description = "Failed to pull image"
    p = make()
    seen = await p.reconcile([])
    assert seen.pending == 0
    assert "Failed to pull image" in seen.note and "portal" in seen.note
    with pytest.raises(ProviderError, match="failed"):
        await p.submit(1)
    assert fake.mutations() == []


# -- scaling in ---------------------------------------------------------------------------------


async def test_scale_in_waits_for_idle_grace_then_scales_to_zero(
        fake: FakeSalad, make: Callable[..., SaladProvider], clock: Clock) -> None:
    fake.set_group(replicas=2, status="running")
    p = make(idle_grace=60)
    idle = [worker("idle", m, n) for n, m in enumerate(fake.group.machine_ids())]
    await p.reconcile(idle)
    await p.scale_in(idle)
    clock.now += 59.9
    await p.scale_in(idle)
    assert fake.mutations() == [], "scaled in before idle_grace had passed"
    clock.now += 0.2
    await p.scale_in(idle)
    assert [(r.method, r.path.rsplit("/", 1)[-1], r.body) for r in fake.mutations()] == [
        ("POST", "stop", None), ("PATCH", fake.group.name, {"replicas": 0})]
    assert fake.group.status == "stopped" and fake.group.replicas == 0
    assert fake.group.instances == []
    fake.clear_requests()
    clock.now += 600
    await p.scale_in([])
    await p.reconcile([])
    await p.scale_in([])
    assert fake.mutations() == [], "a stopped group was stopped again"


async def test_scale_in_never_scales_while_a_worker_is_busy(
        fake: FakeSalad, make: Callable[..., SaladProvider], clock: Clock) -> None:
    fake.set_group(replicas=3, status="running")
    p = make(idle_grace=60)
    m = fake.group.machine_ids()
    busy = [worker("busy", m[0], 0), worker("idle", m[1], 1), worker("idle", m[2], 2)]
    await p.reconcile(busy)
    for _ in range(5):
        await p.scale_in(busy)
        clock.now += 1000
    assert fake.mutations() == [], "replicas changed while a worker was busy"
    assert fake.group.replicas == 3 and fake.group.status == "running"
    # The job ends: the countdown starts only now, not at the first idle cycle long ago.
    idle = [worker("idle", m[n], n) for n in range(3)]
    await p.scale_in(idle)
    clock.now += 59
    await p.scale_in(idle)
    assert fake.mutations() == []
    clock.now += 2
    await p.scale_in(idle)
    assert len(fake.calls("POST", "/stop")) == 1


async def test_a_busy_worker_seen_by_reconcile_restarts_the_countdown(
        fake: FakeSalad, make: Callable[..., SaladProvider], clock: Clock) -> None:
    fake.set_group(replicas=1, status="running")
    p = make(idle_grace=60)
    (m,) = fake.group.machine_ids()
    await p.scale_in([worker("idle", m)])
    clock.now += 40
    await p.reconcile([worker("busy", m)])  # a job ran between two scale_in calls
    clock.now += 40
    await p.scale_in([worker("idle", m)])
    assert fake.mutations() == [], "the countdown survived a busy worker"


async def test_stop_closes_the_client_and_leaves_the_group_running(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    fake.set_group(replicas=2, status="running")
    p = make()
    await p.reconcile([])
    await p.stop()
    assert fake.mutations() == []
    assert fake.group.status == "running" and fake.group.replicas == 2


# -- failures -----------------------------------------------------------------------------------


async def test_a_wrong_api_key_is_a_provider_error_without_the_key(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    wrong = "sk-wrong-0000aaaa1111bbbb"
    p = make(key=wrong)
    with pytest.raises(ProviderError) as err:
        await p.submit(1)
    msg = str(err.value)
    assert "401" in msg and "API key" in msg and "salad-test" in msg, msg
    assert wrong not in msg and KEY not in msg, msg
    assert fake.mutations() == []
    seen = await p.reconcile([])
    assert seen.note.startswith("salad:") and "401" in seen.note, seen.note
    assert wrong not in seen.note and wrong not in repr(seen.details)


async def test_an_error_body_that_echoes_the_key_is_scrubbed(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    # Salad does not echo the key, but a proxy in front of a wrong base_url might.
    fake.fail(times=2, status=400, detail=f"bad header Salad-Api-Key: {KEY}")
    p = make()
    with pytest.raises(ProviderError) as err:
        await p.submit(1)
    assert "HTTP 400" in str(err.value) and KEY not in str(err.value), str(err.value)
    seen = await p.reconcile([])
    assert "HTTP 400" in seen.note and KEY not in seen.note, seen.note


async def test_an_unknown_container_group_names_the_group_and_the_setting(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    p = make(group="no-such-group")
    with pytest.raises(ProviderError) as err:
        await p.submit(1)
    msg = str(err.value)
    assert "404" in msg and "no-such-group" in msg and "salad.container_group" in msg, msg
    assert "salad-test" in msg and "get container group" in msg, msg
    seen = await p.reconcile([])
    assert "404" in seen.note and seen.pending == 0


def _inject(fake: FakeSalad, kind: str) -> None:
    if kind == "500":
        fake.fail(times=2, status=500, detail="database on fire")
    elif kind == "hang":
        fake.hang(3.0, times=2)
    elif kind == "garbage":
        fake.garbage(times=2)
    else:
        fake.wrong_shape(times=2)


EXPECTED = {"500": "database on fire", "hang": "within 0.3s", "garbage": "not JSON",
            "wrong_shape": "expected a container group"}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
async def test_api_faults_raise_from_submit_and_become_notes_in_reconcile(
        fake: FakeSalad, make: Callable[..., SaladProvider], kind: str) -> None:
    fake.set_group(replicas=2, status="deploying")
    p = make(request_timeout=0.3)
    first = await p.reconcile([])
    assert first.pending == 2
    _inject(fake, kind)
    with pytest.raises(ProviderError) as err:
        await p.submit(1)
    msg = str(err.value)
    assert EXPECTED[kind] in msg and "salad-test" in msg and "get container group" in msg, msg
    if kind == "500":
        assert "HTTP 500" in msg
    assert KEY not in msg
    seen = await p.reconcile([])  # must not raise
    assert seen.pending == 2, "reconcile forgot the last known pending count"
    assert seen.note.startswith("salad: get container group failed") and EXPECTED[kind] in seen.note
    assert KEY not in seen.note
    assert fake.mutations() == []
    # The fault is over: the next cycle works again.
    assert (await p.reconcile([])).note == "2 replicas starting"


async def test_a_failed_start_after_the_patch_is_a_provider_error_naming_start(
        fake: FakeSalad, make: Callable[..., SaladProvider]) -> None:
    p = make()
    fake.fail(status=503, detail="scheduler unavailable", method="POST", path_suffix="/start")
    with pytest.raises(ProviderError, match=r"start container group .*HTTP 503.*scheduler"):
        await p.submit(2)
    assert fake.group.status == "stopped"
    assert await p.submit(2) == 2, "the retry next cycle did not start the group"
    assert fake.group.status == "running" and fake.group.replicas == 2


async def test_connection_refused_is_a_provider_error(clock: Clock) -> None:
    with FakeSalad(api_key=KEY) as gone:
        cluster = make_cluster(gone)
    p = SaladProvider(cluster, KEY, clock=clock)  # the server has closed its port
    try:
        with pytest.raises(ProviderError, match="cannot reach"):
            await p.submit(1)
        assert (await p.reconcile([])).note.startswith("salad: get container group failed")
    finally:
        await p.stop()


# -- the fake itself holds to the documented contract -------------------------------------------


async def test_the_fake_enforces_key_media_type_and_replica_limits(fake: FakeSalad) -> None:
    import httpx

    g = fake.group
    url = f"{fake.base_url}/organizations/{g.organization}/projects/{g.project}/containers/{g.name}"
    async with httpx.AsyncClient() as c:
        assert (await c.get(url)).status_code == 401
        ok = {"Salad-Api-Key": KEY}
        assert (await c.get(url, headers=ok)).json()["current_state"]["status"] == "stopped"
        r = await c.patch(url, json={"replicas": 1}, headers=ok)
        assert r.status_code == 415, "PATCH accepted without application/merge-patch+json"
        mp = {**ok, "Content-Type": "application/merge-patch+json"}
        assert (await c.patch(url, content=b'{"replicas": 501}', headers=mp)).status_code == 400
        assert (await c.patch(url, content=b'{"replicas": 1}', headers=mp)).json()["replicas"] == 1
        assert (await c.post(url + "/start", headers=ok)).status_code == 202
        instances = (await c.get(url + "/instances", headers=ok)).json()["instances"]
        assert [sorted(i) for i in instances] == [sorted(
            ["id", "machine_id", "state", "update_time", "version", "ready", "started",
             "deletion_cost"])]
        missing = url.replace(g.name, "nope")
        assert (await c.get(missing, headers=ok)).status_code == 404

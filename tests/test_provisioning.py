"""Provisioning decisions without a cluster: strategies on tables of situations, routing of
queued work across clusters (HPC first, overflow, blocked reasons), the SLURM output parsers,
placeholders and the claim policy through the real API, and `relaymd clusters`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from relaymd.config import ClusterConfig, ConfigError, OrchestratorSettings, load_settings
from relaymd.server.provisioning.base import ProviderError, Seen
from relaymd.server.provisioning.blocked import Offer, why_blocked
from relaymd.server.provisioning.provisioner import Provisioner
from relaymd.server.provisioning.slurm import (
    TemplateError,
    parse_sbatch,
    parse_scontrol_state,
    parse_squeue,
    render,
)
from relaymd.server.provisioning.strategies import ClusterView, decide

from .conftest import RunningOrchestrator, make_settings, submit
from .test_worker import wait_for


def cluster(strategy: str = "reactive", **kw: Any) -> ClusterConfig:
    base: dict[str, Any] = {"name": "hpc", "provider": "slurm", "strategy": strategy,
                            "max_pending": 2, "max_workers": 4}
    return ClusterConfig.model_validate({**base, **kw})


# --------------------------------------------------------------------------- strategies

# (strategy, extra config, view: waiting idle busy pending live_jobs, submit, words in the reason)
CASES: list[tuple[str, dict[str, Any], tuple[int, int, int, int, int], int, str]] = [
    ("reactive", {}, (0, 0, 0, 0, 0), 0, "no queued job"),
    ("reactive", {}, (3, 0, 0, 0, 3), 1, "no idle or pending"),
    ("reactive", {}, (3, 1, 0, 0, 3), 0, "1 idle"),
    ("reactive", {}, (3, 0, 0, 1, 3), 0, "1 pending"),
    ("reactive", {}, (1, 0, 4, 0, 5), 0, "max_workers (4"),
    ("reactive", {"max_pending": 0}, (1, 0, 0, 0, 1), 0, "max_pending"),
    ("reactive", {"enabled": False}, (5, 0, 0, 0, 5), 0, "disabled"),
    ("continuous", {"target_workers": 3}, (0, 0, 0, 0, 0), 0, "no job is queued or running"),
    ("continuous", {"target_workers": 3}, (0, 0, 1, 0, 1), 2, "1 of target 3"),
    ("continuous", {"target_workers": 3}, (2, 0, 1, 1, 3), 1, "2 of target 3"),
    ("continuous", {"target_workers": 3}, (0, 1, 2, 0, 2), 0, "3 of target 3"),
    ("continuous", {"target_workers": 5, "max_pending": 2}, (5, 0, 0, 0, 5), 2,
     "2 of 5 within max_pending"),
    ("continuous", {"target_workers": 9}, (9, 0, 3, 0, 9), 1, "1 of 6 within max_workers"),
    ("jit_threshold", {"threshold": 2}, (2, 0, 0, 0, 2), 0, "threshold 2"),
    ("jit_threshold", {"threshold": 2}, (3, 0, 0, 0, 3), 2, "3 queued beyond"),
    ("jit_threshold", {"threshold": 2}, (5, 1, 0, 1, 5), 1, "1 of 3 within max_pending"),
    ("jit_threshold", {"threshold": 0}, (1, 1, 0, 0, 1), 0, "0 queued beyond"),
    ("jit_threshold", {"threshold": 0}, (9, 0, 1, 0, 9), 2, "within max_pending"),
]


@pytest.mark.parametrize(("strategy", "extra", "numbers", "submit", "words"), CASES)
def test_strategy_decisions(strategy: str, extra: dict[str, Any],
                            numbers: tuple[int, int, int, int, int], submit: int,
                            words: str) -> None:
    waiting, idle, busy, pending, live = numbers
    d = decide(cluster(strategy, **extra), ClusterView(waiting, idle, busy, pending, live))
    assert (d.submit, words in d.reason) == (submit, True), \
        f"{strategy} {extra} {numbers}: got {d}, wanted {submit} and {words!r}"


def test_no_strategy_ever_exceeds_its_limits() -> None:
    for strategy in ("reactive", "continuous", "jit_threshold"):
        for target in (0, 1, 3, 8):
            c = cluster(strategy, target_workers=target, max_pending=2, max_workers=5)
            for waiting in range(0, 8):
                for idle in range(0, 3):
                    for busy in range(0, 6):
                        for pending in range(0, 3):
                            v = ClusterView(waiting, idle, busy, pending, waiting + busy)
                            d = decide(c, v)
                            assert d.submit >= 0
                            assert pending + d.submit <= max(2, pending), (strategy, v, d)
                            if d.submit:
                                assert v.alive + d.submit <= 5, (strategy, v, d)


# --------------------------------------------------------------------------- routing


class StillProvider:
    """A provider that requests nothing by itself; records what it was asked for."""

    def __init__(self, config: ClusterConfig, pending: int = 0, fail: bool = False) -> None:
        self.cluster = config
        self.pending = pending
        self.fail = fail
        self.asked: list[int] = []
        self.scaled_in = 0

    async def reconcile(self, workers: list[dict[str, Any]]) -> Seen:
        return Seen(pending=self.pending)

    async def submit(self, count: int) -> int:
        self.asked.append(count)
        if self.fail:
            raise ProviderError("sbatch exited 1: QOS limit")
        return count

    async def scale_in(self, workers: list[dict[str, Any]]) -> None:
        self.scaled_in += 1

    async def stop(self) -> None:
        pass


def provisioner(configs: list[ClusterConfig], pending: dict[str, int] | None = None
                ) -> Provisioner:
    providers = {c.name: StillProvider(c, (pending or {}).get(c.name, 0)) for c in configs}
    p = Provisioner(OrchestratorSettings(home=Path("/nonexistent")), None, configs, providers)  # type: ignore[arg-type]
    for name, state in p.clusters.items():
        state.seen = Seen(pending=(pending or {}).get(name, 0))
    return p


def job(i: int, gpus: int = 1, prefer: list[str] | None = None,
        trusted_only: bool = False) -> dict[str, Any]:
    return {"id": f"j{i}", "gpus": gpus, "preferred_clusters": json.dumps(prefer) if prefer
            else None, "blocked_reason": None, "trusted_only": int(trusted_only)}


HPC = ClusterConfig(name="hpc", provider="slurm", max_pending=1, max_workers=2)
SALAD = ClusterConfig.model_validate({"name": "cloud", "provider": "salad", "max_pending": 5,
                                      "max_workers": 10, "salad": {"organization": "o",
                                      "project": "p", "container_group": "g"}})


def test_hpc_is_filled_first_and_the_overflow_goes_to_salad() -> None:
    p = provisioner([SALAD, HPC])
    assert list(p.clusters) == ["hpc", "cloud"], "HPC must come before Salad by default"
    waiting, blocked = p.route([job(i) for i in range(4)], [])
    # hpc can cover one now (max_pending 1): the other three overflow to the cloud
    assert waiting == {"hpc": 1, "cloud": 3}, waiting
    assert set(blocked.values()) == {None}, blocked


def test_idle_workers_count_as_room() -> None:
    p = provisioner([SALAD, HPC])
    workers = [{"cluster": "hpc", "status": "idle"}]
    waiting, _ = p.route([job(i) for i in range(2)], workers)
    assert waiting == {"hpc": 2}, waiting  # one idle + one it may still request


def test_blocked_reasons_say_why_a_job_cannot_run_anywhere() -> None:
    p = provisioner([SALAD, HPC])
    waiting, blocked = p.route([job(1, gpus=4), job(2, prefer=["nowhere"]),
                                job(3, prefer=["cloud"])], [])
    assert blocked["j1"] == (
        "wants 4 GPUs; no worker is registered, and no configured cluster can start one (hpc "
        "starts workers with 1 GPU; cloud starts workers with 1 GPU). Fix: add a cluster whose "
        "workers have 4 GPUs (`gpus: 4` under `clusters:`), or submit it again with fewer "
        "(--gpus)"), blocked
    assert blocked["j2"] == (
        "wants 1 GPU on nowhere only; no worker is registered, and no configured "
        "cluster can start one (nowhere: no such cluster is configured). Fix: add nowhere under "
        "`clusters:` or submit it again with --cluster naming a configured one (hpc, cloud)"), \
        blocked
    assert blocked["j3"] is None and waiting == {"cloud": 1}, (blocked, waiting)
    p.switches = {"cloud": False}
    _, blocked = p.route([job(3, prefer=["cloud"])], [])
    assert "no configured cluster can start one (cloud is disabled). Fix: `relaymd clusters " \
        "enable cloud`" in (blocked["j3"] or ""), blocked


def test_a_gpu_job_with_only_cpu_workers_registered_says_so() -> None:
    # No cluster configured (local_workers 0), two CPU workers started by hand.
    cpu = [{"cluster": "local", "status": "busy", "gpus": 0},
           {"cluster": "local", "status": "idle", "gpus": 0}]
    _, blocked = provisioner([]).route([job(1)], cpu)
    assert blocked["j1"] == (
        "wants 1 GPU; the 2 registered workers have 0 GPUs, and no cluster is configured to "
        "start workers. Fix: add a cluster whose workers have 1 GPU (`gpus: 1` under "
        "`clusters:`), or submit it again with fewer (--gpus)"), blocked
    # ... and with this machine's CPU-only cluster configured, the cluster is named
    local = cluster(name="local", provider="local")  # a local cluster's workers have 0 GPUs
    _, blocked = provisioner([local]).route([job(1)], cpu[:1])
    assert "the 1 registered worker has 0 GPUs, and no configured cluster can start one (local " \
        "starts workers with 0 GPUs)" in (blocked["j1"] or ""), blocked


def test_a_disabled_cluster_too_small_for_the_job_is_not_offered_as_the_fix() -> None:
    p = provisioner([cluster(slurm={"gpus": 0})])
    p.switches = {"hpc": False}
    _, blocked = p.route([job(1)], [])
    reason = blocked["j1"] or ""
    assert "(hpc starts workers with 0 GPUs)" in reason and "enable" not in reason, reason


def test_a_trusted_only_job_with_only_untrusted_capacity_says_so() -> None:
    untrusted = [{"cluster": "cloud", "status": "idle", "gpus": 1}]
    _, blocked = provisioner([SALAD]).route([job(1, trusted_only=True)], untrusted)
    assert blocked["j1"] == (
        "wants 1 GPU on a trusted cluster; the 1 registered worker is untrusted (cloud), and no "
        "configured cluster can start one (cloud is untrusted). Fix: add a trusted cluster (a "
        "SLURM account, or local_workers on this machine), or submit it again without "
        "--trusted-only"), blocked


def test_registered_workers_of_other_clusters_are_named() -> None:
    elsewhere = [{"cluster": "local", "status": "idle", "gpus": 8}]
    _, blocked = provisioner([HPC]).route([job(1, prefer=["cloud"])], elsewhere)
    assert "no worker of cloud is registered (the 1 registered worker is on local)" \
        in (blocked["j1"] or ""), blocked


def test_a_registered_worker_that_fits_unblocks_or_is_waited_for() -> None:
    # No cluster can start a 2-GPU worker, but one is registered: idle, it takes the job (no
    # reason); busy, the job waits for it.
    p = provisioner([HPC])
    waiting, blocked = p.route([job(1, gpus=2)], [{"cluster": "local", "status": "idle",
                                                  "gpus": 2}])
    assert blocked == {"j1": None} and waiting == {}, (blocked, waiting)
    _, blocked = p.route([job(1, gpus=2)], [{"cluster": "local", "status": "busy", "gpus": 2}])
    assert (blocked["j1"] or "").startswith(
        "waiting for capacity: the 1 registered worker that can run it is busy, and no "
        "configured cluster can start one (hpc starts workers with 1 GPU)"), blocked
    # An idle worker no longer asking for work (its allocation is ending) is no capacity either.
    leaving = why_blocked(2, None, False, [], [Offer("local", 2, True, asking=False)])
    assert (leaving or "").startswith("waiting for capacity: the 1 registered worker that can "
                                      "run it is busy or no longer asking for work"), leaving


def test_a_job_everyone_able_is_full_for_waits_with_a_reason() -> None:
    p = provisioner([HPC], pending={"hpc": 1})
    workers = [{"cluster": "hpc", "status": "busy"}]
    waiting, blocked = p.route([job(1), job(2)], workers)
    # room: 0 idle + 1 pending covers j1; j2 finds hpc at its limits
    assert blocked["j1"] is None and "hpc is at its limits" in (blocked["j2"] or ""), blocked
    assert waiting == {"hpc": 2}


# --------------------------------------------------------------------------- SLURM parsing


def test_sbatch_output_parsing() -> None:
    assert parse_sbatch("1234\n") == "1234"
    assert parse_sbatch("1234;gpucluster\n") == "1234"
    for garbage in ("", "Submitted batch job 12", "sbatch: error: x", "12a"):
        with pytest.raises(ProviderError, match="no job id"):
            parse_sbatch(garbage)


def test_squeue_output_parsing_refuses_garbage() -> None:
    assert parse_squeue("12|RUNNING|None\n13|PENDING|Priority\n14|CANCELLED+|None\n") == {
        "12": ("RUNNING", "None"), "13": ("PENDING", "Priority"), "14": ("CANCELLED", "None")}
    assert parse_squeue("") == {}
    for garbage in ("12 RUNNING", "x|RUNNING|None", "12|running|None", "<html>"):
        with pytest.raises(ProviderError, match="unexpected line"):
            parse_squeue(garbage)
    assert parse_scontrol_state("JobId=5 JobName=x\n   JobState=NODE_FAIL Reason=None") \
        == "NODE_FAIL"
    assert parse_scontrol_state("garbage") is None


def test_template_rendering_refuses_unknown_placeholders() -> None:
    assert render("a={{ x }} b={{y}}", {"x": "1", "y": "2"}) == "a=1 b=2"
    with pytest.raises(TemplateError, match="unknown placeholder {{z}}"):
        render("{{z}}", {"x": "1"})


def test_cluster_config_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("clusters:\n  - {name: a, provider: salad}\n")
    with pytest.raises(ConfigError, match="needs a `salad:` section"):
        load_settings(path, environ={})
    path.write_text("clusters:\n  - {name: a, provider: slurm, slurm: {time: soon}}\n")
    with pytest.raises(ConfigError, match="not a SLURM time"):
        load_settings(path, environ={})
    path.write_text("clusters:\n  - {name: a, provider: local}\n  - {name: a, provider: local}\n")
    with pytest.raises(ConfigError, match="two clusters are named 'a'"):
        load_settings(path, environ={})
    env = {"RELAYMD_CLUSTERS": json.dumps([{"name": "b", "provider": "slurm"}])}
    s = load_settings(None, environ={**env, "XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert [(c.name, c.priority, c.slurm is not None) for c in s.clusters] == [("b", 20, True)]


# --------------------------------------------------------------------------- through the API


@pytest.fixture
def orch(tmp_path: Path) -> Any:
    # Workers register with their cluster's own token: each cluster a test's workers come from
    # is configured (none of them provisions anything: max_workers 0).
    settings = make_settings(tmp_path / "home", clusters=[
        {"name": "hpc", "provider": "local", "max_workers": 0},
        {"name": "cloud", "provider": "local", "max_workers": 0, "priority": 0},
        {"name": "elsewhere", "provider": "local", "max_workers": 0, "priority": 0}])
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()


def test_a_registering_worker_takes_its_placeholders_place(orch: RunningOrchestrator) -> None:
    placeholder = orch.call(orch.service.add_placeholder("hpc", "slurm", "777", 2, "hpc:777"))
    op = orch.operator()
    (w,) = op.workers()
    assert (w.id, w.status, w.provider_id, w.note) == (placeholder, "provisioning", "777",
                                                       "submitted")
    _, worker_id = orch.worker(cluster="hpc", provider="hpc", provider_id="777", gpus=2)
    assert worker_id == placeholder, "the worker got a new row instead of its placeholder's"
    (w,) = op.workers()
    assert (w.status, w.name, w.provider, w.note) == ("idle", "hpc:777", "slurm", None), w
    # Another cluster's worker with the same SLURM id is a different worker.
    _, other = orch.worker(cluster="elsewhere", provider_id="777")
    assert other != placeholder and len(op.workers()) == 2


def test_a_placeholder_dropped_by_its_provider_is_gone(orch: RunningOrchestrator) -> None:
    wid = orch.call(orch.service.add_placeholder("hpc", "slurm", "778", 1, "hpc:778"))
    orch.call(orch.service.drop_placeholder(wid, "SLURM job 778 ended CANCELLED"))
    (w,) = orch.operator().workers()
    assert w.status == "gone"
    orch.call(orch.service.drop_placeholder(wid, "again"))  # a second drop is harmless


def test_the_better_idle_worker_gets_the_job(orch: RunningOrchestrator, tmp_path: Path) -> None:
    # Both just registered, so both count as alive.
    small, _ = orch.worker(gpus=1, vram_gb=16, cluster="cloud", provider="salad")
    big, _ = orch.worker(gpus=2, vram_gb=80, cluster="hpc", provider="hpc")
    job_id = submit(orch.operator(), tmp_path, gpus=1)
    assert small.claim() is None, "the lesser worker took the only job from a better idle one"
    got = big.claim()
    assert got is not None and got.job.id == job_id
    second = submit(orch.operator(), tmp_path, title="second", gpus=1)
    got = small.claim()  # nobody better is idle now
    assert got is not None and got.job.id == second


def test_preferred_clusters_keep_a_job_off_other_clusters(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    other, _ = orch.worker(cluster="cloud")
    mine, _ = orch.worker(cluster="hpc")
    job_id = submit(orch.operator(), tmp_path, gpus=1, preferred_clusters=["hpc"])
    assert other.claim() is None, "a worker of another cluster took an hpc-only job"
    got = mine.claim()
    assert got is not None and got.job.id == job_id
    assert got.job.preferred_clusters == ["hpc"]


def test_a_gpu_job_waiting_on_cpu_workers_says_why_through_the_api(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    """The reported case: no cluster configured, CPU workers registered by hand; the job used
    to say "no cluster is configured" as if nothing were registered."""
    for _ in range(2):
        server.worker(gpus=0)
    job_id = submit(server.operator(), tmp_path, gpus=1)
    server.call(server.orch.provisioner.cycle())
    reason = server.operator().get_job(job_id).queue_blocked_reason
    assert reason is not None and reason.startswith(
        "wants 1 GPU; the 2 registered workers have 0 GPUs, and no cluster is configured to "
        "start workers. Fix: add a cluster whose workers have 1 GPU"), reason


def test_clusters_command_lists_and_switches(orch: RunningOrchestrator, tmp_path: Path) -> None:
    env = {"RELAYMD_HOME": str(orch.settings.home), "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relaymd", *args], capture_output=True,
                              text=True, env=env, timeout=60)

    orch.call(orch.orch.provisioner.cycle())
    listed = json.loads(cli("clusters", "--json").stdout)
    assert [(c["name"], c["provider"], c["enabled"]) for c in listed] == [
        ("hpc", "local", True), ("cloud", "local", True), ("elsewhere", "local", True)]
    assert listed[0]["last_decision"] == "no queued job for this cluster", listed
    for name in ("hpc", "cloud", "elsewhere"):
        out = cli("clusters", "disable", name)
        assert out.returncode == 0 and f"cluster {name}: disabled" in out.stdout, out
    submit(orch.operator(), tmp_path, gpus=0)
    orch.call(orch.orch.provisioner.cycle())
    info = orch.operator().clusters()[0]
    assert (info.enabled, info.last_decision) == (False, "disabled"), info
    (j,) = orch.operator().all_jobs()
    assert "disabled" in (j.queue_blocked_reason or ""), j
    table = cli("clusters")
    assert "hpc" in table.stdout and "disabled" in table.stdout, table.stdout
    missing = cli("clusters", "enable", "nope")
    assert missing.returncode == 1 and "no cluster 'nope'" in missing.stderr, missing
    # The switch survives a restart of the orchestrator.
    orch.stop()
    again = RunningOrchestrator(make_settings(orch.settings.home, clusters=[
        {"name": "hpc", "provider": "local", "max_workers": 0}])).start()
    try:
        (info,) = again.operator().clusters()
        assert info.enabled is False
    finally:
        again.stop()


def test_salad_overflow_scales_up_for_queued_work_and_to_zero_when_idle(tmp_path: Path) -> None:
    from .salad_fake import FakeSalad

    with FakeSalad(api_key="k-salad") as fake:
        g = fake.group
        settings = make_settings(tmp_path / "home", provision_interval=0.2,
                                 salad_api_key="k-salad", clusters=[{
                                     "name": "cloud", "provider": "salad", "max_workers": 2,
                                     "salad": {"organization": g.organization,
                                               "project": g.project, "container_group": g.name,
                                               "base_url": fake.base_url, "gpus": 1,
                                               "idle_grace": 0.5}}])
        orch = RunningOrchestrator(settings).start()
        try:
            op = orch.operator()
            job_id = submit(op, tmp_path, gpus=1)
            wait_for(lambda: fake.group.replicas == 1 and fake.group.status == "running", 10,
                     lambda: f"one replica for one queued job: {fake.group}")
            # The fake counts the replica while the loop still awaits Salad's answer; the
            # cluster's view says so once that cycle ends.
            wait_for(lambda: (lambda i: i.pending == 1 or i.last_submitted == 1)(
                op.clusters()[0]), 10, lambda: f"the loop to count the request: {op.clusters()}")
            # The replica's worker registers with its machine id and takes the job.
            client, _ = orch.worker(cluster="cloud", provider="salad", gpus=1,
                                    provider_id=fake.group.machine_ids()[0])
            got = client.claim()
            assert got is not None and got.job.id == job_id
            time.sleep(1.5)  # longer than idle_grace: but a busy worker holds the group up
            assert (fake.group.status, fake.group.replicas) == ("running", 1), fake.group
            client.complete(job_id, got.attempt)
            wait_for(lambda: fake.group.status == "stopped" and fake.group.replicas == 0, 10,
                     lambda: f"the idle group to go to zero: {fake.group}")
            assert fake.group.replicas == 0
        finally:
            orch.stop()


FAKE_SQUEUE = """#!/bin/bash
case "$(cat {mode})" in
  fail) echo "squeue: error: slurm_receive_msg: Socket timed out" >&2; exit 1 ;;
  garbage) echo "<html>maintenance</html>" ;;
  running) echo "{id}|RUNNING|None" ;;
  pending) echo "{id}|PENDING|Priority" ;;
  timeout) echo "{id}|TIMEOUT|None" ;;
  gone) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
esac
"""
FAKE_SCONTROL = """#!/bin/bash
echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1
"""


def test_slurm_reconcile_tells_unknown_from_dead(orch: RunningOrchestrator, tmp_path: Path) -> None:
    from relaymd.server.provisioning.slurm import LIST_GRACE, SlurmProvider

    bin_dir, mode = tmp_path / "bin", tmp_path / "mode"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE.format(mode=mode, id="901"))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scancel").write_text("#!/bin/sh\necho \"$@\" >> " + str(tmp_path / "cancelled") + "\n")
    for tool in ("squeue", "scontrol", "scancel"):
        (bin_dir / tool).chmod(0o755)
    config = cluster(slurm={"bin_dir": str(bin_dir), "register_timeout": 30, "squeue_interval": 0})
    clock = [orch.service.clock()]
    provider = SlurmProvider(config, orch.settings, orch.service, orch.url, "token",
                             clock=lambda: clock[0])
    wid = orch.call(orch.service.add_placeholder("hpc", "slurm", "901", 1, "hpc:901"))
    op = orch.operator()

    def look(state: str) -> tuple[Seen, str]:
        mode.write_text(state)
        rows = orch.call(orch.service.store.run(orch.service.store.cluster_workers))
        seen = orch.call(provider.reconcile([w for w in rows if w["cluster"] == "hpc"]))
        (w,) = [w for w in op.workers() if w.id == wid]
        return seen, f"{w.status}|{w.note}"

    assert look("pending") == (Seen(pending=1, note="1 pending in SLURM: Priority"),
                               "provisioning|PENDING (Priority)")
    for broken in ("fail", "garbage"):
        seen, row = look(broken)
        assert (seen.pending, row.split("|")[0]) == (1, "provisioning"), (broken, seen, row)
        assert seen.note.startswith("squeue failed"), seen
    # Missing from squeue: not dead while fresh (sbatch just returned), dead once SLURM forgot it.
    assert look("gone")[1].startswith("provisioning")
    clock[0] += LIST_GRACE + 1
    seen, row = look("running")
    assert (seen.pending, row) == (1, "provisioning|RUNNING"), (seen, row)
    clock[0] += 31  # RUNNING for longer than register_timeout without registering: cancelled
    seen, row = look("running")
    assert (seen.pending, row.split("|")[0]) == (0, "gone"), (seen, row)
    assert (tmp_path / "cancelled").read_text().split() == ["901"]
    # A registered worker whose allocation timed out is deregistered; its job is requeued.
    wid2 = orch.call(orch.service.add_placeholder("hpc", "slurm", "901", 1, "hpc:901"))
    client, got_id = orch.worker(cluster="hpc", provider_id="901", gpus=1)
    assert got_id == wid2
    job_id = submit(op, tmp_path, gpus=1)
    assert client.claim() is not None
    seen, row = look("timeout")
    assert row.startswith("gone"), row
    j = op.get_job(job_id)
    assert (j.status, j.failures) == ("queued", 0), j
    assert "SLURM job 901 ended TIMEOUT" in [e.reason for e in j.events if e.kind == "lose"][0]
    wid3 = orch.call(orch.service.add_placeholder("hpc", "slurm", "902", 1, "hpc:902"))
    clock[0] += LIST_GRACE + 1
    _, row = look("gone")  # squeue: Invalid job id; scontrol: Invalid job id; no sacct
    assert [w.status for w in op.workers() if w.id == wid3] == ["gone"]


def test_squeue_runs_at_most_every_squeue_interval(orch: RunningOrchestrator,
                                                   tmp_path: Path) -> None:
    from relaymd.server.provisioning.slurm import SlurmProvider

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho x >> {calls}\necho '903|PENDING|None'\n")
    (bin_dir / "squeue").chmod(0o755)
    provider = SlurmProvider(cluster(slurm={"bin_dir": str(bin_dir), "squeue_interval": 30}),
                             orch.settings, orch.service, orch.url, "token")
    orch.call(orch.service.add_placeholder("hpc", "slurm", "903", 1, "hpc:903"))
    rows = orch.call(orch.service.store.run(orch.service.store.cluster_workers))
    for _ in range(5):
        assert orch.call(provider.reconcile(rows)).pending == 1
    assert calls.read_text().count("x") == 1, "squeue ran more often than squeue_interval"

"""The local provider: the orchestrator starts `relaymd worker` processes for queued work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RunningOrchestrator, make_settings
from .test_worker import expected_result, final_result, long_job, submit_stepper, wait_for


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[RunningOrchestrator]:
    settings = make_settings(tmp_path / "home", heartbeat_interval=0.3, heartbeat_timeout=2.0,
                             local_workers=1, provision_interval=0.2, shutdown_wait=10)
    settings.reap_interval = 0.3
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()


def provider(orch: RunningOrchestrator):  # type: ignore[no-untyped-def]
    orch_obj = orch.orch
    assert orch_obj.provider is not None, "the local provider is not running"
    return orch_obj.provider


def test_queued_work_gets_a_local_worker_that_runs_it_and_is_reaped(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    op = orch.operator()
    assert op.workers() == [], "a worker started with nothing to do"
    first = submit_stepper(orch, tmp_path, total=30, step_s=0.01, every=10)
    second = submit_stepper(orch, tmp_path, total=30, step_s=0.01, every=10)
    wait_for(lambda: all(op.get_job(j).status == "completed" for j in (first, second)), 60,
             lambda: f"both jobs to complete: {[op.get_job(j).status for j in (first, second)]}")
    for job_id in (first, second):
        assert final_result(orch, job_id, tmp_path)["x"] == expected_result(30)
    p = provider(orch)
    wait_for(lambda: (p.reap(), p.workers == [])[1], 10, "the finished worker to be reaped")
    assert 1 <= p.started_total <= 2, f"started {p.started_total} workers for 2 jobs, max 1 live"
    logs = sorted((orch.settings.home / "logs").glob("worker-*.log"))
    assert logs and "claimed job" in logs[0].read_text(), "worker log missing or empty"


def test_stopping_the_orchestrator_hands_running_jobs_back_first(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    op = orch.operator()
    job_id = long_job(orch, tmp_path, step_s=0.02, every=25)
    wait_for(lambda: op.get_job(job_id).latest_checkpoint, 30, "a first checkpoint")
    p = provider(orch)
    (worker,) = p.workers
    orch.stop()  # SIGTERMs the local worker while the API still answers its hand-off
    assert worker.proc.poll() == 0, f"local worker exit status {worker.proc.poll()}"
    restarted = RunningOrchestrator(make_settings(orch.settings.home)).start()
    try:
        d = restarted.operator().get_job(job_id)
        assert d.status == "queued", f"job is {d.status} after the orchestrator stopped"
        assert [e.kind for e in d.events][-1] == "release", [e.kind for e in d.events]
    finally:
        restarted.stop()


def test_a_local_worker_is_not_given_the_orchestrators_own_secrets(
        orch: RunningOrchestrator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker process inherits the orchestrator's environment, less every RELAYMD_* variable
    that is not a worker setting: the operator token and the Salad key stay behind."""
    secrets = {"RELAYMD_TOKEN": "op-cli-token-1234", "RELAYMD_OPERATOR_TOKEN": "op-token-5678",
               "RELAYMD_SALAD_API_KEY": "salad-key-9012"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RELAYMD_WORKER_POLL_MAX", "7")  # a worker setting: passed on
    worker = provider(orch).spawn()
    try:
        raw = Path(f"/proc/{worker.proc.pid}/environ").read_bytes()
        env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    finally:
        worker.proc.kill()
        worker.proc.wait()
    assert not set(secrets) & set(env), f"leaked to the worker: {set(secrets) & set(env)}"
    assert env.get("RELAYMD_WORKER_POLL_MAX") == "7" and env["RELAYMD_CLUSTER"] == "local", env

"""`kill -9` of the orchestrator mid-run, then a restart on the same database and port: the
database opens, nothing a client was told was saved is lost, and the running worker reconnects
and carries on under the lease it already held (same attempt: no requeue, no redone work
beyond the engine's own progress)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from relaymd.client import Client

from .conftest import free_port
from .test_worker import expected_result, final_result, submit_stepper, wait_for


class Served:
    """`relaymd serve` as a real subprocess (so it can be SIGKILLed), restartable."""

    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "RELAYMD_HOME": str(home), "RELAYMD_PORT": str(port),
                    "RELAYMD_LOCAL_WORKERS": "0", "RELAYMD_HEARTBEAT_INTERVAL": "0.5",
                    "RELAYMD_HEARTBEAT_TIMEOUT": "6", "RELAYMD_REAP_INTERVAL": "0.5"}
        self.env.pop("RELAYMD_CONFIG", None)

    def start(self) -> Served:
        log = open(self.home.parent / "serve.log", "ab")  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen([sys.executable, "-m", "relaymd", "serve"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self.healthy, 30, "the orchestrator to answer")
        return self

    def healthy(self) -> bool:
        try:
            with Client(self.url, None, timeout=1) as c:
                return c.health()["status"] == "ok"
        except Exception:
            return False

    def operator(self) -> Client:
        tokens = json.loads((self.home / "tokens.json").read_text())
        return Client(self.url, tokens["operator"])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class Shim:
    """What test_worker's helpers need of an orchestrator: url, settings, operator()."""

    def __init__(self, served: Served) -> None:
        from relaymd.config import load_settings

        self.served = served
        self.url = served.url
        self.settings = load_settings(None, environ={"RELAYMD_HOME": str(served.home),
                                                     "XDG_CONFIG_HOME": str(served.home / "cfg")})

    def operator(self) -> Client:
        return self.served.operator()


def test_kill_9_of_the_orchestrator_loses_nothing_and_the_worker_carries_on(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    served = Served(home, free_port()).start()
    worker = None
    try:
        orch = Shim(served)
        total = 160
        job_id = submit_stepper(orch, tmp_path, total=total, every=10, step_s=0.05)  # type: ignore[arg-type]
        others = [submit_stepper(orch, tmp_path, total=5, every=5) for _ in range(3)]  # type: ignore[arg-type]
        env = {**served.env, "RELAYMD_URL": served.url, "RELAYMD_WORKER_IDLE": "immediate_exit",
               "RELAYMD_WORKER_WORKDIR": str(tmp_path / "work")}
        with open(tmp_path / "worker.log", "w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "relaymd", "worker"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        op = served.operator()
        before = wait_for(lambda: (lambda j: j if (j.latest_checkpoint or 0) >= 3 else None)(
            op.get_job(job_id)), 60, "three accepted checkpoints")
        seen_ids = {j.id for j in op.all_jobs()}
        served.kill9()
        time.sleep(1.0)  # the worker meets a dead API for a moment (its calls retry)
        served.start()
        op = served.operator()
        after = op.get_job(job_id)
        assert {j.id for j in op.all_jobs()} >= seen_ids | {job_id, *others}, "a job was lost"
        assert (after.latest_checkpoint or 0) >= (before.latest_checkpoint or 0), \
            f"accepted checkpoint {before.latest_checkpoint} lost: now {after.latest_checkpoint}"
        assert after.attempt == before.attempt, f"requeued by the restart: {after.events[-3:]}"
        done = wait_for(lambda: (lambda j: j if j.status == "completed" else None)(
            op.get_job(job_id)), 120, lambda: f"the job to complete: {op.get_job(job_id).status}")
        assert done.attempt == before.attempt, "the worker lost its lease over the restart"
        assert [e.kind for e in done.events].count("claim") == 1, [e.kind for e in done.events]
        assert final_result(orch, job_id, tmp_path) == {"x": expected_result(total), "n": total}  # type: ignore[arg-type]
        assert worker.wait(60) == 0, (tmp_path / "worker.log").read_text()[-2000:]
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        served.stop()


def test_an_outage_longer_than_the_heartbeat_timeout_recovers_the_running_job(
        tmp_path: Path) -> None:
    """The worker stops its engine once the lease can no longer be vouched for; when the
    orchestrator is back, the job must not stay held by a worker that no longer runs it."""
    home = tmp_path / "home"
    home.mkdir()
    served = Served(home, free_port())
    served.env["RELAYMD_HEARTBEAT_TIMEOUT"] = "3"
    served.start()
    worker = None
    try:
        orch = Shim(served)
        total = 200
        job_id = submit_stepper(orch, tmp_path, total=total, every=10, step_s=0.05)  # type: ignore[arg-type]
        env = {**served.env, "RELAYMD_URL": served.url, "RELAYMD_WORKER_IDLE": "poll_then_exit",
               "RELAYMD_WORKER_POLL_INTERVAL": "0.5", "RELAYMD_WORKER_POLL_MAX": "20",
               "RELAYMD_WORKER_WORKDIR": str(tmp_path / "work")}
        with open(tmp_path / "worker.log", "w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "relaymd", "worker"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        op = served.operator()
        wait_for(lambda: (op.get_job(job_id).latest_checkpoint or 0) >= 2, 60, "checkpoints")
        served.kill9()
        wait_for(lambda: "the lease is lost" in (tmp_path / "worker.log").read_text(), 30,
                 "the worker to give up the lease while the orchestrator is down")
        served.start()
        op = served.operator()
        done = wait_for(lambda: (lambda j: j if j.status == "completed" else None)(
            op.get_job(job_id)), 120,
            lambda: f"the job to complete after the outage: {op.get_job(job_id).status}, "
                    f"{[(e.kind, e.reason) for e in op.get_job(job_id).events[-4:]]}")
        assert done.failures == 0, done.last_failure
        assert any(e.kind == "lose" and "no longer runs it" in e.reason for e in done.events), \
            [(e.kind, e.reason) for e in done.events]
        assert final_result(orch, job_id, tmp_path) == {"x": expected_result(total), "n": total}  # type: ignore[arg-type]
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        served.stop()

"""Security hardening: terminal escapes from workers, private files whatever the umask, no token
on the command line, `slurm.env` values kept secret, `extra` log fields redacted."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from relaymd.client import Client
from relaymd.config import OrchestratorSettings, load_settings
from relaymd.fsutil import private_dir
from relaymd.models import JobCreate, Progress, WorkerRegister
from relaymd.secrets import redact_logs
from relaymd.server.orchestrator import setup_file_logging
from relaymd.storage.bundle import pack_directory
from relaymd.worker.logs import JsonLines

from .conftest import RunningOrchestrator, make_settings, submit

# Any control character but newline and tab: C0, DEL, C1.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask there is, as a careless login shell might leave it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def worker_env(server: RunningOrchestrator, home: Path, **extra: str) -> dict[str, str]:
    """A worker process's environment: its own RELAYMD_HOME (no tokens file to fall back on)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RELAYMD_") and k not in ("SLURM_JOB_ID", "XDG_DATA_HOME",
                                                         "XDG_CONFIG_HOME")}
    env.update(server.settings.storage_env(), HOME=str(home.parent), RELAYMD_HOME=str(home),
               RELAYMD_URL=server.url, RELAYMD_WORKER_IDLE="immediate_exit",
               RELAYMD_LOCAL_WORKERS="0")
    env.update(extra)
    return env


def run_worker(env: dict[str, str], *args: str, umask: int = -1) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaymd", "worker", *args], env=env,
                          capture_output=True, text=True, timeout=90, umask=umask)


# ---------------------------------------------------------------- 1. terminal escapes


def test_worker_text_loses_terminal_control_characters_before_it_is_stored(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    w = Client(server.url, server.tokens()["worker"])
    # model_construct: no client-side validation, so the API itself must clean the text.
    reg = w.register(WorkerRegister.model_construct(
        hostname="node\x1b]52;c;ZXZpbA==\x07-7", name="w\x9b31m1", gpus=1,
        gpu_model="A100\x1b[2J", compute_platform="CU\x7fDA", provider_id="42\x1b[0m"))
    w.set_token(reg.token)
    a = w.claim()
    assert a is not None
    w.fail(job_id, a.attempt, 1, reason="boom\x1b[2J\x9b31m red\r",
           log_tail="line 1\tok\n\x1b]52;c;ZXZpbA==\x07line 2\x00\x08\n")

    detail = op.get_job(job_id)
    assert detail.last_failure is not None
    reason, tail = detail.last_failure.reason, detail.last_failure.log_tail
    assert not CONTROL.search(reason) and not CONTROL.search(tail), (reason, tail)
    assert reason == "boom[2J31m red", "the visible text is kept"
    assert tail == "line 1\tok\n]52;c;ZXZpbA==line 2\n", "newline and tab are kept"
    for event in detail.events:
        assert not CONTROL.search(event.reason), event
    listed = next(x for x in op.workers() if x.id == reg.worker_id)
    texts = (listed.hostname, listed.name, listed.gpu_model, listed.compute_platform,
             listed.provider_id or "")
    assert not any(CONTROL.search(t) for t in texts), texts
    assert texts == ("node]52;c;ZXZpbA==-7", "w31m1", "A100[2J", "CUDA", "42[0m")


def test_release_reason_rejection_reason_and_progress_unit_are_cleaned_too(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    w, wid = server.worker()
    a = w.claim()
    assert a is not None
    w.heartbeat(wid, job_id, a.attempt, progress=Progress.model_construct(
        done=5, total=10, unit="st\x1b[5meps", ns_per_day=None))
    job = op.get_job(job_id)
    assert job.progress is not None and job.progress.unit == "st[5meps"
    w.release(job_id, a.attempt, reason="going\x1b[H\x1b[2J away")
    events = [e.reason for e in op.get_job(job_id).events]
    assert not any(CONTROL.search(r) for r in events), events
    assert any("going[H[2J away" in r for r in events), events


# ---------------------------------------------------------------- 2. private files


def test_orchestrator_files_are_private_with_a_zero_umask(tmp_path: Path,
                                                         open_umask: None) -> None:
    home = tmp_path / "home"
    running = RunningOrchestrator(make_settings(home)).start()
    try:
        settings = running.settings
        assert mode(home) == 0o700
        db = settings.database_path
        assert mode(db) == 0o600
        for suffix in ("-wal", "-shm"):
            side = db.with_name(db.name + suffix)
            assert side.exists(), f"{side} missing: is the database in WAL mode?"
            assert mode(side) == 0o600, side
        assert mode(settings.tokens_path) == 0o600
    finally:
        running.stop()


def test_an_existing_open_home_is_made_private_on_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    running = RunningOrchestrator(make_settings(home)).start()
    try:
        assert mode(home) == 0o700
    finally:
        running.stop()


def test_log_file_and_its_rollovers_are_private_with_a_zero_umask(tmp_path: Path,
                                                                  open_umask: None) -> None:
    path = tmp_path / "logs" / "relaymd.log"
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        setup_file_logging(path)
        handler = next(h for h in root.handlers if h not in before)
        assert mode(path.parent) == 0o700
        assert mode(path) == 0o600
        assert isinstance(handler, logging.handlers.RotatingFileHandler)
        handler.doRollover()
        assert mode(path) == 0o600 and mode(path.with_name("relaymd.log.1")) == 0o600
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)


def test_private_dir_creates_and_fixes_owner_only_dirs(tmp_path: Path,
                                                       open_umask: None) -> None:
    fresh = private_dir(tmp_path / "a" / "work")
    assert mode(fresh) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    assert mode(loose) == 0o777
    assert mode(private_dir(loose)) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    assert mode(private_dir(shared, fix_existing=False)) == 0o755


def test_worker_workdir_is_private_with_a_zero_umask(server: RunningOrchestrator,
                                                     tmp_path: Path) -> None:
    op = server.operator()
    job_id = uuid.uuid4().hex
    src = tmp_path / "src"
    src.mkdir()
    (src / "relaymd.yaml").write_text(yaml.safe_dump({
        "command": f"{sys.executable} -c \"open('out.chk', 'w').write('x')\"",
        "checkpoint": {"paths": ["out.chk"], "poll_seconds": 0.1},
        "resources": {"gpus": 0}}))
    bundle = tmp_path / "bundle.tar.gz"
    pack_directory(src, bundle)
    op.upload_bundle(job_id, bundle)
    op.create_job(JobCreate(id=job_id))
    work = tmp_path / "worker" / "jobs"
    env = worker_env(server, tmp_path / "worker" / "home",
                     RELAYMD_WORKER_TOKEN=server.tokens()["worker"],
                     RELAYMD_WORKER_WORKDIR=str(work))
    result = run_worker(env, umask=0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert op.get_job(job_id).status == "completed", result.stderr[-2000:]
    assert mode(work) == 0o700


# ---------------------------------------------------------------- 3. no token on `ps`


def test_worker_token_option_is_gone(tmp_path: Path) -> None:
    # Port 9 (discard): were the option still taken, the worker would fail to connect, not hang.
    result = subprocess.run([sys.executable, "-m", "relaymd", "worker", "--token", "abc"],
                            env={**os.environ, "RELAYMD_HOME": str(tmp_path / "h"),
                                 "RELAYMD_URL": "http://127.0.0.1:9"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "No such option" in result.stderr and "--token" in result.stderr, result.stderr


def test_worker_token_file_must_be_private_and_not_empty(server: RunningOrchestrator,
                                                         tmp_path: Path) -> None:
    env = worker_env(server, tmp_path / "worker" / "home")
    token_file = tmp_path / "token"
    token_file.write_text(server.tokens()["worker"] + "\n")
    token_file.chmod(0o644)
    result = run_worker(env, "--token-file", str(token_file))
    assert result.returncode == 2, result.stderr
    assert "readable by other users" in result.stderr and "chmod 600" in result.stderr
    assert server.tokens()["worker"] not in result.stderr

    empty = tmp_path / "empty"
    empty.write_text("  \n")
    empty.chmod(0o600)
    result = run_worker(env, "--token-file", str(empty))
    assert result.returncode == 2 and "empty" in result.stderr, result.stderr
    result = run_worker(env, "--token-file", str(tmp_path / "absent"))
    assert result.returncode == 2 and "no such file" in result.stderr, result.stderr
    result = run_worker(env)
    assert result.returncode == 2 and "--token-file" in result.stderr, result.stderr
    assert server.operator().workers() == []


def test_worker_registers_with_a_private_token_file(server: RunningOrchestrator,
                                                    tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(server.tokens()["worker"] + "\n")
    token_file.chmod(0o600)
    env = worker_env(server, tmp_path / "worker" / "home")
    result = run_worker(env, "--token-file", str(token_file))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(server.operator().workers()) == 1


def test_worker_token_still_comes_from_the_environment(server: RunningOrchestrator,
                                                       tmp_path: Path) -> None:
    env = worker_env(server, tmp_path / "worker" / "home",
                     RELAYMD_WORKER_TOKEN=server.tokens()["worker"])
    result = run_worker(env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(server.operator().workers()) == 1


# ---------------------------------------------------------------- 4. slurm.env is secret


SLURM_ENV_CONFIG = """
clusters:
  - name: hpc
    provider: slurm
    slurm:
      env: {WANDB_API_KEY: wandb-SECRET-value, OMP_NUM_THREADS: "4"}
"""


def test_config_check_masks_slurm_env_values(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SLURM_ENV_CONFIG)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for extra in ([], ["--json"]):
        out = subprocess.run([sys.executable, "-m", "relaymd", "config", "check", str(path),
                              *extra], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "SECRET" not in out.stdout + out.stderr, out.stdout
        effective = json.loads(out.stdout) if extra else yaml.safe_load(out.stdout)
        assert effective["clusters"][0]["slurm"]["env"] == {
            "WANDB_API_KEY": "**********", "OMP_NUM_THREADS": "**********"}, "names are kept"


def test_slurm_env_values_are_redacted_from_logs(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SLURM_ENV_CONFIG)
    settings = load_settings(path, environ={"HOME": str(tmp_path)})
    assert settings.clusters[0].slurm is not None
    assert settings.clusters[0].slurm.env["WANDB_API_KEY"] == "wandb-SECRET-value"
    values = settings.secret_values()
    assert "wandb-SECRET-value" in values
    assert "4" not in values, "a value too short to be a key would mask every 4 in the log"
    assert OrchestratorSettings(home=tmp_path).secret_values() == []


# ---------------------------------------------------------------- 5. extra fields redacted


def test_worker_json_log_redacts_secrets_in_extra_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        redact_logs(["tok-SECRET-123", "kéy\"SECRET"])
        log = logging.getLogger("relaymd.test.hardening")
        log.warning("engine started", extra={"command": "x tok-SECRET-123 y",
                                             "env": {"KEY": "kéy\"SECRET"}, "attempt": 2})
    finally:
        root.removeHandler(handler)
    out = stream.getvalue()
    assert "SECRET" not in out, out
    line = json.loads(out)
    assert line["command"] == "x **** y" and line["attempt"] == 2, line
    assert line["msg"] == "engine started"

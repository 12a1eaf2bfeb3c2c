"""The `relaymd` CLI as a real subprocess against a real orchestrator on a loopback port.

URL and operator token are discovered from RELAYMD_HOME (orchestrator.json, tokens.json) unless
a test says otherwise; exit codes and `--json` keys are the README contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from relaymd.models import CheckpointReport, Progress
from relaymd.storage import open_storage

from .conftest import FakeClock, RunningOrchestrator, free_port, submit
from .test_api import kill_and_resume

# The stable `--json` keys, copied from the README.
JOB_KEYS = {
    "id", "title", "status", "command", "spec", "gpus", "priority", "max_attempts", "attempt",
    "failures", "worker_id", "bundle_sha256", "bundle_size", "latest_checkpoint", "checkpoints",
    "progress", "last_failure", "created_at", "updated_at", "started_at", "finished_at",
    "last_checkpoint_at", "preferred_clusters", "queue_blocked_reason", "trusted_only",
}
# `job ID --json` adds these to a job object.
DETAIL_KEYS = {"checkpoint_list", "events", "ns_per_day", "eta_seconds", "gpu_hours",
               "gpu_hours_useful", "gpu_hours_redone"}
USAGE_KEYS = {"at", "gpu_hours", "gpu_hours_useful", "gpu_hours_redone", "clusters", "jobs"}
CLUSTER_USAGE_KEYS = {"cluster", "attempts", "gpu_hours", "gpu_hours_useful", "gpu_hours_redone"}
JOB_USAGE_KEYS = {"id", "title", "status", "gpus", "attempts", "gpu_hours", "gpu_hours_useful",
                  "gpu_hours_redone", "ns_per_day", "eta_seconds"}
PROGRESS_KEYS = {"done", "total", "unit", "ns_per_day"}
FAILURE_KEYS = {"attempt", "exit_code", "reason", "log_tail", "at"}
CHECKPOINT_KEYS = {"seq", "key", "sha256", "size", "attempt", "worker_id", "created_at", "progress",
                   "trusted"}
EVENT_KEYS = {"id", "job_id", "worker_id", "kind", "from_status", "to_status", "attempt", "seq",
              "reason", "at"}
WORKER_KEYS = {
    "id", "name", "hostname", "cluster", "provider", "provider_id", "compute_platform", "gpus",
    "gpu_model", "vram_gb", "status", "job_id", "consecutive_failures", "registered_at",
    "last_heartbeat_at", "wall_time_end", "note",
}


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The test runner's environment minus anything relaymd reads, plus a private HOME."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RELAYMD_") and k not in ("XDG_CONFIG_HOME", "XDG_DATA_HOME")}
    fake_user = home.parent / "user-home"
    fake_user.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(fake_user), RELAYMD_HOME=str(home), COLUMNS="200", PYTHONUNBUFFERED="1",
               RELAYMD_LOCAL_WORKERS="0")
    env.update(extra)
    return env


def relaymd(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaymd", *args], env=clean_env(home, **env),
                          capture_output=True, text=True, timeout=60)


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr.strip()}"
    try:
        return json.loads(result.stdout)
    except ValueError as exc:
        raise AssertionError(f"--json printed invalid JSON ({exc}): {result.stdout[:300]!r}") from None


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert the exit code and a one-line `relaymd: ...` error on stderr; return that line."""
    err = result.stderr.strip()
    assert result.returncode == code, \
        f"exit {result.returncode}, expected {code}; stderr ends: {err[-300:]!r}"
    assert "Traceback" not in result.stderr, f"traceback on stderr: {result.stderr[-500:]}"
    assert len(err.splitlines()) == 1, f"error is not one line: {err!r}"
    assert err.startswith("relaymd: "), f"error lacks the relaymd: prefix: {err!r}"
    return err




def home_of(server: RunningOrchestrator) -> Path:
    return server.settings.home


# ---------------------------------------------------------------- submit


def test_submit_with_flags_queues_the_job_and_leaves_the_dir_alone(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    src = tmp_path / "alanine"
    src.mkdir()
    (src / "run.py").write_text("print('md')\n")
    before = {p.name: p.read_bytes() for p in src.iterdir()}

    result = relaymd(home_of(server), "submit", str(src), "--command", "python run.py",
                     "--checkpoint", "*.chk", "--checkpoint", "out/*.xml", "--priority", "5")
    assert result.returncode == 0, f"submit failed: {result.stderr.strip()}"

    jobs = ok_json(relaymd(home_of(server), "jobs", "--json"))
    assert len(jobs) == 1, f"expected one job, listed {len(jobs)}"
    job = jobs[0]
    assert f"submitted job {job['id'][:8]} (alanine): queued" in result.stdout, result.stdout
    assert (job["status"], job["command"], job["title"], job["priority"]) == \
        ("queued", "python run.py", "alanine", 5), job
    assert job["spec"]["checkpoint"]["paths"] == ["*.chk", "out/*.xml"], job["spec"]
    after = {p.name: p.read_bytes() for p in src.iterdir()}
    assert after == before, f"submit modified the job dir: {sorted(after)} vs {sorted(before)}"


def test_submit_flags_override_the_dirs_relaymd_yaml_without_rewriting_it(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    src = tmp_path / "lig"
    src.mkdir()
    original = "command: python old.py\nmax_attempts: 7\n"
    (src / "relaymd.yaml").write_text(original)

    job = ok_json(relaymd(home_of(server), "submit", str(src), "--command", "python new.py",
                          "--gpus", "2", "--title", "ligand", "--json"))
    assert set(job) == JOB_KEYS, f"submit --json keys differ: {set(job) ^ JOB_KEYS}"
    assert (job["command"], job["gpus"], job["max_attempts"], job["title"]) == \
        ("python new.py", 2, 7, "ligand"), job
    assert (src / "relaymd.yaml").read_text() == original, "submit rewrote the dir's relaymd.yaml"


def test_submit_dir_without_relaymd_yaml_or_command_is_a_usage_error(tmp_path: Path) -> None:
    src = tmp_path / "bare"
    src.mkdir()
    (src / "run.py").write_text("")
    err = one_line_error(relaymd(tmp_path / "home", "submit", str(src), "--checkpoint", "*.chk"),
                         2)
    assert str(src) in err and "--command" in err, err
    assert not (src / "relaymd.yaml").exists(), "a refused submit wrote relaymd.yaml"


def test_submit_invalid_relaymd_yaml_is_a_usage_error_naming_the_field(tmp_path: Path) -> None:
    cases = {
        "command: python run.py\nmax_attempts: 0\n": "max_attempts",
        "command: python run.py\nresources: {gpus: many}\n": "resources.gpus",
        "- just\n- a list\n": "expected a mapping",
    }
    for i, (text, named) in enumerate(cases.items()):
        src = tmp_path / f"job{i}"
        src.mkdir()
        (src / "relaymd.yaml").write_text(text)
        err = one_line_error(relaymd(tmp_path / "home", "submit", str(src)), 2)
        assert named in err and "relaymd.yaml" in err, f"{text!r}: error does not name {named}: {err}"


def test_submit_flag_over_a_non_mapping_section_is_a_usage_error(tmp_path: Path) -> None:
    cases = {"command: x\ncheckpoint: '*.chk'\n": ["--checkpoint", "*.xml"],
             "command: x\nresources: 2\n": ["--gpus", "1"]}
    for i, (text, flags) in enumerate(cases.items()):
        src = tmp_path / f"job{i}"
        src.mkdir()
        (src / "relaymd.yaml").write_text(text)
        err = one_line_error(relaymd(tmp_path / "home", "submit", str(src), *flags), 2)
        assert "relaymd.yaml" in err, f"{text!r} {flags}: {err}"


# ---------------------------------------------------------------- job / jobs


def test_job_by_prefix_shows_state_checkpoints_failure_and_history(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path, title="villin")
    w, wid = server.worker()
    assert w.claim() is not None
    w.heartbeat(wid, job_id, 1)
    r = w.reserve_checkpoint(job_id, 1)
    data = b"state-1"
    open_storage(server.settings.storage).put_bytes(r.key, data)
    w.report_checkpoint(job_id, CheckpointReport(attempt=1, seq=r.seq, size=len(data),
                                                 sha256=hashlib.sha256(data).hexdigest()))
    w.fail(job_id, 1, exit_code=3, reason="engine crashed", log_tail="step 500\nNaN in forces")
    w2, wid2 = server.worker()
    assert w2.claim() is not None
    w2.heartbeat(wid2, job_id, 2, Progress(done=500, total=1000, unit="steps", ns_per_day=87.5))
    kinds = ["submit", "claim", "start", "checkpoint", "fail", "claim", "start"]
    row = next(line for line in relaymd(home_of(server), "jobs").stdout.splitlines()
               if line.startswith(job_id[:8]))
    assert row.split()[3:6] == ["50.0%", "500/1000", "steps"] and row.split()[6] == "87.5", \
        f"`jobs` row lacks the progress and ns/day: {row!r}"

    human = relaymd(home_of(server), "job", job_id[:6])
    assert human.returncode == 0, f"job PREFIX failed: {human.stderr.strip()}"
    out = human.stdout
    for needle in (f"job {job_id}  villin", "status     running   attempt 2   failures 1/3",
                   "command    python run.py", "progress    50.0% 500/1000 steps",
                   f"worker     {wid2}", "last failure (attempt 1, exit 3): engine crashed",
                   "| step 500", "| NaN in forces"):
        assert needle in out, f"`job PREFIX` output lacks {needle!r}:\n{out}"
    lines = out.splitlines()
    checkpoints = lines[lines.index("  checkpoints") + 2:lines.index("  events")]
    assert [c.split()[0] for c in checkpoints] == [str(r.seq)], f"checkpoint rows: {checkpoints}"
    events = [e.split() for e in lines[lines.index("  events") + 2:] if e.strip()]
    assert [e[2] for e in events] == kinds, f"event history rows: {events}"

    detail = ok_json(relaymd(home_of(server), "job", job_id[:6], "--json"))
    assert set(detail) == JOB_KEYS | DETAIL_KEYS, \
        f"job --json keys differ: {set(detail) ^ (JOB_KEYS | DETAIL_KEYS)}"
    assert (detail["id"], detail["status"], detail["attempt"]) == (job_id, "running", 2), detail
    assert set(detail["progress"]) == PROGRESS_KEYS, detail["progress"]
    assert set(detail["last_failure"]) == FAILURE_KEYS, detail["last_failure"]
    assert [c["seq"] for c in detail["checkpoint_list"]] == [r.seq], detail["checkpoint_list"]
    assert set(detail["checkpoint_list"][0]) == CHECKPOINT_KEYS, detail["checkpoint_list"][0]
    assert [e["kind"] for e in detail["events"]] == kinds, detail["events"]
    for e in detail["events"]:
        assert set(e) == EVENT_KEYS, f"event keys differ: {set(e) ^ EVENT_KEYS}"


def test_jobs_lists_filters_and_prints_a_table(server: RunningOrchestrator,
                                               tmp_path: Path) -> None:
    home = home_of(server)  # `jobs` printing "no jobs" is checked by the serve test
    assert ok_json(relaymd(home, "jobs", "--json")) == [], "jobs --json with no jobs is not []"

    op = server.operator()
    queued = submit(op, tmp_path, title="stays-queued")
    cancelled = submit(op, tmp_path, title="gets-cancelled")
    op.cancel(cancelled)

    only_queued = ok_json(relaymd(home, "jobs", "--status", "queued", "--json"))
    assert [j["id"] for j in only_queued] == [queued], f"--status queued listed {only_queued}"
    both = ok_json(relaymd(home, "jobs", "--status", "queued", "--status", "cancelled", "--json"))
    assert {j["id"] for j in both} == {queued, cancelled}, "repeated --status is not a union"
    for j in both:
        assert set(j) == JOB_KEYS, f"jobs --json keys differ: {set(j) ^ JOB_KEYS}"

    table = relaymd(home, "jobs")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = lines[0].split()
    assert header == ["ID", "TITLE", "STATUS", "PROGRESS", "NS/DAY", "ATT", "CKPT", "WORKER",
                      "AGE", "LAST", "CKPT"], f"table header is {lines[0]!r}"
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert set(rows) == {queued[:8], cancelled[:8]}, f"table rows: {lines[1:]}"
    assert "stays-queued" in rows[queued[:8]] and "queued" in rows[queued[:8]], rows
    assert "cancelled" in rows[cancelled[:8]], rows


def test_human_output_prints_user_text_verbatim(server: RunningOrchestrator,
                                                tmp_path: Path) -> None:
    title = "sim [/x] [red]hot"
    job_id = submit(server.operator(), tmp_path, title=title)
    for args in (["jobs"], ["job", job_id[:8]]):
        result = relaymd(home_of(server), *args)
        assert result.returncode == 0, f"{args}: exit {result.returncode}: {result.stderr[-200:]}"
        assert title in result.stdout, f"{args}: title not printed verbatim:\n{result.stdout}"


# ---------------------------------------------------------------- transitions


def test_cancel_twice_is_refused_then_requeue_queues_it(server: RunningOrchestrator,
                                                        tmp_path: Path) -> None:
    home = home_of(server)
    job_id = submit(server.operator(), tmp_path)

    first = relaymd(home, "cancel", job_id[:8])
    assert first.returncode == 0, f"cancel failed: {first.stderr.strip()}"
    assert first.stdout.strip() == f"cancelled job {job_id[:8]}: cancelled", first.stdout

    again = one_line_error(relaymd(home, "cancel", job_id[:8]), 1)
    assert "cancelled" in again, f"second cancel does not say the job is cancelled: {again}"

    job = ok_json(relaymd(home, "requeue", job_id[:8], "--json"))
    assert set(job) == JOB_KEYS, f"requeue --json keys differ: {set(job) ^ JOB_KEYS}"
    assert (job["id"], job["status"]) == (job_id, "queued"), job
    assert server.operator().get_job(job_id).status == "queued", "requeue did not reach the server"


def test_unknown_or_malformed_job_ref_exits_1(server: RunningOrchestrator) -> None:
    home = home_of(server)
    err = one_line_error(relaymd(home, "job", "deadbeef"), 1)
    assert "deadbeef" in err, f"unknown job error does not name the ref: {err}"
    err = one_line_error(relaymd(home, "cancel", "not-hex"), 1)
    assert "hexadecimal" in err, err


# ---------------------------------------------------------------- usage


def test_usage_and_job_show_gpu_hours_rate_and_eta(server: RunningOrchestrator,
                                                  clock: FakeClock, tmp_path: Path) -> None:
    home = home_of(server)
    none = relaymd(home, "usage")
    assert none.returncode == 0 and "no job has run yet" in none.stdout, none
    job_id, _ = kill_and_resume(server, clock, tmp_path)  # its docstring has the numbers

    report = ok_json(relaymd(home, "usage", "--json"))
    assert set(report) == USAGE_KEYS, set(report) ^ USAGE_KEYS
    (cluster,) = report["clusters"]
    assert set(cluster) == CLUSTER_USAGE_KEYS, set(cluster) ^ CLUSTER_USAGE_KEYS
    (job,) = report["jobs"]
    assert set(job) == JOB_USAGE_KEYS, set(job) ^ JOB_USAGE_KEYS
    assert (job["id"], job["attempts"], job["gpu_hours"], job["gpu_hours_redone"],
            job["ns_per_day"], job["eta_seconds"]) == (job_id, 2, 5.0, 1.0, 200.0, 24480.0), job

    human = relaymd(home, "usage")
    assert human.returncode == 0, human.stderr
    assert "total  5.00 GPU-h (useful 4.00, redone 1.00 = 20%)" in human.stdout, human.stdout
    rows = {line.split()[0]: line.split() for line in human.stdout.splitlines() if line.strip()}
    assert rows["local"][1:] == ["2", "5.00", "4.00", "1.00"], human.stdout
    assert rows[job_id[:8]][1:] == ["villin", "running", "2", "5.00", "4.00", "1.00", "200",
                                    "6h48m"], human.stdout

    shown = relaymd(home, "job", job_id[:8])
    assert shown.returncode == 0, shown.stderr
    for needle in ("rate       200 ns/day   ETA 6h48m",
                   "compute    5.00 GPU-h (useful 4.00, redone 1.00 = 20%)"):
        assert needle in shown.stdout, f"`job` output lacks {needle!r}:\n{shown.stdout}"


# ---------------------------------------------------------------- workers


def test_workers_lists_registered_workers(server: RunningOrchestrator) -> None:
    home = home_of(server)
    none = relaymd(home, "workers")
    assert (none.returncode, none.stdout.strip()) == (0, "no workers"), none

    # The cluster and provider come from the bootstrap token (here this machine's: local).
    _, wid = server.worker(name="w7", hostname="gpu-node-7", provider="slurm",
                           provider_id="123456", platform="CUDA", gpus=2, gpu_model="A100",
                           vram_gb=80)
    listed = ok_json(relaymd(home, "workers", "--json"))
    assert len(listed) == 1, f"expected one worker, listed {listed}"
    w = listed[0]
    assert set(w) == WORKER_KEYS, f"workers --json keys differ: {set(w) ^ WORKER_KEYS}"
    assert w["id"] == wid and w["status"] == "idle" and w["job_id"] is None, w
    assert (w["name"], w["hostname"], w["cluster"], w["provider"], w["provider_id"],
            w["compute_platform"], w["gpus"], w["gpu_model"], w["vram_gb"]) == \
        ("w7", "gpu-node-7", "local", "local", "123456", "CUDA", 2, "A100", 80), w

    table = relaymd(home, "workers")
    assert table.returncode == 0 and wid[:8] in table.stdout and "gpu-node-7" in table.stdout, \
        f"workers table lacks the worker:\n{table.stdout}"


# ---------------------------------------------------------------- finding the orchestrator


def test_unreachable_orchestrator_exits_1_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    empty = tmp_path / "empty-home"
    empty.mkdir()
    err = one_line_error(relaymd(empty, "jobs", RELAYMD_PORT=str(port)), 1)
    assert "cannot reach the orchestrator" in err and str(port) in err, err


def test_url_flag_with_env_token_works_from_another_home(server: RunningOrchestrator,
                                                          tmp_path: Path) -> None:
    job_id = submit(server.operator(), tmp_path)
    elsewhere = tmp_path / "laptop-home"  # no orchestrator.json, no tokens.json
    token = server.tokens()["operator"]
    jobs = ok_json(relaymd(elsewhere, "jobs", "--url", server.url, "--json", RELAYMD_TOKEN=token))
    assert [j["id"] for j in jobs] == [job_id], f"--url + RELAYMD_TOKEN listed {jobs}"

    # RELAYMD_TOKEN beats the home's token file, so a wrong one is refused even there.
    err = one_line_error(relaymd(home_of(server), "jobs", RELAYMD_TOKEN="wrong"), 1)
    assert "token" in err, f"wrong-token error does not mention the token: {err}"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for args in (["jobs", "--status", "bogus"], ["job"], ["submit", str(tmp_path / "missing")],
                 ["submit", str(tmp_path), "--gpus", "-1"]):
        result = relaymd(home, *args)
        assert result.returncode == 2, f"{args}: exit {result.returncode}, expected 2"
        assert "Traceback" not in result.stderr and result.stdout == "", f"{args}: {result}"


# ---------------------------------------------------------------- relaymd serve


def test_serve_runs_until_sigterm_and_prints_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, "-m", "relaymd", "serve", "--port", "0"],
                            env=clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        endpoint = home / "orchestrator.json"
        deadline = time.monotonic() + 30
        while not endpoint.exists():
            assert proc.poll() is None, f"serve exited {proc.returncode}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "serve wrote no orchestrator.json within 30 s"
            time.sleep(0.05)
        url = json.loads(endpoint.read_text())["url"]
        assert (home / "tokens.json").stat().st_mode & 0o777 == 0o600, "tokens.json is not 0600"

        empty = relaymd(home, "jobs")
        assert (empty.returncode, empty.stdout.strip()) == (0, "no jobs"), empty

        second = one_line_error(relaymd(home, "serve", "--port", "0"), 1)
        assert "another orchestrator" in second, second
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError("serve did not stop within 20 s of SIGTERM") from None

    assert proc.returncode == 0, f"serve exited {proc.returncode} on SIGTERM: {err[-500:]}"
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"relaymd orchestrator on {url} "), \
        f"serve stdout is not its one start line: {out!r}"
    assert "Traceback" not in err, f"traceback on stop: {err[-500:]}"
    assert not endpoint.exists(), "orchestrator.json left behind after a clean stop"

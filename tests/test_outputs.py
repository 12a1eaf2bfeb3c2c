"""Streamed outputs (`outputs:` in relaymd.yaml): shipped once, stitched exactly by `relaymd
results`, across kill -9 and SIGTERM hand-offs."""

from __future__ import annotations

import hashlib
import json
import signal
import struct
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relaymd.models import BundleSpec, JobCreate
from relaymd.results import Segment, StitchError, lineage, stitch
from relaymd.storage import (
    IntegrityError,
    output_index_key,
    output_part_key,
    outputs_prefix,
)
from relaymd.storage.bundle import pack_directory
from relaymd.storage.local import LocalStorage

from . import test_worker
from .conftest import RunningOrchestrator
from .test_cli import clean_env
from .test_worker import (
    POLLING,
    end_started,
    engine_group,
    kill_node,
    start_worker,
    wait_accepted,
    wait_for,
    why,
)

orch = test_worker.orch  # the worker tests' fixture: each test on file:// and on S3
A, M = 1103515245, 2**31
RECORD = struct.Struct("<QQ16s")  # an XTC-like frame: fixed size, one per step

# A stepper that writes a binary trajectory and a text log as outputs. Outputs are buffered and
# written just before each checkpoint (as an engine's reporters at the checkpoint interval), in
# append mode, for the steps after the checkpoint it resumed from; fresh files when absent.
STREAMER = '''
import json, os, signal, struct, sys, time, hashlib
TOTAL, EVERY, STEP_S = int(os.environ["TOTAL"]), int(os.environ["EVERY"]), float(os.environ["STEP_S"])
A, M = 1103515245, 2**31
REC = struct.Struct("<QQ16s")
n, x = 0, 1
if os.path.exists("state.json"):
    with open("state.json") as fh:
        s = json.load(fh)
    n, x = s["n"], s["x"]
    print(f"resumed at step {n}", flush=True)
traj, log = open("traj.bin", "ab"), open("md.log", "a")
if n == 0:
    log.write("# streamer log\\n")
frames, lines = [], []
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

def save():
    traj.write(b"".join(frames)); log.write("".join(lines))
    traj.flush(); log.flush()
    frames.clear(); lines.clear()
    with open("state.json.tmp", "w") as fh:
        json.dump({"n": n, "x": x}, fh)
    os.replace("state.json.tmp", "state.json")

while n < TOTAL:
    if stop:
        save()
        sys.exit(0)
    x = (A * x + n) % M
    n += 1
    frames.append(REC.pack(n, x, hashlib.sha256(str(x).encode()).digest()[:16]))
    lines.append(f"step {n} x={x}\\n")
    time.sleep(STEP_S)
    if n % EVERY == 0:
        save()
save()
print("done", flush=True)
'''


# An engine shaped like AToM-OpenMM: a sample line per cycle, appended and flushed at once (so
# the outputs run ahead of the last checkpoint); a checkpoint deletes the sentinel, rewrites the
# state in place, and creates the sentinel again; state without the sentinel is refused.
SAMPLER = '''
import json, os, signal, sys, time
TOTAL, EVERY, STEP_S = int(os.environ["TOTAL"]), int(os.environ["EVERY"]), float(os.environ["STEP_S"])
n = 0
if os.path.exists("state.json"):
    if not os.path.exists("ckpt_is_valid"):
        print("Bad checkpoints", flush=True)
        sys.exit(1)
    with open("state.json") as fh:
        n = json.load(fh)["n"]
    print(f"resumed at cycle {n}", flush=True)
out = open("samples.out", "a")
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

def checkpoint():
    if os.path.exists("ckpt_is_valid"):
        os.remove("ckpt_is_valid")
    with open("state.json", "w") as fh:
        json.dump({"n": n}, fh)
    time.sleep(0.05)  # a checkpoint of several replicas takes a while
    with open("ckpt_is_valid", "w") as fh:
        fh.write("Checkpoint files are valid")

while n < TOTAL and not stop:
    n += 1
    out.write(f"sample {n}\\n")
    out.flush()
    time.sleep(STEP_S)
    if n % EVERY == 0:
        checkpoint()
checkpoint()
sys.exit(0)
'''


def expected_outputs(total: int) -> dict[str, bytes]:
    traj, log, x = [], ["# streamer log\n"], 1
    for n in range(total):
        x = (A * x + n) % M
        traj.append(RECORD.pack(n + 1, x, hashlib.sha256(str(x).encode()).digest()[:16]))
        log.append(f"step {n + 1} x={x}\n")
    return {"traj.bin": b"".join(traj), "md.log": "".join(log).encode()}


@pytest.fixture
def cleanup(orch: RunningOrchestrator, tmp_path: Path) -> Iterator[RunningOrchestrator]:
    """As test_worker's: end every worker started here and every engine in tmp_path."""
    yield orch
    end_started(tmp_path)


def submit_streamer(orch: RunningOrchestrator, tmp_path: Path, total: int, every: int,
                    step_s: float, engine: str = STREAMER,
                    spec: dict[str, Any] | None = None) -> str:
    job_id = uuid.uuid4().hex
    src = tmp_path / f"job-{job_id[:6]}"
    src.mkdir()
    (src / "engine.py").write_text(engine)
    (src / "relaymd.yaml").write_text(yaml.safe_dump({
        "command": f"TOTAL={total} EVERY={every} STEP_S={step_s} exec {sys.executable} "
                   "engine.py",
        "checkpoint": {"paths": ["state.json"], "poll_seconds": 0.1},
        "outputs": ["traj.bin", "*.log"], "resources": {"gpus": 0}, "max_attempts": 3,
        **(spec or {})}))
    bundle = tmp_path / f"{job_id}.tar.gz"
    pack_directory(src, bundle)
    op = orch.operator()
    op.upload_bundle(job_id, bundle)
    op.create_job(JobCreate(id=job_id, title="streamer"))
    return job_id


def results_cli(orch: RunningOrchestrator, job_id: str, dest: Path, *extra: str) -> Any:
    import subprocess

    env = clean_env(orch.settings.home, **orch.settings.storage_env())
    return subprocess.run([sys.executable, "-m", "relaymd", "results", job_id, str(dest),
                           *extra], env=env, capture_output=True, text=True, timeout=60)


def stored_bytes(orch: RunningOrchestrator, job_id: str) -> dict[int, int]:
    """Bytes stored under each attempt's outputs prefix (the parts, not the index)."""
    storage = orch.settings.open_storage()
    out: dict[int, int] = {}
    for key in storage.list(outputs_prefix(job_id)):
        rest = key[len(outputs_prefix(job_id)):]
        if "/" in rest:
            attempt = int(rest.split("/")[0].removeprefix("attempt-"))
            out[attempt] = out.get(attempt, 0) + len(storage.get_bytes(key))
    return out


def finished(orch: RunningOrchestrator, job_id: str, tmp_path: Path, name: str) -> None:
    op = orch.operator()
    d = wait_for(lambda: (d := op.get_job(job_id)).status in ("completed", "failed") and d, 60,
                 lambda: f"the job to finish ({why(tmp_path, name)})")
    assert d.status == "completed", f"job is {d.status} ({why(tmp_path, name)})"


# --------------------------------------------------------------------------- end to end


def test_outputs_survive_kill_9_and_hand_off_byte_identical(cleanup: RunningOrchestrator,
                                                            tmp_path: Path) -> None:
    orch = cleanup
    total = 400
    job_id = submit_streamer(orch, tmp_path, total=total, every=10, step_s=0.03)
    op = orch.operator()
    seq = 0
    for i in range(3):  # two nodes die with kill -9, then a SIGTERM hand-off
        name = f"w{i}"
        w = start_worker(orch, tmp_path, name, **POLLING)
        wait_for(lambda k=i + 1: (d := op.get_job(job_id)).attempt == k
                 and d.status == "running",
                 15, lambda n=name, k=i + 1: f"attempt {k} to run ({why(tmp_path, n)})")
        for _ in range(2):
            seq = wait_accepted(op, job_id, tmp_path, name, after=seq).latest_checkpoint or 0
        assert op.get_job(job_id).status == "running", "finished before the test could kill"
        if i < 2:
            group = engine_group(w)
            assert group, f"no engine under worker {name} ({why(tmp_path, name)})"
            kill_node(w, group)
        else:
            w.send_signal(signal.SIGTERM)
            assert w.wait(15) == 0, f"worker exit {w.returncode} ({why(tmp_path, name)})"
    start_worker(orch, tmp_path, "last", **POLLING)
    finished(orch, job_id, tmp_path, "last")
    d = op.get_job(job_id)
    assert d.attempt == 4, f"{d.attempt} attempts, expected 4"

    dest = tmp_path / "results"
    result = results_cli(orch, job_id, dest, "--json")
    assert result.returncode == 0, f"results failed: {result.stderr.strip()}"
    summary = json.loads(result.stdout)
    want = expected_outputs(total)
    for rel, data in want.items():
        got = (dest / rel).read_bytes()
        first = next((i for i, (a, b) in enumerate(zip(got, data, strict=False)) if a != b),
                     min(len(got), len(data)))
        assert got == data, \
            f"{rel}: {len(got)} bytes stitched, {len(data)} expected (differ from byte {first})"
    assert summary["files"] == {rel: len(data) for rel, data in want.items()}
    assert summary["attempts"] == [1, 2, 3, 4], summary
    # With them, the final checkpoint set: the engine's state at its end.
    final = d.checkpoint_list[-1]
    ckpt = summary["checkpoint"]
    assert ckpt and ckpt["seq"] == final.seq and ckpt["files"] == ["state.json"], summary
    state = json.loads((dest / f"checkpoint-{final.seq}" / "state.json").read_text())
    assert state["n"] == total, f"the final checkpoint is at step {state['n']}, not {total}"
    # Every attempt's stored bytes are its own, once: what it kept plus what was redone.
    assert sum(stored_bytes(orch, job_id).values()) == \
        sum(map(len, want.values())) + summary["discarded_bytes"]

    again = results_cli(orch, job_id, dest)
    assert again.returncode == 1 and "not an empty directory" in again.stderr, again.stderr
    human = results_cli(orch, job_id, tmp_path / "human")
    assert human.returncode == 0 and "attempts stitched: 1, 2, 3, 4" in human.stdout \
        and f"checkpoint {final.seq} (1 file)" in human.stdout, human.stdout + human.stderr


def test_samples_written_ahead_of_checkpoints_are_stitched_once(cleanup: RunningOrchestrator,
                                                                tmp_path: Path) -> None:
    """An engine that appends samples continuously and deletes its sentinel while it writes a
    checkpoint (AToM-OpenMM): by the time the worker packs the set, more samples follow the
    checkpoint. Their lengths are taken when the sentinel goes, so after kill -9s each sample is
    in the stitched file once. Taken with the set instead, the samples between the checkpoint
    and the packing were stored twice (the resumed attempt wrote them again)."""
    orch = cleanup
    total = 300
    job_id = submit_streamer(orch, tmp_path, total=total, every=15, step_s=0.02, engine=SAMPLER,
                             spec={"checkpoint": {"paths": ["state.json"],
                                                  "sentinel": "ckpt_is_valid",
                                                  "poll_seconds": 0.2},
                                   "outputs": ["samples.out"], "max_attempts": 5})
    op = orch.operator()
    seq = 0
    for i in range(2):  # two nodes die with kill -9, each after a few checkpoints
        name = f"w{i}"
        w = start_worker(orch, tmp_path, name, **POLLING)
        for _ in range(2):
            seq = wait_accepted(op, job_id, tmp_path, name, after=seq).latest_checkpoint or 0
        assert op.get_job(job_id).status == "running", "finished before the test could kill"
        group = engine_group(w)
        assert group, f"no engine under worker {name} ({why(tmp_path, name)})"
        kill_node(w, group)
    start_worker(orch, tmp_path, "last", **POLLING)
    finished(orch, job_id, tmp_path, "last")
    result = results_cli(orch, job_id, tmp_path / "results", "--json")
    assert result.returncode == 0, f"results failed: {result.stderr.strip()}"
    summary = json.loads(result.stdout)
    lines = (tmp_path / "results" / "samples.out").read_text().splitlines()
    numbers = [int(line.split()[1]) for line in lines]
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    assert numbers == list(range(1, total + 1)), \
        f"{len(numbers)} samples stitched for {total} cycles: repeated {repeated[:10]}, " \
        f"missing {sorted(set(range(1, total + 1)) - set(numbers))[:10]}"
    assert summary["attempts"] == [1, 2, 3], summary


def test_outputs_are_shipped_once_not_whole_at_each_checkpoint(cleanup: RunningOrchestrator,
                                                              tmp_path: Path) -> None:
    orch = cleanup
    total = 90
    job_id = submit_streamer(orch, tmp_path, total=total, every=10, step_s=0.03)
    start_worker(orch, tmp_path, "w")
    finished(orch, job_id, tmp_path, "w")
    want = expected_outputs(total)
    assert stored_bytes(orch, job_id) == {1: sum(map(len, want.values()))}, \
        "output bytes stored more than once"
    index = json.loads(orch.settings.open_storage().get_bytes(output_index_key(job_id, 1)))
    assert index["final"] and index["resumed_from"] is None
    assert len(index["files"]["traj.bin"]) > 3, "the trajectory was not streamed in parts"
    d = orch.operator().get_job(job_id)
    assert len(d.checkpoint_list) >= 1
    result = results_cli(orch, job_id, tmp_path / "r", "--json")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r" / "traj.bin").read_bytes() == want["traj.bin"]
    assert json.loads(result.stdout)["discarded_bytes"] == 0


# --------------------------------------------------------------------------- stitching alone


def put_attempt(storage: LocalStorage, job: str, attempt: int, data: dict[str, list[bytes]],
                resumed_from: dict[str, Any] | None) -> None:
    files = {}
    for rel, parts in data.items():
        entries, offset = [], 0
        for k, part in enumerate(parts):
            storage.put_bytes(output_part_key(job, attempt, rel, k), part)
            entries.append({"offset": offset, "size": len(part),
                            "sha256": hashlib.sha256(part).hexdigest()})
            offset += len(part)
        files[rel] = entries
    storage.put_bytes(output_index_key(job, attempt), json.dumps(
        {"attempt": attempt, "files": files, "resumed_from": resumed_from}).encode())


def test_stitch_cuts_at_resume_points_in_order_and_skips_dead_ends(tmp_path: Path) -> None:
    storage, job = LocalStorage(tmp_path / "store"), "j1"
    put_attempt(storage, job, 1, {"a.log": [b"0123", b"45678"]}, None)  # resumed from at 6
    put_attempt(storage, job, 2, {"a.log": [b"xxxx"]},  # died before any checkpoint
                {"seq": 2, "attempt": 1, "outputs": {"a.log": 6}})
    put_attempt(storage, job, 3, {"a.log": [b"6789", b"ABCD"], "b.bin": [b"\0\1"]},
                {"seq": 2, "attempt": 1, "outputs": {"a.log": 6}})
    put_attempt(storage, job, 4, {"a.log": [b"EF"], "b.bin": [b"\2"]},
                {"seq": 5, "attempt": 3, "outputs": {"a.log": 6, "b.bin": 2}})
    chain = lineage(storage, job, 4, None)
    assert [s.attempt for s in chain] == [1, 3, 4]
    assert [s.cut for s in chain] == [{"a.log": 6}, {"a.log": 6, "b.bin": 2}, None]
    indexes = {n: json.loads(storage.get_bytes(output_index_key(job, n))) for n in (1, 2, 3, 4)}
    done = stitch(storage, job, chain, tmp_path / "out", indexes)
    assert (tmp_path / "out" / "a.log").read_bytes() == b"012345" + b"6789AB" + b"EF"
    assert (tmp_path / "out" / "b.bin").read_bytes() == b"\0\1\2"
    assert done.attempts == [1, 3, 4]
    assert done.discarded == 3 + 4 + 2  # attempt 1 past 6, attempt 2 whole, attempt 3 past 6

    # An unfinished job: up to its newest checkpoint's lengths.
    partial = stitch(storage, job, lineage(storage, job, 3, {"a.log": 7, "b.bin": 1}),
                     tmp_path / "partial")
    assert partial.files == {"a.log": 13, "b.bin": 1}


def test_stitch_refuses_a_corrupt_or_missing_part(tmp_path: Path) -> None:
    storage, job = LocalStorage(tmp_path / "store"), "j2"
    put_attempt(storage, job, 1, {"a.log": [b"hello", b"world"]}, None)
    storage.put_bytes(output_part_key(job, 1, "a.log", 1), b"WORLD", overwrite=True)
    with pytest.raises(IntegrityError):
        stitch(storage, job, lineage(storage, job, 1, None), tmp_path / "out")
    with pytest.raises(StitchError, match="recorded 20"):
        stitch(storage, job, [Segment(1, json.loads(storage.get_bytes(
            output_index_key(job, 1))), {"a.log": 20})], tmp_path / "out2")
    with pytest.raises(StitchError, match="no output index"):
        lineage(storage, job, 7, None)
    put_attempt(storage, job, 2, {"a.log": [b"!"]}, {"seq": 1, "attempt": 2, "outputs": {}})
    with pytest.raises(StitchError, match="impossible resume point"):
        lineage(storage, job, 2, None)


def test_outputs_are_relative_globs() -> None:
    assert BundleSpec(command="x", outputs=["out/*.xtc"]).outputs == ["out/*.xtc"]
    for bad in ("/abs.xtc", "../up.xtc", ""):
        with pytest.raises(ValueError, match="output path"):
            BundleSpec(command="x", outputs=[bad])

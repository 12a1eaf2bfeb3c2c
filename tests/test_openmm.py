"""The restartable OpenMM runner (`python -m relaymd.engines.openmm`), for real: CPU platform, a
~700-atom TIP3P water box from `relaymd example openmm`, real subprocesses and signals, and a job
run by real `relaymd worker` processes against a real orchestrator with file:// storage."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("openmm")

from relaymd.engines.openmm.example import write_example  # noqa: E402
from relaymd.engines.openmm.runner import (  # noqa: E402
    CHECKPOINT_FILES,
    ENERGY_HEADER,
    EXIT_INTERRUPTED,
    OUTPUT_FILES,
)
from relaymd.models import CheckpointInfo, JobCreate  # noqa: E402
from relaymd.results import fetch_results  # noqa: E402
from relaymd.storage.bundle import pack_directory  # noqa: E402

from . import test_worker  # noqa: E402
from .conftest import RunningOrchestrator  # noqa: E402
from .test_worker import (  # noqa: E402
    POLLING,
    engine_group,
    engine_log,
    kill_node,
    latest,
    start_worker,
    wait_accepted,
    wait_for,
    why,
)

# The worker tests' fixtures: a fast-reaping orchestrator for every test here, and (autouse)
# the clean-up of every worker and engine a test started, runners included.
orch = test_worker.orch
no_leftover_processes = test_worker.no_leftover_processes

DT_PS = 0.002  # the example's LangevinMiddle step
RUNNER = "python -m relaymd.engines.openmm"
Row = tuple[int, float, float, float, float, float]  # one energies.csv record


# --------------------------------------------------------------------------- the example system


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The example bundle (built once: minimising it takes seconds) and its relaymd.yaml."""
    dest = tmp_path_factory.mktemp("example") / "water"
    spec = write_example(dest, atoms=700, ns=0.01, checkpoint_seconds=600, platform="CPU")
    assert yaml.safe_load((dest / "relaymd.yaml").read_text()) == spec
    command = str(spec["command"])
    assert command.startswith(RUNNER + " "), f"example command {command!r}"
    for flag in ("--ns 0.01", "--platform CPU", "--checkpoint-seconds 600", "--report-steps ",
                 "--trajectory-steps "):
        assert flag in command, f"example command {command!r} lacks {flag!r}"
    assert spec["checkpoint"]["sentinel"] == "checkpoint.json", spec["checkpoint"]
    assert spec["checkpoint"]["paths"] == CHECKPOINT_FILES, spec["checkpoint"]
    assert spec["outputs"] == OUTPUT_FILES == ["energies.csv", "trajectory.xtc"], spec
    return dest, spec


def runner_args(spec: dict[str, Any], steps: int, every: int, report: int) -> list[str]:
    """The example's own command line with a step count instead of ns, a step-driven checkpoint
    interval, a short report interval (a frame every two reports) and one CPU thread; without
    the leading `python -m ...`."""
    command = str(spec["command"])
    changed = re.sub(r"--ns \S+", f"--steps {steps}", command)
    changed = re.sub(r"--report-steps \d+", f"--report-steps {report}", changed)
    changed = re.sub(r"--trajectory-steps \d+", f"--trajectory-steps {2 * report}", changed)
    assert changed.count("--steps ") == 1 and f"--report-steps {report}" in changed, changed
    assert f"--trajectory-steps {2 * report}" in changed, changed
    args = shlex.split(changed)[len(RUNNER.split()):]
    return [*args, "--checkpoint-steps", str(every), "--threads", "1"]


def job_copy(example: tuple[Path, dict[str, Any]], dest: Path) -> Path:
    shutil.copytree(example[0], dest)
    return dest


def run_runner(workdir: Path, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaymd.engines.openmm", *args], cwd=workdir,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


def start_runner(workdir: Path, args: list[str], log: Path | None = None) -> subprocess.Popen[str]:
    """The runner in its own group; its output piped, or written to `log` to read while it runs."""
    out: Any = subprocess.PIPE if log is None else open(log, "w")  # noqa: SIM115
    try:
        return subprocess.Popen([sys.executable, "-m", "relaymd.engines.openmm", *args],
                                cwd=workdir, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    finally:
        if log is not None:
            out.close()


def said(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}; stdout {proc.stdout.strip()!r}; stderr {proc.stderr.strip()[-600:]!r}"


# --------------------------------------------------------------------------- reading the files


def energies(text: str) -> list[Row]:
    lines = text.splitlines(keepends=True)
    assert lines and lines[0] == ENERGY_HEADER, f"energies.csv header {lines[:1]}"
    rows: list[Row] = []
    for line in lines[1:]:
        f = line.strip().split(",")
        assert len(f) == 6, f"malformed energies.csv record {line!r}"
        rows.append((int(f[0]), *(float(x) for x in f[1:])))  # type: ignore[arg-type]
    return rows


def echoed(log: Path) -> list[Row]:
    """The energy records a `--print-energies` runner echoed to its output so far (complete
    lines only): also those past its last checkpoint, which energies.csv does not hold yet."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    lines = [ln[len("energy "):] for ln in text.splitlines(keepends=True)
             if ln.startswith("energy ") and ln.endswith("\n")]
    return energies(ENERGY_HEADER + "".join(lines))


def freeze_past_checkpoint(group: int, log: Path, after: int, every: int) -> list[Row] | None:
    """SIGSTOP the runner's group once its last record is past `after` and between checkpoints
    (so records beyond its last checkpoint exist); the records then, or None to look again."""
    rows = echoed(log)
    if not rows or rows[-1][0] <= after or rows[-1][0] % every == 0:
        return None
    os.killpg(group, signal.SIGSTOP)
    rows = echoed(log)
    if rows[-1][0] % every:
        return rows
    os.killpg(group, signal.SIGCONT)  # it reached a checkpoint step meanwhile: try again
    return None


def assert_same_trajectory(lost: list[Row], rows: list[Row], resume: int) -> None:
    """Records redone after a resume from the binary checkpoint (which carries the integrator's
    RNG) repeat the lost ones: the same trajectory, not merely a plausible one."""
    kept = [r for r in lost if r[0] <= resume]
    assert rows[:len(kept)] == kept, "records up to the resume point were rewritten"
    redone = lost[len(kept):]
    assert redone, "no records were lost and redone"
    for old, new in zip(redone, rows[len(kept):], strict=False):
        assert old[0] == new[0] and abs(old[2] - new[2]) < 1.0, \
            f"step {old[0]} redone from the binary checkpoint gives PE {new[2]}, first time {old[2]}"


def assert_continuous(rows: list[Row], upto: int, report: int, volume: float) -> None:
    """One record at every multiple of `report` up to `upto`, none twice, none missing, each
    with its own time, finite energies and the box volume it started with (NVT)."""
    steps = [r[0] for r in rows]
    want = list(range(report, upto + 1, report))
    dup = sorted({s for s in steps if steps.count(s) > 1})
    missing = sorted(set(want) - set(steps))
    extra = sorted(set(steps) - set(want))
    assert steps == want, (f"energies.csv steps are not {report}..{upto} every {report}: duplicated "
                           f"{dup[:5]}, missing {missing[:5]}, unexpected {extra[:5]}, "
                           f"first {steps[:3]}, last {steps[-3:]}")
    for step, time_ps, pe, ke, temp, vol in rows:
        assert abs(time_ps - step * DT_PS) < 1e-3, f"step {step} recorded at t={time_ps} ps"
        assert math.isfinite(pe) and math.isfinite(ke) and pe < 0, f"step {step}: PE {pe}, KE {ke}"
        assert 100 < temp < 500, f"step {step}: temperature {temp} K"
        assert abs(vol - volume) < 1e-5, f"step {step}: box volume {vol} nm^3, started {volume}"


def state_xml(text: str) -> tuple[int, list[list[float]], int, int]:
    """(stepCount, box vectors, positions, velocities) of a serialized OpenMM State."""
    root = ET.fromstring(text)
    box = root.find("PeriodicBoxVectors")
    assert box is not None, "state has no PeriodicBoxVectors"
    vectors = [[float(box.find(v).attrib[c]) for c in "xyz"] for v in "ABC"]  # type: ignore[union-attr]
    pos = root.find("Positions")
    vel = root.find("Velocities")
    return (int(root.attrib["stepCount"]), vectors, len(pos) if pos is not None else 0,
            len(vel) if vel is not None else 0)


def volume(vectors: list[list[float]]) -> float:
    (a, b, c) = vectors
    return (a[0] * (b[1] * c[2] - b[2] * c[1]) - a[1] * (b[0] * c[2] - b[2] * c[0])
            + a[2] * (b[0] * c[1] - b[1] * c[0]))


def potential_energy(system_xml: str, state: str) -> float:
    """The potential energy (kJ/mol) of a checkpoint.xml's coordinates, computed afresh."""
    import openmm

    system = openmm.XmlSerializer.deserialize(system_xml)
    st = openmm.XmlSerializer.deserialize(state)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    ctx.setPeriodicBoxVectors(*st.getPeriodicBoxVectors())
    ctx.setPositions(st.getPositions())
    pe = ctx.getState(getEnergy=True).getPotentialEnergy()
    return float(pe.value_in_unit(openmm.unit.kilojoule_per_mole))


def assert_final(files: dict[str, str], example: tuple[Path, dict[str, Any]], total: int,
                 report: int) -> list[Row]:
    """A finished run: exactly `total` steps, a continuous energy log, a finite potential energy
    that its coordinates reproduce, and the starting box (NVT)."""
    src = example[0]
    meta = json.loads(files["checkpoint.json"])
    assert meta["step"] == total, f"final checkpoint.json is at step {meta['step']}, want {total}"
    step, box, n_pos, n_vel = state_xml(files["checkpoint.xml"])
    assert step == total, f"final checkpoint.xml is at step {step}, want {total}"
    _, box0, n_atoms, _ = state_xml((src / "state.xml").read_text())
    assert n_pos == n_vel == n_atoms, f"{n_pos} positions, {n_vel} velocities for {n_atoms} atoms"
    assert all(abs(x - y) < 1e-9 for u, v in zip(box, box0, strict=True)
               for x, y in zip(u, v, strict=True)), f"box changed: {box0} -> {box}"
    rows = energies(files["energies.csv"])
    assert_continuous(rows, total, report, volume(box0))
    pe = potential_energy((src / "system.xml").read_text(), files["checkpoint.xml"])
    assert math.isfinite(pe) and pe < 0, f"final potential energy {pe} kJ/mol"
    assert abs(pe - rows[-1][2]) < 0.5, \
        f"final coordinates give {pe:.3f} kJ/mol, the log's last record {rows[-1][2]:.3f}"
    progress = json.loads(files["progress.json"])
    assert progress["done"] == progress["total"] == round(total * DT_PS / 1000, 6), progress
    return rows


def read_files(workdir: Path) -> dict[str, str]:
    return {name: (workdir / name).read_text() for name in [*CHECKPOINT_FILES, *OUTPUT_FILES]
            if name.endswith((".xml", ".json", ".csv"))}


def frame_steps(xtc: Path, atoms: int) -> list[int]:
    """The step of every frame in an XTC file (each read whole: a torn frame fails here)."""
    from openmm.app.internal.xtc_utils import read_xtc

    coords, _box, time_ps, steps = read_xtc(str(xtc).encode())
    assert coords.shape[0] == atoms, f"{xtc.name}: frames of {coords.shape[0]} atoms, want {atoms}"
    assert all(abs(t - s * DT_PS) < 1e-3 for t, s in zip(time_ps, steps, strict=True)), \
        f"{xtc.name}: frame times {list(time_ps)[:4]} disagree with steps {list(steps)[:4]}"
    return [int(s) for s in steps]


def assert_frames(xtc: Path, atoms: int, upto: int, every: int) -> None:
    got = frame_steps(xtc, atoms)
    assert got == list(range(every, upto + 1, every)), \
        f"{xtc.name} frames at steps {got[:4]}..{got[-3:]}: want {every}..{upto} every {every}"


def atoms_of(example: tuple[Path, dict[str, Any]]) -> int:
    return state_xml((example[0] / "state.xml").read_text())[2]


def resumed_at(output: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed at step (\d+)", output)]


# --------------------------------------------------------------------------- runner: signals


def stopped_after_first_checkpoint(work: Path, args: list[str]) -> tuple[int, str]:
    """Run the runner in `work`, SIGTERM it once its first periodic checkpoint is written:
    (exit code, output)."""
    proc = start_runner(work, args)
    try:
        wait_for(lambda: (work / "checkpoint.json").exists() or proc.poll() is not None, 30,
                 "the runner's first periodic checkpoint")
        assert proc.poll() is None, f"runner exited {proc.returncode} early: {proc.communicate()[0]}"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out


def test_sigterm_writes_a_checkpoint_exits_75_and_a_rerun_finishes_exactly(
        example: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    total, every, report = 1000, 200, 50
    work = job_copy(example, tmp_path / "job")
    args = runner_args(example[1], total, every, report)
    code, out = stopped_after_first_checkpoint(work, args)
    assert code == EXIT_INTERRUPTED == 75, f"exit {code} after SIGTERM: {out}"
    m = re.search(r"SIGTERM: checkpoint written at step (\d+)", out)
    assert m, f"no 'checkpoint written' line after SIGTERM: {out!r}"
    stopped = int(m.group(1))
    assert every <= stopped < total, f"stopped at step {stopped}: not part-way through {total}"
    files = read_files(work)
    assert json.loads(files["checkpoint.json"])["step"] == stopped, files["checkpoint.json"]
    assert state_xml(files["checkpoint.xml"])[0] == stopped, "checkpoint.xml is not at that step"
    box0 = state_xml((example[0] / "state.xml").read_text())[1]
    assert_continuous(energies(files["energies.csv"]), stopped, report, volume(box0))
    assert json.loads(files["progress.json"])["done"] == round(stopped * DT_PS / 1000, 6)

    again = run_runner(work, args)
    assert again.returncode == 0, f"the rerun failed: {said(again)}"
    assert resumed_at(again.stdout) == [stopped], f"rerun did not resume at {stopped}: {said(again)}"
    assert "from the binary checkpoint" in again.stdout, said(again)
    assert f"finished {total} steps" in again.stdout, said(again)
    assert_final(read_files(work), example, total, report)
    assert_frames(work / "trajectory.xtc", atoms_of(example), total, 2 * report)


def test_a_resume_in_a_fresh_directory_continues_the_outputs_exactly(
        example: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """As under RelayMD: the next attempt gets the inputs and the checkpoint set, not the
    outputs; its energies.csv and trajectory.xtc start where the first attempt's stop, so the
    two concatenated are one continuous log and one valid trajectory."""
    total, every, report = 1000, 200, 50
    first = job_copy(example, tmp_path / "first")
    args = runner_args(example[1], total, every, report)
    code, out = stopped_after_first_checkpoint(first, args)
    assert code == EXIT_INTERRUPTED, f"exit {code}: {out}"
    stopped = json.loads((first / "checkpoint.json").read_text())["step"]
    assert 0 < stopped < total, f"stopped at {stopped}"
    second = job_copy(example, tmp_path / "second")
    for name in CHECKPOINT_FILES:
        shutil.copy2(first / name, second / name)
    again = run_runner(second, args)
    assert again.returncode == 0 and resumed_at(again.stdout) == [stopped], said(again)
    assert not (second / "energies.csv").read_text().startswith("step,"), \
        "the continuation repeats the header"
    whole = tmp_path / "whole"
    whole.mkdir()
    for name in OUTPUT_FILES:
        (whole / name).write_bytes((first / name).read_bytes() + (second / name).read_bytes())
    (whole / "checkpoint.json").write_text((second / "checkpoint.json").read_text())
    files = {**read_files(second), "energies.csv": (whole / "energies.csv").read_text()}
    assert_final(files, example, total, report)
    assert_frames(whole / "trajectory.xtc", atoms_of(example), total, 2 * report)


def test_a_crash_after_a_checkpoint_redoes_only_the_lost_steps_once(
        example: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """SIGKILL with records past the last checkpoint: the rerun drops them, redoes those steps
    (continuing the same trajectory: the binary checkpoint carries the RNG) and logs each once."""
    total, every, report = 800, 200, 50
    work = job_copy(example, tmp_path / "job")
    args = runner_args(example[1], total, every, report)
    log = tmp_path / "runner.log"
    proc = start_runner(work, [*args, "--print-energies"], log)
    try:
        wait_for(lambda: (work / "checkpoint.json").exists() or proc.poll() is not None, 30,
                 "the runner's first periodic checkpoint")
        first = json.loads((work / "checkpoint.json").read_text())["step"]
        # freeze it between checkpoints, note where it is, then crash it
        lost = wait_for(lambda: proc.poll() is None and freeze_past_checkpoint(
            proc.pid, log, first, every), 20, "records past the first checkpoint")
        on_disk = energies((work / "energies.csv").read_text())
        frames = frame_steps(work / "trajectory.xtc", atoms_of(example))
        ckpt = json.loads((work / "checkpoint.json").read_text())["step"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"runner exit {proc.returncode}: it was not killed"
    assert 0 < ckpt < total and lost[-1][0] > ckpt, \
        f"checkpoint at {ckpt}, last record at {lost[-1][0]}: no lost work to redo"
    assert on_disk and on_disk[-1][0] == ckpt, \
        f"energies.csv ends at step {on_disk[-1][0] if on_disk else None}, the checkpoint is at " \
        f"{ckpt}: records must reach the file only with a checkpoint (the watcher needs it still)"
    assert frames and frames[-1] == ckpt // (2 * report) * (2 * report), \
        f"trajectory.xtc ends at step {frames[-1:]}, the checkpoint is at {ckpt}: frames too " \
        "must reach the file only with a checkpoint"

    again = run_runner(work, args)
    assert again.returncode == 0, f"the rerun failed: {said(again)}"
    assert resumed_at(again.stdout) == [ckpt], f"did not resume at step {ckpt}: {said(again)}"
    rows = assert_final(read_files(work), example, total, report)
    assert_same_trajectory(lost, rows, ckpt)


# --------------------------------------------------------------------------- runner: resume paths


@pytest.fixture(scope="module")
def finished_200(example: tuple[Path, dict[str, Any]],
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example run to completion at 200 steps (checkpoint every 100, a record every 50)."""
    work = job_copy(example, tmp_path_factory.mktemp("finished") / "job")
    done = run_runner(work, runner_args(example[1], 200, 100, 50))
    assert done.returncode == 0 and "finished 200 steps" in done.stdout, said(done)
    return work


def test_a_rerun_after_completion_exits_0_and_does_no_work(
        example: tuple[Path, dict[str, Any]], finished_200: Path, tmp_path: Path) -> None:
    work = shutil.copytree(finished_200, tmp_path / "job")
    before = {name: (work / name).read_bytes() for name in ("checkpoint.xml", "energies.csv")}
    again = run_runner(work, runner_args(example[1], 200, 100, 50))
    assert again.returncode == 0, f"rerun of a finished run: {said(again)}"
    assert resumed_at(again.stdout) == [200], said(again)
    after = {name: (work / name).read_bytes() for name in before}
    assert after["energies.csv"] == before["energies.csv"], "the rerun changed the energy log"
    assert after["checkpoint.xml"] == before["checkpoint.xml"], \
        "the rerun moved the coordinates: it ran steps past the total"
    assert_final(read_files(work), example, 200, 50)


def test_the_portable_xml_checkpoint_resumes_when_the_binary_one_is_foreign(
        example: tuple[Path, dict[str, Any]], finished_200: Path, tmp_path: Path) -> None:
    """A checkpoint written on another platform (a GPU node) resumes from checkpoint.xml."""
    work = shutil.copytree(finished_200, tmp_path / "job")
    meta = json.loads((work / "checkpoint.json").read_text())
    (work / "checkpoint.json").write_text(json.dumps({**meta, "platform": "CUDA"}))
    again = run_runner(work, runner_args(example[1], 400, 100, 50))  # extend it to 400
    assert again.returncode == 0, said(again)
    assert resumed_at(again.stdout) == [200] and "from the xml checkpoint" in again.stdout, \
        f"want a resume at 200 from the xml checkpoint: {said(again)}"
    rows = assert_final(read_files(work), example, 400, 50)
    first = energies((finished_200 / "energies.csv").read_text())
    assert rows[:4] == first, "records up to the resume point changed"


def test_an_unreadable_checkpoint_fails_and_is_never_a_fresh_start(
        example: tuple[Path, dict[str, Any]], finished_200: Path, tmp_path: Path) -> None:
    work = shutil.copytree(finished_200, tmp_path / "job")
    meta = json.loads((work / "checkpoint.json").read_text())
    (work / "checkpoint.json").write_text(json.dumps({**meta, "platform": "CUDA"}))
    (work / "checkpoint.xml").write_text("<State truncated")
    log = (work / "energies.csv").read_bytes()
    again = run_runner(work, runner_args(example[1], 400, 100, 50))
    assert again.returncode == 2, f"want exit 2 on an unreadable checkpoint: {said(again)}"
    assert "checkpoint.xml" in again.stderr and "Traceback" not in again.stderr, said(again)
    assert (work / "energies.csv").read_bytes() == log, "the energy log was reset: a fresh start"
    assert json.loads((work / "checkpoint.json").read_text())["step"] == 200


def test_a_crash_between_checkpoint_writes_never_relabels_a_newer_state(
        example: tuple[Path, dict[str, Any]], finished_200: Path, tmp_path: Path) -> None:
    """checkpoint.xml and .chk are replaced before checkpoint.json: a crash in between leaves a
    checkpoint.json naming the previous step beside the newer state. Resuming must use the
    state's own step, not run the newer coordinates again under the older step numbers."""
    work = shutil.copytree(finished_200, tmp_path / "job")
    old_meta = (work / "checkpoint.json").read_text()
    args = runner_args(example[1], 400, 100, 50)
    ran = run_runner(work, args)
    assert ran.returncode == 0 and "finished 400 steps" in ran.stdout, said(ran)
    log = (work / "energies.csv").read_bytes()
    (work / "checkpoint.json").write_text(old_meta)  # as if it died before this last write
    again = run_runner(work, args)
    assert again.returncode == 0, said(again)
    assert resumed_at(again.stdout) == [400], \
        f"checkpoint.xml/.chk hold step 400; the runner resumed at {resumed_at(again.stdout)}: " \
        f"it re-ran the step-400 coordinates as steps 200..400 ({said(again)})"
    assert (work / "energies.csv").read_bytes() == log, "records 250..400 were replaced"
    assert_final(read_files(work), example, 400, 50)


# --------------------------------------------------------------------------- runner: bad inputs


BAD_INPUTS = {
    "missing-system": (["--system", "nope.xml", "--integrator", "integrator.xml", "--steps", "10"],
                       "nope.xml"),
    "missing-state": (["--system", "system.xml", "--integrator", "integrator.xml", "--state",
                       "nope.xml", "--steps", "10"], "nope.xml"),
    "missing-integrator-with-ns": (["--system", "system.xml", "--integrator", "nope.xml", "--state",
                                    "state.xml", "--ns", "0.001"], "nope.xml"),
    "no-integrator": (["--system", "system.xml", "--state", "state.xml", "--steps", "10"],
                      "--integrator"),
    "missing-pdb": (["--pdb", "nope.pdb", "--steps", "10"], "nope.pdb"),
    "state-given-as-system": (["--system", "state.xml", "--integrator", "integrator.xml",
                               "--steps", "10"], "state.xml"),
    "unknown-platform": (["--system", "system.xml", "--integrator", "integrator.xml", "--state",
                          "state.xml", "--steps", "10", "--platform", "Quantum"], "Quantum"),
    "zero-steps": (["--system", "system.xml", "--integrator", "integrator.xml", "--steps", "0"],
                   "positive"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_a_clear_error_and_a_nonzero_exit(
        example: tuple[Path, dict[str, Any]], tmp_path: Path, case: str) -> None:
    args, culprit = BAD_INPUTS[case]
    work = job_copy(example, tmp_path / "job")
    res = run_runner(work, [*args, "--platform", "CPU"] if "--platform" not in args else args)
    assert res.returncode == 2, f"{case}: want exit 2: {said(res)}"
    assert "Traceback" not in res.stderr, f"{case}: a traceback, not an error message: {said(res)}"
    assert culprit in res.stderr, f"{case}: the error does not name {culprit!r}: {said(res)}"
    assert not (work / "checkpoint.json").exists(), f"{case}: wrote a checkpoint"


# --------------------------------------------------------------------------- through the worker


def submit_openmm(orch: RunningOrchestrator, tmp_path: Path, example: tuple[Path, dict[str, Any]],
                  total: int, every: int, report: int) -> str:
    """The example bundle as a job, the way `relaymd submit` sends it."""
    job_id = uuid.uuid4().hex
    src = job_copy(example, tmp_path / f"job-{job_id[:6]}")
    spec = dict(example[1])
    args = [*runner_args(spec, total, every, report), "--print-energies"]
    spec["command"] = " ".join([RUNNER, *map(shlex.quote, args)])
    spec["checkpoint"] = {**spec["checkpoint"], "poll_seconds": 0.1}
    (src / "relaymd.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    bundle = tmp_path / f"{job_id}.tar.gz"
    pack_directory(src, bundle)
    op = orch.operator()
    op.upload_bundle(job_id, bundle)
    op.create_job(JobCreate(id=job_id, title="openmm water"))
    return job_id


def checkpoint_files(orch: RunningOrchestrator, info: CheckpointInfo, tmp_path: Path) -> dict[str, str]:
    """The text files of an accepted checkpoint, fetched from storage."""
    dest = tmp_path / f"ckpt-{uuid.uuid4().hex[:8]}.tar.gz"
    orch.settings.open_storage().get_file(info.key, dest, expected_sha256=info.sha256)
    out: dict[str, str] = {}
    with tarfile.open(dest) as tar:
        names = tar.getnames()
        assert set(names) == set(CHECKPOINT_FILES), f"checkpoint {info.seq} holds {names}"
        for name in names:
            if name.endswith((".xml", ".json", ".csv")):
                member = tar.extractfile(name)
                assert member is not None
                out[name] = member.read().decode()
    return out


def test_a_job_whose_node_dies_resumes_on_a_new_worker_to_exactly_its_total(
        orch: RunningOrchestrator, tmp_path: Path, example: tuple[Path, dict[str, Any]]) -> None:
    total, every, report = 1000, 200, 50
    job_id = submit_openmm(orch, tmp_path, example, total, every, report)
    op = orch.operator()
    w1 = start_worker(orch, tmp_path, "w1")
    first = wait_accepted(op, job_id, tmp_path, "w1", timeout=40)
    accepted = json.loads(checkpoint_files(orch, latest(first), tmp_path)["checkpoint.json"])["step"]
    live = tmp_path / "work-w1" / f"{job_id[:12]}-attempt1.log"  # the engine's output
    group = engine_group(w1)
    assert group, f"no engine under worker w1 ({why(tmp_path, 'w1')})"
    # freeze the engine between checkpoints, note what it had done, then the node dies
    lost = wait_for(lambda: freeze_past_checkpoint(group, live, accepted, every), 20,
                    lambda: f"attempt 1 to run past its checkpoint at {accepted} "
                            f"({why(tmp_path, 'w1')})")
    kill_node(w1, group)

    d = op.get_job(job_id)
    resume_files = checkpoint_files(orch, latest(d), tmp_path)
    resume = json.loads(resume_files["checkpoint.json"])["step"]
    assert 0 < resume < total, f"last accepted checkpoint is at step {resume} of {total}"
    assert state_xml(resume_files["checkpoint.xml"])[0] == resume, "checkpoint files disagree"
    assert lost[-1][0] > resume, \
        f"attempt 1 logged up to step {lost[-1][0]}, the checkpoint is at {resume}: nothing lost"

    w2 = start_worker(orch, tmp_path, "w2", **POLLING)  # starts while the dead lease runs out
    d = wait_for(lambda: (d := op.get_job(job_id)).status in ("completed", "failed") and d, 45,
                 lambda: f"the job to finish on w2 ({why(tmp_path, 'w2')})")
    assert d.status == "completed", f"job is {d.status}: {d.last_failure} ({why(tmp_path, 'w2')})"
    assert (d.attempt, d.failures) == (2, 0), f"attempt {d.attempt}, failures {d.failures}"
    w2.send_signal(signal.SIGTERM)
    assert w2.wait(10) == 0, f"worker w2 exit status {w2.returncode} ({why(tmp_path, 'w2')})"

    log2 = engine_log(orch, job_id, 2)
    assert resumed_at(log2) == [resume] and "from the binary checkpoint" in log2, \
        f"attempt 2 did not resume from the accepted checkpoint at {resume}: {log2[-400:]!r}"
    assert f"finished {total} steps" in log2, log2[-400:]
    # The outputs as `relaymd results` stitches them: attempt 1's up to the resume point, then
    # attempt 2's; one continuous energy log and trajectory, as if never interrupted.
    results = tmp_path / "results"
    summary = fetch_results(orch.settings.open_storage(), d, results)
    assert summary["attempts"] == [1, 2], summary
    assert set(summary["files"]) == set(OUTPUT_FILES), summary
    final = checkpoint_files(orch, latest(d), tmp_path)
    assert "energies.csv" not in final, "the energy log was shipped with the checkpoint"
    rows = assert_final({**final, "energies.csv": (results / "energies.csv").read_text()},
                        example, total, report)
    assert_same_trajectory(lost, rows, resume)
    assert_frames(results / "trajectory.xtc", atoms_of(example), total, 2 * report)

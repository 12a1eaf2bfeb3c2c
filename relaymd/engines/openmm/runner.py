"""A restartable OpenMM simulation: run to a total step count, checkpointing as it goes.

Files in the job dir (the bundle's working directory). The checkpoint set (state only):
  checkpoint.xml   portable `saveState` XML (positions, velocities, box, step) — resumes anywhere
  checkpoint.chk   binary `saveCheckpoint` (also the integrator's RNG) — used only on the same
                   platform and OpenMM version, where it continues the trajectory exactly
  checkpoint.json  the commit point, written last: step, platform, OpenMM version
  progress.json    {done, total, unit: "ns", ns_per_day} for the worker's heartbeat
The outputs (RelayMD streams them and never restores them, see `OUTPUT_FILES`):
  energies.csv     one record per report interval (a header on a fresh start only)
  trajectory.xtc   one frame per `--trajectory-steps` (when asked for)
Records and frames are held in memory and appended just before each checkpoint is written, so
the outputs on disk always end at the step of the newest checkpoint (nothing runs ahead of it:
after a resume the next attempt's outputs continue exactly where the stored ones stop).
Resuming in a directory that still holds energies.csv (a rerun by hand) drops its records past
the checkpoint and appends; without it (RelayMD's fresh attempt) it starts a headerless
continuation. Every state file is written atomically (temp file, fsync, rename). SIGTERM writes
a checkpoint and exits 75 (EX_TEMPFAIL); the process exits 0 only when the total is reached.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_FILES = ["checkpoint.xml", "checkpoint.chk", "checkpoint.json", "progress.json"]
OUTPUT_FILES = ["energies.csv", "trajectory.xtc"]
ENERGY_HEADER = "step,time_ps,potential_kj_mol,kinetic_kj_mol,temperature_k,volume_nm3\n"
PLATFORM_ORDER = ("CUDA", "OpenCL", "CPU")
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run again to resume


class RunnerError(Exception):
    """Unusable inputs or checkpoint; the message says which file and why."""


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class Options:
    workdir: Path
    system: Path | None
    integrator: Path | None
    state: Path | None
    pdb: Path | None
    forcefields: list[str]
    steps: int
    checkpoint_steps: int | None  # None: by time only
    checkpoint_seconds: float
    report_steps: int
    platform: str
    threads: int | None
    chunk_steps: int = 100
    print_energies: bool = False  # also echo each record to stdout as it is taken
    trajectory_steps: int = 0  # a trajectory.xtc frame every N steps (0: none)


def choose_platform(name: str) -> list[Any]:
    """Platforms to try, best first: CUDA, then OpenCL, then CPU (or only the one named)."""
    import openmm

    names = PLATFORM_ORDER if name.lower() == "auto" else (name,)
    available = {openmm.Platform.getPlatform(i).getName()
                 for i in range(openmm.Platform.getNumPlatforms())}
    chosen = [openmm.Platform.getPlatformByName(n) for n in names if n in available]
    if not chosen:
        raise RunnerError(f"platform {name!r} is not available here (have: "
                          f"{', '.join(sorted(available))})")
    return chosen


class Runner:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.dir = opts.workdir
        self.stop_requested = False
        self.sim: Any = None
        self.platform_name = ""
        self.dt_ps = 0.0
        self.steps_per_second = 0.0
        self.energy_records: list[str] = []  # reported since the last checkpoint
        self.frames: list[tuple[Any, Any]] = []  # (positions, box) taken since the last one
        self.xtc: Any = None
        self.dof: int | None = None  # degrees of freedom: the System's, fixed for the run

    # ------------------------------------------------------------------ setup

    def build(self) -> tuple[Any, Any, Any, Any]:
        """(system, integrator, topology, initial state or positions)."""
        import openmm
        from openmm import app

        if self.o.system is not None:
            try:
                system = openmm.XmlSerializer.deserialize(self.o.system.read_text())
                if self.o.integrator is None:
                    raise RunnerError("--system needs --integrator (a serialized Integrator XML)")
                integrator = openmm.XmlSerializer.deserialize(self.o.integrator.read_text())
                state = openmm.XmlSerializer.deserialize(self.o.state.read_text()) \
                    if self.o.state else None
            except (OSError, ValueError, openmm.OpenMMException) as exc:
                raise RunnerError(f"cannot read the serialized inputs: {exc}") from None
            for flag, path, obj, kind in (("--system", self.o.system, system, openmm.System),
                                          ("--integrator", self.o.integrator, integrator,
                                           openmm.Integrator),
                                          ("--state", self.o.state, state, openmm.State)):
                if obj is not None and not isinstance(obj, kind):
                    raise RunnerError(f"{flag} {path} holds a serialized {type(obj).__name__}, "
                                      f"not a {kind.__name__}")
            return system, integrator, None, state
        if self.o.pdb is None:
            raise RunnerError("give --system/--integrator/--state, or --pdb with --forcefield")
        try:
            pdb = app.PDBFile(str(self.o.pdb))
            ff = app.ForceField(*(self.o.forcefields or ["amber14-all.xml", "amber14/tip3p.xml"]))
            periodic = pdb.topology.getPeriodicBoxVectors() is not None
            system = ff.createSystem(pdb.topology, constraints=app.HBonds,
                                     nonbondedMethod=app.PME if periodic else app.NoCutoff)
        except (OSError, ValueError, KeyError, openmm.OpenMMException) as exc:
            raise RunnerError(f"cannot build a system from --pdb {self.o.pdb}: {exc}") from None
        integrator = openmm.LangevinMiddleIntegrator(300 * openmm.unit.kelvin,
                                                     1 / openmm.unit.picosecond,
                                                     0.002 * openmm.unit.picoseconds)
        return system, integrator, pdb.topology, pdb.positions

    def make_simulation(self) -> None:
        import openmm
        from openmm import app

        system, integrator, topology, initial = self.build()
        if topology is None:
            topology = app.Topology()  # serialized inputs carry no topology; none is needed
        errors = []
        for platform in choose_platform(self.o.platform):
            props = {"Threads": str(self.o.threads)} if self.o.threads and \
                platform.getName() == "CPU" else {}
            try:
                sim = app.Simulation(topology, system, openmm.XmlSerializer.clone(integrator),
                                     platform, props)
            except openmm.OpenMMException as exc:
                errors.append(f"{platform.getName()}: {exc}")
                continue
            self.sim, self.platform_name = sim, platform.getName()
            break
        else:
            raise RunnerError("no platform could run this system: " + "; ".join(errors))
        self.dt_ps = self.sim.integrator.getStepSize().value_in_unit(openmm.unit.picoseconds)
        if not self.resume():
            if isinstance(initial, openmm.State):
                self.sim.context.setState(initial)
            else:
                self.sim.context.setPositions(initial)
                self.sim.minimizeEnergy(maxIterations=100)
            self.sim.context.setStepCount(0)
            self.sim.currentStep = 0
            (self.dir / "energies.csv").write_text(ENERGY_HEADER)
        if self.o.trajectory_steps:
            self.open_trajectory(system)

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> bool:
        """Resume from checkpoint.json if present; False for a fresh start."""
        import openmm

        meta_path = self.dir / "checkpoint.json"
        if not meta_path.exists():
            return False
        try:
            meta = json.loads(meta_path.read_text())
            step = int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunnerError(f"{meta_path}: unreadable checkpoint record: {exc}") from None
        same_host_kind = (meta.get("platform") == self.platform_name
                          and meta.get("openmm") == openmm.__version__)
        loaded = "xml"
        chk = self.dir / "checkpoint.chk"
        if same_host_kind and chk.exists() and int(meta.get("chk_step", -1)) == step:
            try:
                self.sim.loadCheckpoint(str(chk))
                loaded = "binary"
                held = self.sim.context.getStepCount()
            except openmm.OpenMMException:
                loaded = "xml"
        if loaded == "xml":
            try:
                state = openmm.XmlSerializer.deserialize((self.dir / "checkpoint.xml").read_text())
                if not isinstance(state, openmm.State):
                    raise ValueError(f"it holds a {type(state).__name__}, not a State")
            except (OSError, ValueError, openmm.OpenMMException) as exc:
                # An expected resume point that cannot be read fails the attempt: never a
                # silent restart from scratch.
                raise RunnerError(f"checkpoint.xml unreadable: {exc}") from None
            self.sim.context.setState(state)
            held = state.getStepCount()
        if held > step:
            # checkpoint.xml and .chk are replaced before checkpoint.json: a crash between the
            # writes leaves checkpoint.json naming the previous step beside a newer, complete
            # state. Its own step is the truth; relabelling it would run those steps twice.
            print(f"checkpoint.json says step {step}, the {loaded} checkpoint holds step {held} "
                  f"(interrupted between checkpoint writes): using {held}", flush=True)
            step = held
        self.sim.context.setStepCount(step)
        self.sim.currentStep = step
        self.trim_energies(step)
        print(f"resumed at step {step} from the {loaded} checkpoint on {self.platform_name}",
              flush=True)
        return True

    def trim_energies(self, step: int) -> None:
        """Drop records written after the checkpoint we resume from (no duplicated steps). No
        file: a fresh attempt under RelayMD, whose outputs continue the stored ones (no header)."""
        path = self.dir / "energies.csv"
        if not path.exists():
            path.write_bytes(b"")
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [ENERGY_HEADER] + [ln for ln in lines[1:] if ln.strip() and ln.split(",")[0]
                                  .isdigit() and int(ln.split(",")[0]) <= step]
        write_atomic(path, "".join(kept).encode())

    def open_trajectory(self, system: Any) -> None:
        """trajectory.xtc, continuing at the first frame after the current step. XTC frames are
        independent records, so a continuation appended to the stored frames is one valid file."""
        from openmm.app import XTCFile

        every, step = self.o.trajectory_steps, self.sim.currentStep
        path = self.dir / "trajectory.xtc"
        existing = path.exists() and path.stat().st_size > 0  # a rerun by hand: append
        first = every if existing else (step // every + 1) * every
        self.xtc = XTCFile(str(path), _Atoms(system), self.dt_ps, firstStep=first,
                           interval=every, append=existing)

    def take_frame(self) -> None:
        from openmm import unit as u

        state = self.sim.context.getState(getPositions=True, enforcePeriodicBox=False)
        self.frames.append((state.getPositions(asNumpy=True).value_in_unit(u.nanometer),
                            state.getPeriodicBoxVectors()))

    def flush_outputs(self) -> None:
        """Append the frames and records taken since the last checkpoint (before its files)."""
        if self.frames:
            for positions, box in self.frames:
                self.xtc.writeModel(positions, periodicBoxVectors=box)
            with open(self.dir / "trajectory.xtc", "rb") as fh:
                os.fsync(fh.fileno())
            self.frames.clear()
        if self.energy_records:
            with open(self.dir / "energies.csv", "a") as fh:
                fh.writelines(self.energy_records)
                fh.flush()
                os.fsync(fh.fileno())
            self.energy_records.clear()

    def checkpoint(self) -> None:
        import openmm

        step = self.sim.currentStep
        state = self.sim.context.getState(getPositions=True, getVelocities=True,
                                          getParameters=True, enforcePeriodicBox=False)
        self.flush_outputs()
        write_atomic(self.dir / "checkpoint.xml", openmm.XmlSerializer.serialize(state).encode())
        write_atomic(self.dir / "checkpoint.chk", self.sim.context.createCheckpoint())
        meta = {"step": step, "chk_step": step, "platform": self.platform_name,
                "openmm": openmm.__version__, "time": time.time()}
        write_atomic(self.dir / "checkpoint.json", json.dumps(meta).encode())

    def report(self) -> None:
        import openmm
        from openmm import unit as u

        state = self.sim.context.getState(getEnergy=True)
        if self.dof is None:  # a loop over every particle: once, not every report
            self.dof = self._dof()
        dof = self.dof
        ke = state.getKineticEnergy().value_in_unit(u.kilojoule_per_mole)
        temp = 2 * ke / (dof * openmm.unit.MOLAR_GAS_CONSTANT_R.value_in_unit(
            u.kilojoule_per_mole / u.kelvin)) if dof else 0.0
        box = state.getPeriodicBoxVolume().value_in_unit(u.nanometer ** 3) \
            if self.sim.system.usesPeriodicBoundaryConditions() else 0.0
        pe = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        record = (f"{self.sim.currentStep},{self.sim.currentStep * self.dt_ps:.4f},"
                  f"{pe:.4f},{ke:.4f},{temp:.2f},{box:.6f}\n")
        self.energy_records.append(record)
        if self.o.print_energies:
            print(f"energy {record}", end="", flush=True)

    def _dof(self) -> int:
        import openmm

        system = self.sim.system
        dof = sum(3 for i in range(system.getNumParticles()) if system.getParticleMass(i)._value)
        dof -= system.getNumConstraints()
        if any(isinstance(system.getForce(i), openmm.CMMotionRemover)
               for i in range(system.getNumForces())):
            dof -= 3
        return max(dof, 0)

    def write_progress(self) -> None:
        total_ns = self.o.steps * self.dt_ps / 1000
        done_ns = self.sim.currentStep * self.dt_ps / 1000
        ns_day = self.steps_per_second * self.dt_ps * 86400 / 1000
        write_atomic(self.dir / "progress.json", json.dumps({
            "done": round(done_ns, 6), "total": round(total_ns, 6), "unit": "ns",
            "ns_per_day": round(ns_day, 3)}).encode())

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        self.make_simulation()
        o = self.o
        last_ckpt_step = self.sim.currentStep
        last_ckpt_time = time.monotonic()
        self.write_progress()
        started_step, started = self.sim.currentStep, time.monotonic()
        while self.sim.currentStep < o.steps and not self.stop_requested:
            # Stop at every report and frame boundary so they land on exact multiples.
            step = self.sim.currentStep
            to_report = o.report_steps - step % o.report_steps
            to_frame = o.trajectory_steps - step % o.trajectory_steps \
                if o.trajectory_steps else to_report
            n = min(o.chunk_steps, to_report, to_frame, o.steps - step)
            self.sim.step(n)
            if self.sim.currentStep % o.report_steps == 0:
                self.report()
            if o.trajectory_steps and self.sim.currentStep % o.trajectory_steps == 0:
                self.take_frame()
            elapsed = time.monotonic() - started
            if elapsed > 0:
                self.steps_per_second = (self.sim.currentStep - started_step) / elapsed
            due_steps = o.checkpoint_steps is not None and \
                self.sim.currentStep - last_ckpt_step >= o.checkpoint_steps
            due_time = time.monotonic() - last_ckpt_time >= o.checkpoint_seconds
            if due_steps or due_time:
                self.checkpoint()
                self.write_progress()
                last_ckpt_step, last_ckpt_time = self.sim.currentStep, time.monotonic()
        self.checkpoint()
        self.write_progress()
        if self.stop_requested:
            print(f"SIGTERM: checkpoint written at step {self.sim.currentStep}", flush=True)
            return EXIT_INTERRUPTED
        print(f"finished {o.steps} steps on {self.platform_name} "
              f"({self.steps_per_second:.1f} steps/s)", flush=True)
        return 0

    def _on_term(self, signum: int, frame: object) -> None:
        # Only a flag: the chunked loop checks it, so no reporter is cut mid-write.
        self.stop_requested = True


class _Atoms:
    """What XTCFile asks of a Topology (the atom count and the box), from the System: runs from
    serialized inputs have no Topology."""

    def __init__(self, system: Any) -> None:
        self.n = system.getNumParticles()
        self.box = system.getDefaultPeriodicBoxVectors() \
            if system.usesPeriodicBoundaryConditions() else None

    def getNumAtoms(self) -> int:  # noqa: N802 (OpenMM's name)
        return int(self.n)

    def getPeriodicBoxVectors(self) -> Any:  # noqa: N802
        return self.box


def run(opts: Options) -> int:
    try:
        return Runner(opts).run()
    except RunnerError as exc:
        print(f"relaymd openmm runner: {exc}", file=sys.stderr, flush=True)
        return 2

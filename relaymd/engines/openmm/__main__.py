"""`python -m relaymd.engines.openmm`: run (or resume) an OpenMM simulation to a total length."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relaymd.engines.openmm.runner import Options, run


def parse(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(prog="python -m relaymd.engines.openmm",
                                description="Run an OpenMM simulation restartably.")
    p.add_argument("--system", type=Path, help="serialized System XML")
    p.add_argument("--integrator", type=Path, help="serialized Integrator XML")
    p.add_argument("--state", type=Path, help="serialized initial State XML")
    p.add_argument("--pdb", type=Path, help="a PDB instead of serialized inputs")
    p.add_argument("--forcefield", action="append", default=[],
                   help="force field XML for --pdb (repeatable; default amber14 + TIP3P)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="total steps")
    length.add_argument("--ns", type=float, help="total simulated time in ns")
    p.add_argument("--checkpoint-seconds", type=float, default=600.0,
                   help="checkpoint this often (default 600 s: a GPU does millions of steps in "
                        "that time, so a step count is the wrong clock)")
    p.add_argument("--checkpoint-steps", type=int,
                   help="also checkpoint every N steps (default: by time only)")
    p.add_argument("--report-steps", type=int, default=500,
                   help="an energies.csv record every N steps")
    p.add_argument("--trajectory-steps", type=int, default=0,
                   help="a trajectory.xtc frame every N steps (default 0: no trajectory)")
    p.add_argument("--print-energies", action="store_true",
                   help="echo each energy record to stdout as it is taken (energies.csv gets "
                        "them at each checkpoint)")
    p.add_argument("--platform", default="auto", help="auto (CUDA, OpenCL, CPU) or a name")
    p.add_argument("--threads", type=int, help="CPU platform threads")
    p.add_argument("--workdir", type=Path, default=Path("."))
    a = p.parse_args(argv)
    steps = a.steps
    if steps is None:
        try:
            dt_ps = _step_size_ps(a.integrator)
        except ValueError as exc:
            p.error(str(exc))
        steps = round(a.ns * 1000 / dt_ps)
    if steps <= 0 or (a.checkpoint_steps is not None and a.checkpoint_steps <= 0) \
            or a.report_steps <= 0 or a.checkpoint_seconds <= 0:
        p.error("steps, --checkpoint-steps, --checkpoint-seconds and --report-steps must be "
                "positive")
    if a.trajectory_steps < 0:
        p.error("--trajectory-steps must be 0 (none) or positive")
    return Options(workdir=a.workdir, system=a.system, integrator=a.integrator, state=a.state,
                   pdb=a.pdb, forcefields=a.forcefield, steps=steps,
                   checkpoint_steps=a.checkpoint_steps, checkpoint_seconds=a.checkpoint_seconds,
                   report_steps=a.report_steps, platform=a.platform, threads=a.threads,
                   print_energies=a.print_energies, trajectory_steps=a.trajectory_steps)


def _step_size_ps(integrator: Path | None) -> float:
    if integrator is None:
        return 0.002  # the --pdb path's LangevinMiddle integrator
    import openmm

    try:
        integ = openmm.XmlSerializer.deserialize(integrator.read_text())
        return float(integ.getStepSize().value_in_unit(openmm.unit.picoseconds))
    except (OSError, ValueError, AttributeError, openmm.OpenMMException) as exc:
        raise ValueError(f"--ns needs the step size from --integrator {integrator}: {exc}") from None


if __name__ == "__main__":
    sys.exit(run(parse(sys.argv[1:])))

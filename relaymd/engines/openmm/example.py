"""`relaymd example openmm DIR`: a ready job bundle built only from what the OpenMM wheel ships.

By default villin headpiece in water (`app/data/test.pdb`, 8,867 atoms); with `atoms` a TIP3P
water box of about that many atoms. Amber14 + TIP3P, PME 0.9 nm, HBonds, LangevinMiddle 2 fs at
300 K (NVT: the box never changes), minimised before it is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from relaymd.engines.openmm.runner import CHECKPOINT_FILES, OUTPUT_FILES, write_atomic

WATER_ATOMS_PER_NM3 = 100.2


def build_system(atoms: int | None) -> tuple[object, object, object]:
    import openmm
    from openmm import app
    from openmm import unit as u

    ff = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    if atoms is None:
        pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
        topology, positions = pdb.topology, pdb.positions
    else:
        edge = max((atoms / WATER_ATOMS_PER_NM3) ** (1 / 3), 1.9)  # > 2 x cutoff
        modeller = app.Modeller(app.Topology(), [])
        modeller.addSolvent(ff, model="tip3p", boxSize=openmm.Vec3(edge, edge, edge) * u.nanometer)
        topology, positions = modeller.topology, modeller.positions
    system = ff.createSystem(topology, nonbondedMethod=app.PME,
                             nonbondedCutoff=0.9 * u.nanometer, constraints=app.HBonds)
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond,
                                                 0.002 * u.picoseconds)
    context = openmm.Context(system, openmm.XmlSerializer.clone(integrator),
                             openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, maxIterations=200)
    context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    state = context.getState(getPositions=True, getVelocities=True)
    return system, integrator, state


def write_example(dest: Path, atoms: int | None = None, ns: float = 0.02,
                  checkpoint_seconds: float = 30.0, platform: str = "auto") -> dict[str, object]:
    """Write the bundle into dest (created); returns its relaymd.yaml contents."""
    import openmm

    dest.mkdir(parents=True, exist_ok=True)
    system, integrator, state = build_system(atoms)
    for name, obj in (("system.xml", system), ("integrator.xml", integrator),
                      ("state.xml", state)):
        write_atomic(dest / name, openmm.XmlSerializer.serialize(obj).encode())
    spec: dict[str, object] = {
        "command": (f"python -m relaymd.engines.openmm --system system.xml "
                    f"--integrator integrator.xml --state state.xml --ns {ns:g} "
                    f"--checkpoint-seconds {checkpoint_seconds:g} --report-steps 250 "
                    f"--trajectory-steps 1000 --platform {platform}"),
        # State only: the energy log and the trajectory are outputs, streamed once as they
        # grow and stitched by `relaymd results`, not re-sent whole with every checkpoint.
        "checkpoint": {"paths": CHECKPOINT_FILES, "sentinel": "checkpoint.json",
                       "poll_seconds": 5},
        "outputs": OUTPUT_FILES,
        "progress": "progress.json",
        "resources": {"gpus": 0},  # runs anywhere; uses a GPU when the worker has one
        "max_attempts": 3,
    }
    (dest / "relaymd.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    n_atoms = system.getNumParticles()  # type: ignore[attr-defined]
    (dest / "README.txt").write_text(
        f"RelayMD example: {n_atoms} atoms, {ns:g} ns of NVT MD at 300 K with OpenMM.\n"
        "Submit it with: relaymd submit .\n"
        "When it is done, fetch energies.csv, trajectory.xtc and the final state with:\n"
        "  relaymd results JOB\n")
    return spec

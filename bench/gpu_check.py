"""GPU check: OpenMM's CUDA platform works, and ns/day alone vs under `relaymd worker` on one GPU.

    python bench/gpu_check.py [--platform CUDA] [--systems villin,water] [--water-atoms 100000]
                              [--seconds 66] [--checkpoint-seconds 60] [--calibrate-seconds 3]
                              [--openmm-seconds 4] [--repeat 1] [--threads 0]
                              [--build-platform P] [--poll-seconds 1] [--heartbeat-interval 5]

Made to run in one call on a borrowed GPU machine (bench/README.md gives the call); with
`--platform CPU` and small sizes it is the smoke test tests/test_bench_gpu_smoke.py. First:

  imports      what `relaymd serve`, `relaymd worker` and the engine import, in a child (a wheel
               missing on the GPU machine shows here).
  platform     nvidia-smi's line for each GPU, `python -m openmm.testInstallation` (its output
               as is; the platform asked for must have computed forces), then, in a child
               process, a Context on that platform: OpenMM's plugin load failures, the
               platform's properties (device, precision) and where the CUDA wheels' libraries
               were looked for. Stops here, status 1, when either does not work.

Then, one system after the other (a run cut short keeps the first one's figures):

  build        bench/md_overhead.py's Bench writes the example with
               relaymd.engines.openmm.example: `villin` (villin headpiece in water, 8,867
               atoms) or `water` (a TIP3P box of about --water-atoms atoms), PME, 2 fs. The
               example minimises on the CPU platform; here on --build-platform (default: the
               platform under test), which takes the 100k-atom box from minutes to seconds.
  openmm       in a child process, OpenMM alone (a Context on the platform, integrator steps
               in chunks of at least 0.25 s, nothing else) for --openmm-seconds: what the
               hardware gives without the runner (0: skipped).
  calibrate    the example's real engine command (`python -m relaymd.engines.openmm ...`)
               with an endless --steps, SIGTERMed --calibrate-seconds after its MD loop began
               (progress.json appears): the runner's own steps/s, from which the runs get the
               steps that last about --seconds. It also warms OpenMM's kernel cache, so the
               first measured run does not pay for compiling.
  runs         per repeat, md_overhead's bare run (`sh -c COMMAND`, nothing of relaymd
               running) and worker run (the bundle submitted to a fresh `relaymd serve --port
               0`, run by a real `relaymd worker` that looks for new checkpoint files every
               --poll-seconds, packs, uploads and reports each one, heartbeating every
               --heartbeat-interval), order alternating between repeats. The command is the
               example's with `--steps N --checkpoint-seconds C --checkpoint-steps 1000000000`:
               checkpoints by time only, every 60 s by default (the example leaves the
               runner's default of a checkpoint every 5,000 steps in place, which on a GPU
               would mean one every second or so).

The headline figure is the runner's own ns/day (progress.json's `ns_per_day`: steps over the
wall time of its MD loop, its periodic checkpoint writes included, start-up excluded); a second
one is simulated ns over the engine process's life. The last line is
`RESULT platform=.. villin_openmm_ns_day=.. villin_bare_ns_day=.. villin_worker_ns_day=..
villin_ratio=.. water_... min_ratio=..` (ratio = worker / bare, target >= 0.98). Exit status 1
when the platform does not work or a run failed; a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: bench/ first

from _procs import die_with_parent, terminated  # noqa: E402
from md_overhead import OTHER_LOAD_WARN, TARGET, Bench, Run, mean, tail  # noqa: E402

SYSTEMS = ("villin", "water")
TIME_CHECKPOINTS_ONLY = ("--checkpoint-steps", "1000000000")
EXIT_INTERRUPTED = 75  # the runner's status after SIGTERM (relaymd.engines.openmm.runner)


@dataclass
class System:
    name: str
    bench: Bench
    atoms: int = 0
    openmm_ns_day: float = 0.0  # OpenMM alone (step 3); 0 when skipped
    calib_ns_day: float = 0.0  # the runner, from the calibration run
    runs: list[Run] = field(default_factory=list)

    def of(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind]


# --------------------------------------------------------------------------- child processes
# `python bench/gpu_check.py _probe PLATFORM THREADS` and `... _openmm PLATFORM THREADS SECONDS
# DIR...`: run in a child so that this process never holds a GPU context while it measures.


def platform_properties(platform_name: str, threads: int) -> dict[str, str]:
    return {"Threads": str(threads)} if threads and platform_name == "CPU" else {}


def probe(platform_name: str, threads: int) -> dict[str, object]:
    """A Context on the platform (a small periodic system) and what OpenMM says about it."""
    import openmm
    from openmm import unit as u

    site = Path(openmm.__file__).resolve().parents[1]
    cu13 = site / "nvidia" / "cu13" / "lib"  # the CUDA plugin's RUNPATH (openmm-cuda-13 wheel)
    out: dict[str, object] = {
        "openmm": openmm.__version__,
        "platforms": [openmm.Platform.getPlatform(i).getName()
                      for i in range(openmm.Platform.getNumPlatforms())],
        "plugin_load_failures": list(openmm.Platform.getPluginLoadFailures()),
        "cu13_lib": (f"{cu13}: " + " ".join(sorted(p.name for p in cu13.glob("lib*.so*")))
                     if cu13.is_dir() else f"{cu13}: missing"),
    }
    try:
        platform = openmm.Platform.getPlatformByName(platform_name)
        system = openmm.System()
        system.setDefaultPeriodicBoxVectors(openmm.Vec3(3, 0, 0), openmm.Vec3(0, 3, 0),
                                            openmm.Vec3(0, 0, 3))
        force = openmm.NonbondedForce()
        force.setNonbondedMethod(openmm.NonbondedForce.PME)
        force.setCutoffDistance(0.9)
        positions = []
        for i in range(216):  # a 6x6x6 lattice of argon-like particles, 0.5 nm apart
            system.addParticle(39.9)
            force.addParticle(0.0, 0.34, 0.99)
            positions.append(openmm.Vec3(i % 6, i // 6 % 6, i // 36) * 0.5)
        system.addForce(force)
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform,
                                 platform_properties(platform_name, threads))
        context.setPositions(positions)
        context.getIntegrator().step(10)
        energy = context.getState(getEnergy=True).getPotentialEnergy()
        out["energy_kj_mol"] = round(energy.value_in_unit(u.kilojoule_per_mole), 3)
        out["properties"] = {name: platform.getPropertyValue(context, name)
                             for name in platform.getPropertyNames()}
        del context
    except Exception as exc:  # OpenMMException, or no such platform
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def openmm_alone(platform_name: str, threads: int, seconds: float, dirs: list[str]) -> dict[str, float]:
    """ns/day of OpenMM stepping each example's system with nothing else, for `seconds` each."""
    import openmm

    out: dict[str, float] = {}
    platform = openmm.Platform.getPlatformByName(platform_name)
    for d in map(Path, dirs):
        system, integrator, state = (openmm.XmlSerializer.deserialize((d / f"{name}.xml").read_text())
                                     for name in ("system", "integrator", "state"))
        context = openmm.Context(system, integrator, platform,
                                 platform_properties(platform_name, threads))
        context.setState(state)
        chunk, steps = 10, 0
        integrator.step(chunk)  # warm-up: the first steps pay for kernels and neighbour lists
        context.getState(getPositions=True)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            t = time.monotonic()
            integrator.step(chunk)
            context.getState(getPositions=True)  # waits for the device
            steps += chunk
            if time.monotonic() - t < 0.25:
                chunk *= 2
        dt_ns = integrator.getStepSize().value_in_unit(openmm.unit.nanoseconds)
        out[str(d)] = steps * dt_ns / elapsed * 86400
        del context, integrator
    return out


def child(args: list[str], timeout: float) -> dict[str, object]:
    """Run one of the modes above in a child process; its last stdout line is the JSON answer."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=die_with_parent)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"{args[0]} child exited with {proc.returncode}: "
                           + " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])) from None


# --------------------------------------------------------------------------- steps 1-4


IMPORTS = ("relaymd.cli", "relaymd.server.orchestrator", "relaymd.worker.main",
           "relaymd.engines.openmm.runner", "uvicorn", "uvloop", "httptools",
           "boto3", "openmm")


def check_imports(args: argparse.Namespace) -> bool:
    """What `relaymd serve`, `relaymd worker` and the engine import, in a child: a wheel missing
    on the GPU machine shows here, before anything is built."""
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    try: importlib.import_module(m)\n"
            "    except Exception as e: print(f'{m}: {type(e).__name__}: {e}')")
    proc = subprocess.run([sys.executable, "-c", code, *IMPORTS], capture_output=True, text=True,
                          timeout=args.timeout)
    failed = (proc.stdout + proc.stderr).strip()
    print(f"imports: {'FAILED: ' + failed if failed or proc.returncode else 'ok'} ({', '.join(IMPORTS)})",
          flush=True)
    return not failed and proc.returncode == 0


def check_platform(args: argparse.Namespace) -> str | None:
    """Step 1; returns the device as OpenMM names it (or None: the platform does not work)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
        for line in (q.stdout.strip() or q.stderr.strip() or "(no output)").splitlines():
            print(f"nvidia-smi: {line}")
    else:
        print("nvidia-smi: not found")
    t0 = time.monotonic()
    test = subprocess.run([sys.executable, "-m", "openmm.testInstallation"], capture_output=True,
                          text=True, timeout=args.timeout, preexec_fn=die_with_parent)
    print(f"--- python -m openmm.testInstallation (exit {test.returncode}, "
          f"{time.monotonic() - t0:.0f}s)")
    print("\n".join(ln for ln in (test.stdout + test.stderr).splitlines() if ln.strip()))
    print("---")
    computed = any(ln.split()[1:2] == [args.platform] and "Successfully computed forces" in ln
                   for ln in test.stdout.splitlines() if ln[:1].isdigit())
    t0 = time.monotonic()
    found = child(["_probe", args.platform, str(args.threads)], args.timeout)
    print(f"OpenMM {found['openmm']}: platforms {', '.join(found['platforms'])}")  # type: ignore[arg-type]
    for failure in found["plugin_load_failures"]:  # type: ignore[attr-defined]
        print(f"  plugin load failure: {failure}")
    print(f"  CUDA wheels' libraries: {found['cu13_lib']}")
    if "error" in found:
        print(f"{args.platform} Context: FAILED: {found['error']}")
    else:
        listed = ", ".join(f"{k}={v}" for k, v in found["properties"].items())  # type: ignore[attr-defined]
        print(f"{args.platform} Context: created in {time.monotonic() - t0:.1f}s (child process), "
              f"energy {found['energy_kj_mol']} kJ/mol; {listed}")
    ok = computed and "error" not in found
    print(f"platform {args.platform}: {'works' if ok else 'NOT WORKING'} (testInstallation "
          f"{'computed forces' if computed else 'did not compute forces'} with it)", flush=True)
    if not ok:
        return None
    props: dict[str, str] = found["properties"]  # type: ignore[assignment]
    return ", ".join(f"{k} {props[k]}" for k in ("DeviceName", "Precision", "Threads") if k in props)


def calibrate(s: System, args: argparse.Namespace) -> float:
    """The runner's steps/s: the real engine command, SIGTERMed after --calibrate-seconds of MD."""
    b = s.bench
    b.set_steps(10**9, TIME_CHECKPOINTS_ONLY, pack=False)
    work = b.home / "calibrate"
    shutil.copytree(b.example, work)
    t0 = time.monotonic()
    with (b.home / "calibrate.log").open("wb") as log:
        proc = subprocess.Popen(["/bin/sh", "-c", "exec " + b.command], cwd=work, env=b.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)
    b.procs.append(proc)
    b.groups.add(proc.pid)
    deadline = t0 + args.timeout
    while not (work / "progress.json").exists():  # written just before the MD loop
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{s.name} calibration: the engine did not start its MD loop "
                               f"(exit {proc.poll()}): " + tail(b.home / "calibrate.log"))
        time.sleep(0.05)
    startup = time.monotonic() - t0
    time.sleep(args.calibrate_seconds)
    proc.send_signal(signal.SIGTERM)  # the runner (exec'd by sh) checkpoints and exits 75
    try:
        code = proc.wait(args.timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{s.name} calibration: the engine ignored SIGTERM") from None
    if code != EXIT_INTERRUPTED:
        raise RuntimeError(f"{s.name} calibration: engine exited with {code}: "
                           + tail(b.home / "calibrate.log"))
    progress = json.loads((work / "progress.json").read_text())
    step = int(json.loads((work / "checkpoint.json").read_text())["step"])
    s.calib_ns_day = float(progress["ns_per_day"])
    shutil.rmtree(work, ignore_errors=True)
    if step <= 0 or s.calib_ns_day <= 0:
        raise RuntimeError(f"{s.name} calibration: no steps in {args.calibrate_seconds:g}s")
    steps_per_s = s.calib_ns_day / 86400 / (float(progress["done"]) / step)
    print(f"  {s.name}: calibration, runner {s.calib_ns_day:.3f} ns/day ({steps_per_s:.1f} "
          f"steps/s, {step} steps in {args.calibrate_seconds:g}s; start-up {startup:.1f}s)",
          flush=True)
    return steps_per_s


@contextlib.contextmanager
def minimising_on(platform_name: str) -> Iterator[None]:
    """relaymd.engines.openmm.example.build_system minimises on the CPU platform: ~1,400 force
    evaluations for 200 iterations, 330 s for a 100k-atom box on the 2-core development machine.
    Inside this block its "CPU" means platform_name (the example stays what it is, minimised)."""
    import openmm

    if platform_name == "CPU":
        yield
        return
    raw = openmm.Platform.__dict__["getPlatformByName"]
    real = openmm.Platform.getPlatformByName

    def chosen(name: str) -> object:
        return real(platform_name if name == "CPU" else name)

    openmm.Platform.getPlatformByName = staticmethod(chosen)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        openmm.Platform.getPlatformByName = raw  # type: ignore[method-assign]


def measure(s: System, args: argparse.Namespace) -> None:
    """Steps 2-5 for one system."""
    t0 = time.monotonic()
    with minimising_on(args.build_platform or args.platform):
        s.atoms = s.bench.write_example()
    print(f"{s.name}: {s.atoms} atoms, built in {time.monotonic() - t0:.0f}s (minimised on "
          f"{args.build_platform or args.platform})", flush=True)
    if args.openmm_seconds > 0:
        t0 = time.monotonic()
        alone = child(["_openmm", args.platform, str(args.threads), str(args.openmm_seconds),
                       str(s.bench.example)], args.timeout)
        s.openmm_ns_day = float(alone[str(s.bench.example)])  # type: ignore[arg-type]
        print(f"  {s.name}: OpenMM alone {s.openmm_ns_day:.3f} ns/day "
              f"({time.monotonic() - t0:.0f}s with start-up)", flush=True)
    steps = max(10, round(calibrate(s, args) * args.seconds, -1))
    s.bench.set_steps(int(steps), TIME_CHECKPOINTS_ONLY)
    print(f"  {s.name} engine: {s.bench.command}", flush=True)
    for r in range(1, args.repeat + 1):
        for kind in (("bare", "worker") if r % 2 else ("worker", "bare")):
            result = s.bench.run_bare(r) if kind == "bare" else s.bench.run_worker(r)
            s.runs.append(result)
            print(f"  {s.name} repeat {r} {kind:<6}: runner {result.runner_ns_day:.3f} ns/day, "
                  f"process {result.process_ns_day:.3f} ns/day ({result.step} steps, "
                  f"{result.wall_s:.1f}s, engine {result.engine_cpu_s:.1f}s CPU) on "
                  f"{result.platform}; {result.load}"
                  + "".join(f"; {n}" for n in result.notes), flush=True)
            if result.platform != args.platform:
                raise RuntimeError(f"{s.name} {kind} run used {result.platform}, "
                                   f"not {args.platform}")
    b = mean([r.runner_ns_day for r in s.of("bare")])
    w = mean([r.runner_ns_day for r in s.of("worker")])
    print(f"  {s.name}: bare {b:.3f} ns/day, worker {w:.3f} ns/day, ratio {w / b:.3f}", flush=True)


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, argv: list[str], systems: list[System]) -> int:
    import openmm

    started = time.monotonic()
    print("command: " + shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                                    *argv]))
    print(f"python {sys.version.split()[0]}, OpenMM {openmm.__version__}, "
          f"{len(os.sched_getaffinity(0))} CPUs", flush=True)
    device = check_platform(args) if check_imports(args) else None
    if device is None:
        return 1

    print(f"runs of about {args.seconds:g}s, checkpoint every {args.checkpoint_seconds:g}s; "
          f"worker: checkpoint watch every {args.poll_seconds:g}s, heartbeat every "
          f"{args.heartbeat_interval:g}s", flush=True)
    for s in systems:  # one system after the other: a run cut short still has the first's figures
        measure(s, args)
    return report(args, device, systems, time.monotonic() - started)


def report(args: argparse.Namespace, device: str, systems: list[System], elapsed: float) -> int:
    print()
    print(f"platform {args.platform} ({device}), checkpoint every {args.checkpoint_seconds:g}s, "
          f"{args.repeat} repeat(s), ns/day (means over repeats)")
    head = (f"{'system':<8} {'atoms':>7} {'steps':>9} {'openmm':>10} {'bare':>10} {'worker':>10} "
            f"{'ratio':>6} {'proc ratio':>10} {'uploads':>7} {'worker CPU':>10}")
    print(head)
    fields = [f"platform={args.platform}"]
    ratios = []
    for s in systems:
        bare, worker = s.of("bare"), s.of("worker")
        b, w = mean([r.runner_ns_day for r in bare]), mean([r.runner_ns_day for r in worker])
        bp, wp = mean([r.process_ns_day for r in bare]), mean([r.process_ns_day for r in worker])
        ratio, proc_ratio = w / b, wp / bp
        ratios.append(ratio)
        uploads = mean([float(r.uploads) for r in worker])
        cpu = mean([r.worker_cpu_s + r.server_cpu_s for r in worker])
        print(f"{s.name:<8} {s.atoms:>7} {s.bench.steps:>9} {s.openmm_ns_day:>10.3f} {b:>10.3f} "
              f"{w:>10.3f} {ratio:>6.3f} {proc_ratio:>10.3f} {uploads:>7.1f} {cpu:>9.2f}s")
        fields += [f"{s.name}_openmm_ns_day={s.openmm_ns_day:.3f}", f"{s.name}_bare_ns_day={b:.3f}",
                   f"{s.name}_worker_ns_day={w:.3f}", f"{s.name}_ratio={ratio:.3f}"]
    print("(openmm: OpenMM alone, no runner; bare/worker: the runner's own ns/day; proc ratio: "
          "over the engine process's life; worker CPU: worker + orchestrator while the engine ran)")
    other = max((r.load.other / r.load.window for s in systems for r in s.runs if r.load),
                default=0.0)
    if other > OTHER_LOAD_WARN:
        print(f"WARNING: other processes used up to {other:.0%} of a core during a run: the "
              f"figures measure them too; run again on a quiet machine")
    low = min(ratios)
    print(f"target ratio >= {TARGET}: {'met' if low >= TARGET else 'MISSED'} (lowest {low:.3f}); "
          f"finished in {elapsed:.0f}s")
    print("RESULT " + " ".join([*fields, f"min_ratio={low:.3f}"]))
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", default="CUDA", help="OpenMM platform (default CUDA)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated, of {', '.join(SYSTEMS)} (default both)")
    p.add_argument("--water-atoms", type=int, default=100_000,
                   help="the water box's size, about (default 100000)")
    p.add_argument("--seconds", type=float, default=66.0,
                   help="length of each measured run, sized from the calibration (default 66)")
    p.add_argument("--checkpoint-seconds", type=float, default=60.0,
                   help="the runner writes (and the worker uploads) a checkpoint this often")
    p.add_argument("--calibrate-seconds", type=float, default=3.0,
                   help="MD seconds of the calibration run per system (default 3)")
    p.add_argument("--openmm-seconds", type=float, default=4.0,
                   help="seconds of OpenMM alone per system (default 4; 0: skip)")
    p.add_argument("--build-platform",
                   help="where the examples are minimised (default: --platform; the example's "
                        "own builder uses CPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU platform threads (default 0: OpenMM's default)")
    p.add_argument("--poll-seconds", type=float, default=1.0,
                   help="the worker looks for a new checkpoint this often (default 1)")
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=1, help="bare + worker pairs (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="limit per run and step, s")
    p.add_argument("--home-parent", help="where the temporary directories go")
    p.add_argument("--keep-home", action="store_true", help="keep logs and storage for a look")
    args = p.parse_args(argv)
    args.systems = [n.strip() for n in args.systems.split(",") if n.strip()]
    if not args.systems or set(args.systems) - set(SYSTEMS) or len(set(args.systems)) < len(args.systems):
        p.error(f"--systems: a comma-separated list of {', '.join(SYSTEMS)}")
    if min(args.seconds, args.checkpoint_seconds, args.calibrate_seconds, args.poll_seconds,
           args.heartbeat_interval, args.repeat, args.water_atoms) <= 0 or args.threads < 0 \
            or args.openmm_seconds < 0:
        p.error("sizes, counts and durations must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_probe"]:
        print(json.dumps(probe(argv[1], int(argv[2]))))
        return 0
    if argv[:1] == ["_openmm"]:
        print(json.dumps(openmm_alone(argv[1], int(argv[2]), float(argv[3]), argv[4:])))
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    systems: list[System] = []
    try:
        for name in args.systems:
            ns = argparse.Namespace(**vars(args), atoms=None if name == "villin" else args.water_atoms)
            systems.append(System(name, Bench(ns, prefix=f"relaymd-gpu-check-{name}-")))
        return run(args, argv, systems)
    except Exception as exc:  # any failure: a message and exit status 1, never a traceback
        print(f"gpu_check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        for s in systems:
            s.bench.close()


if __name__ == "__main__":
    sys.exit(main())

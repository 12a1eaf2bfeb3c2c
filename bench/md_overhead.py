"""MD overhead benchmark: ns/day of the OpenMM runner alone vs the same run under `relaymd worker`.

    python bench/md_overhead.py [--atoms N] [--steps 1500] [--platform auto] [--threads T]
                                [--checkpoint-seconds 10] [--poll-seconds 1]
                                [--heartbeat-interval 5] [--repeat 2]

It builds the OpenMM example once (`relaymd.engines.openmm.example.write_example`: villin in
water, 8,867 atoms, or with --atoms a TIP3P water box of about N atoms) and turns its command
into a fixed-length run: `python -m relaymd.engines.openmm ... --steps S --checkpoint-seconds C
--threads T`. Every repeat then runs that same command twice (the order alternates between
repeats, so a drift of the machine's speed does not favour either):

  bare    `/bin/sh -c COMMAND` in a copy of the example directory, in its own session, with
          nothing else of relaymd running;
  worker  the directory packed as a bundle and submitted to a fresh `relaymd serve --port 0`
          (temporary RELAYMD_HOME, no local provider, heartbeat every --heartbeat-interval s),
          run by a real `relaymd worker` (immediate_exit) that watches the checkpoint files every
          --poll-seconds s and packs (tar.gz), uploads and reports each checkpoint the runner
          writes (every C s) while heartbeating with progress.

Both runs are measured the same two ways:

  runner ns/day   the runner's own figure, `ns_per_day` in the progress.json of its final state
                  (for the worker run: read from the last checkpoint it uploaded): steps done
                  over the wall time of the MD loop, periodic checkpoint writes included,
                  process start, input reading and Context creation excluded. This is the
                  headline figure and the one in the RESULT line.
  process ns/day  simulated ns over the engine process's whole life (its start time from /proc
                  to its exit, polled every 0.2 s): adds start-up and the last checkpoint.

Nothing is pinned: the engine's threads, the worker and the orchestrator share the machine's
cores, which is the competition being measured. The last line is `RESULT bare_ns_day=..
worker_ns_day=.. ratio=..` (means over the repeats; ratio = worker / bare; target >= 0.98); the
exit status is 1 when a run failed (engine error, job not completed, steps or platform differ).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _procs import die_with_parent, machine_cpu, own_cpu, signal_group, terminated  # noqa: E402

from relaymd.client import Client  # noqa: E402
from relaymd.models import JobCreate  # noqa: E402
from relaymd.storage import open_storage  # noqa: E402
from relaymd.storage.bundle import pack_directory  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_S = 0.2  # how often process starts and exits are looked for
TARGET = 0.98
OTHER_LOAD_WARN = 0.05  # other processes' CPU, in cores, above which the figures are suspect


def now() -> float:
    """The clock /proc's process start times count on (seconds since boot)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)






# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Stat:
    state: str
    cpu_s: float  # own user + system time
    children_cpu_s: float  # user + system time of the children it has reaped
    started: float  # seconds since boot

    @property
    def ended(self) -> bool:
        return self.state in ("Z", "X")


def proc_stat(pid: int) -> Stat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2:].split()  # f[0] is field 3 (state) of proc(5)
    return Stat(f[0], (int(f[11]) + int(f[12])) / CLK_TCK, (int(f[13]) + int(f[14])) / CLK_TCK,
                int(f[19]) / CLK_TCK)


class Load:
    """CPU used on the machine while an engine runs, less what the benchmark's own processes
    used: the load nobody here controls (another user's tests, say), which skews the timings."""

    def __init__(self) -> None:
        self.busy0, self.steal0 = machine_cpu()
        self.own0 = own_cpu()
        self.t0 = now()
        self.busy1, self.steal1, self.own1 = self.busy0, self.steal0, self.own0
        self.other = self.steal = 0.0
        self.window = 1e-9

    def mark(self) -> None:
        """The end of the window (the engine has exited)."""
        self.busy1, self.steal1 = machine_cpu()
        self.own1 = own_cpu()
        self.window = max(now() - self.t0, 1e-9)

    def settle(self, ours: float) -> None:
        """ours: CPU seconds of the engine, worker and orchestrator in the window."""
        self.other = max(self.busy1 - self.busy0 - ours - (self.own1 - self.own0), 0.0)
        self.steal = self.steal1 - self.steal0

    def __str__(self) -> str:
        return (f"other load {self.other:.1f} CPU-s ({self.other / self.window:.0%} of a core), "
                f"steal {self.steal:.1f}s, this script {self.own1 - self.own0:.2f}s CPU")


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- measurements


@dataclass
class Run:
    kind: str  # "bare" or "worker"
    repeat: int
    runner_ns_day: float = 0.0
    wall_s: float = 0.0  # engine process life
    ns: float = 0.0  # simulated
    step: int = 0
    platform: str = ""
    engine_cpu_s: float = 0.0
    worker_cpu_s: float = 0.0  # worker runs: the worker's and the orchestrator's CPU while the
    server_cpu_s: float = 0.0  # engine ran
    uploads: int = 0  # worker runs: checkpoints uploaded
    load: Load | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def process_ns_day(self) -> float:
        return self.ns / self.wall_s * 86400 if self.wall_s > 0 else 0.0


def read_final_state(files: dict[str, bytes], run: Run, steps: int) -> None:
    """Fill run from the runner's final progress.json and checkpoint.json."""
    try:
        progress = json.loads(files["progress.json"])
        meta = json.loads(files["checkpoint.json"])
        run.runner_ns_day = float(progress["ns_per_day"])
        run.ns = float(progress["done"])
        run.step = int(meta["step"])
        run.platform = str(meta["platform"])
    except (KeyError, ValueError, TypeError) as exc:
        raise RuntimeError(f"{run.kind} run: unreadable final progress/checkpoint: {exc}") from None
    if run.step != steps:
        raise RuntimeError(f"{run.kind} run ended at step {run.step}, not {steps}")


class Bench:
    """The example, the bare runs and the orchestrator + worker runs; `close()` ends them all."""

    def __init__(self, args: argparse.Namespace, prefix: str = "relaymd-md-overhead-") -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix=prefix, dir=args.home_parent))
        self.example = self.home / "example"
        self.bundle = self.home / "bundle.tar.gz"
        self.spec: dict[str, Any] = {}  # the example's relaymd.yaml as written
        self.command = ""
        self.steps = 0  # the length of every run (set_steps)
        self.server: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.groups: set[int] = set()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("RELAYMD_") and k != "SLURM_JOB_ID"}
        bindir = os.path.dirname(sys.executable)  # as the worker does: this python first on PATH
        self.env["PATH"] = bindir + os.pathsep + self.env.get("PATH", "")
        self.env.update(RELAYMD_HOME=str(self.home / "relaymd"),
                        XDG_CONFIG_HOME=str(self.home / "config"))

    # ------------------------------------------------------------------ setup

    def build(self) -> int:
        """Write the example and its bundle for runs of --steps steps; returns the atom count."""
        atoms = self.write_example()
        self.set_steps(self.args.steps)
        return atoms

    def write_example(self) -> int:
        """Write the example (--atoms, --checkpoint-seconds, --platform); returns the atom count."""
        import openmm

        from relaymd.engines.openmm.example import write_example

        a = self.args
        self.spec = write_example(self.example, atoms=a.atoms,
                                  checkpoint_seconds=a.checkpoint_seconds, platform=a.platform)
        system = openmm.XmlSerializer.deserialize((self.example / "system.xml").read_text())
        return int(system.getNumParticles())

    def set_steps(self, steps: int, engine_args: tuple[str, ...] = (), pack: bool = True) -> None:
        """Make the example's command a run of `steps` steps (plus --threads and engine_args),
        write it into relaymd.yaml with the worker's --poll-seconds, and pack the bundle."""
        import yaml

        a = self.args
        command, n = re.subn(r"--ns \S+", f"--steps {steps}", str(self.spec["command"]))
        if n != 1 or "--threads" in command:
            raise RuntimeError(f"unexpected example command: {self.spec['command']}")
        if a.threads:
            command += f" --threads {a.threads}"
        if engine_args:
            command += " " + shlex.join(engine_args)
        self.command, self.steps = command, steps
        checkpoint = {**self.spec["checkpoint"], "poll_seconds": a.poll_seconds}
        spec = {**self.spec, "command": command, "checkpoint": checkpoint}
        (self.example / "relaymd.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        if pack:
            pack_directory(self.example, self.bundle)

    # ------------------------------------------------------------------ bare

    def run_bare(self, repeat: int) -> Run:
        run = Run("bare", repeat)
        work = self.home / f"bare-{repeat}"
        shutil.copytree(self.example, work)
        with (self.home / f"bare-{repeat}.log").open("wb") as log:
            proc = subprocess.Popen(["/bin/sh", "-c", self.command], cwd=work, env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=die_with_parent)
        self.procs.append(proc)
        self.groups.add(proc.pid)
        started = proc_stat(proc.pid)
        run.load = load = Load()
        deadline = time.monotonic() + self.args.timeout
        while True:  # the same exit detection as for the worker's engine
            st = proc_stat(proc.pid)
            if st is None or st.ended:
                ended = now()
                load.mark()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bare run still going after {self.args.timeout:.0f}s")
            time.sleep(POLL_S)
        if started is None or st is None:
            raise RuntimeError("bare run: the engine vanished before it could be measured")
        run.wall_s = ended - started.started
        run.engine_cpu_s = st.cpu_s + st.children_cpu_s  # sh and the python under it
        load.settle(run.engine_cpu_s)
        code = proc.wait()
        if code != 0:
            raise RuntimeError(f"bare run exited with {code}: " + tail(self.home / f"bare-{repeat}.log"))
        read_final_state({name: (work / name).read_bytes()
                          for name in ("progress.json", "checkpoint.json")}, run, self.steps)
        shutil.rmtree(work, ignore_errors=True)
        return run

    # ------------------------------------------------------------------ worker

    def start_server(self, timeout: float = 60.0) -> tuple[str, dict[str, str]]:
        hb = self.args.heartbeat_interval
        env = {**self.env, "RELAYMD_HEARTBEAT_INTERVAL": str(hb),
               "RELAYMD_HEARTBEAT_TIMEOUT": str(max(3 * hb, 45.0)), "RELAYMD_LOCAL_WORKERS": "0"}
        home = Path(env["RELAYMD_HOME"])
        home.mkdir(exist_ok=True)
        (home / "orchestrator.json").unlink(missing_ok=True)  # a previous run's
        with (self.home / "serve.out").open("ab") as log:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "relaymd", "serve", "--host", "127.0.0.1", "--port", "0"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"relaymd serve exited with {self.server.returncode}: "
                                   + tail(self.home / "serve.out"))
            try:
                url = json.loads((home / "orchestrator.json").read_text())["url"]
                return url, json.loads((home / "tokens.json").read_text())
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"relaymd serve did not come up in {timeout:.0f}s")
            time.sleep(0.05)

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None

    def run_worker(self, repeat: int) -> Run:
        run = Run("worker", repeat)
        url, tokens = self.start_server()
        try:
            with Client(url, tokens["operator"]) as op:
                job_id = uuid.uuid4().hex
                op.upload_bundle(job_id, self.bundle)
                op.create_job(JobCreate(id=job_id, title=f"md_overhead {repeat}"))
                self.watch_worker(run, url, repeat)
                d = op.get_job(job_id)
            if d.status != "completed" or d.attempt != 1 or d.failures:
                raise RuntimeError(f"worker run: job {d.status} after {d.attempt} attempt(s), "
                                   f"{d.failures} failure(s); worker log: "
                                   + tail(self.home / f"worker-{repeat}.log"))
            info = next(c for c in d.checkpoint_list if c.seq == d.latest_checkpoint)
            dest = self.home / "final.tar.gz"
            storage = open_storage(f"file://{self.home / 'relaymd' / 'storage'}")
            storage.get_file(info.key, dest, expected_sha256=info.sha256)
            files: dict[str, bytes] = {}
            with tarfile.open(dest) as tar:
                for name in ("progress.json", "checkpoint.json"):
                    member = tar.extractfile(name)
                    if member is not None:
                        files[name] = member.read()
            read_final_state(files, run, self.steps)
            # progress.json changes only when the runner writes a checkpoint: sets with the same
            # progress are re-sends of an unchanged state
            distinct = len({c.progress.done for c in d.checkpoint_list if c.progress})
            run.uploads = len(d.checkpoint_list)
            run.notes.append(f"checkpoints uploaded: {len(d.checkpoint_list)} ({distinct} distinct)")
        finally:
            self.stop_server()
        return run

    def watch_worker(self, run: Run, url: str, repeat: int) -> None:
        """Start the worker; time its engine (start from /proc, exit polled) until it exits."""
        env = {**self.env, "RELAYMD_URL": url,
               "RELAYMD_WORKER_WORKDIR": str(self.home / f"work-{repeat}"),
               "RELAYMD_WORKER_IDLE": "immediate_exit"}
        log_path = self.home / f"worker-{repeat}.log"
        with log_path.open("wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "relaymd", "worker"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.procs.append(worker)
        assert self.server is not None
        engine: int | None = None
        engine_start = engine_end = 0.0
        cpu_at_start: tuple[float, float] = (0.0, 0.0)
        cpu_at_end: tuple[float, float] = (0.0, 0.0)
        deadline = time.monotonic() + self.args.timeout
        while True:
            st = proc_stat(worker.pid)
            srv = proc_stat(self.server.pid)
            if engine is None and st is not None and not st.ended:
                for pid in children(worker.pid):
                    if "relaymd.engines.openmm" in cmdline(pid) and (est := proc_stat(pid)):
                        engine, engine_start = pid, est.started
                        self.groups.add(pid)  # its own session: the group to kill on cleanup
                        cpu_at_start = (st.cpu_s, srv.cpu_s if srv else 0.0)
                        run.load = Load()
                        break
            elif engine is not None and not engine_end:
                est = proc_stat(engine)
                if est is None or est.ended:
                    engine_end = now()
                    assert run.load is not None
                    run.load.mark()
                    if st is not None:
                        cpu_at_end = (st.cpu_s, srv.cpu_s if srv else 0.0)
            if st is None or st.ended:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker run still going after {self.args.timeout:.0f}s")
            time.sleep(POLL_S)
        code = worker.wait()
        if engine is None or not engine_end:
            raise RuntimeError(f"worker (exit {code}) ran no engine that could be timed: "
                               + tail(log_path))
        run.wall_s = engine_end - engine_start
        run.engine_cpu_s = st.children_cpu_s if st else 0.0  # what the worker reaped: the engine
        worker_cpu, server_cpu = (cpu_at_end[0] - cpu_at_start[0], cpu_at_end[1] - cpu_at_start[1])
        run.worker_cpu_s, run.server_cpu_s = worker_cpu, server_cpu
        assert run.load is not None
        run.load.settle(run.engine_cpu_s + worker_cpu + server_cpu)
        run.notes.append(f"while the engine ran: worker {worker_cpu:.2f} s CPU, "
                         f"orchestrator {server_cpu:.2f} s CPU")

    # ------------------------------------------------------------------ cleanup

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for group in self.groups:
            signal_group(group, signal.SIGKILL)
        self.stop_server()
        if not self.args.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else 0.0


def run(args: argparse.Namespace, argv: list[str], bench: Bench) -> int:
    import openmm

    print("command: " + shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                                    *argv]))
    t0 = time.monotonic()
    atoms = bench.build()
    print(f"system: {atoms} atoms ({'villin in water' if args.atoms is None else 'water box'}), "
          f"built in {time.monotonic() - t0:.0f}s; OpenMM {openmm.__version__}, "
          f"{len(os.sched_getaffinity(0))} CPUs")
    print(f"engine: {bench.command}")
    print(f"worker: checkpoint watch every {args.poll_seconds:g}s, heartbeat every "
          f"{args.heartbeat_interval:g}s; home {bench.home}", flush=True)
    runs: list[Run] = []
    for r in range(1, args.repeat + 1):
        order = ("bare", "worker") if r % 2 else ("worker", "bare")
        for kind in order:
            result = bench.run_bare(r) if kind == "bare" else bench.run_worker(r)
            runs.append(result)
            print(f"  repeat {r} {kind:<6}: runner {result.runner_ns_day:.3f} ns/day, process "
                  f"{result.process_ns_day:.3f} ns/day ({result.wall_s:.1f}s, engine "
                  f"{result.engine_cpu_s:.1f}s CPU) on {result.platform}; {result.load}"
                  + "".join(f"; {n}" for n in result.notes), flush=True)
    platforms = {r.platform for r in runs}
    if len(platforms) != 1:
        raise RuntimeError(f"the runs used different platforms: {sorted(platforms)}")
    bare = [r for r in runs if r.kind == "bare"]
    worker = [r for r in runs if r.kind == "worker"]
    b_runner, w_runner = mean([r.runner_ns_day for r in bare]), mean([r.runner_ns_day for r in worker])
    b_proc, w_proc = mean([r.process_ns_day for r in bare]), mean([r.process_ns_day for r in worker])
    ratio, ratio_proc = w_runner / b_runner, w_proc / b_proc

    print()
    print(f"platform {platforms.pop()} (asked: {args.platform}), threads "
          f"{args.threads or 'default'}, {args.steps} steps, checkpoint every "
          f"{args.checkpoint_seconds:g}s, {args.repeat} repeat(s)")
    print(f"{'ns/day (mean)':<16} {'bare':>9} {'worker':>9} {'ratio':>7}")
    print(f"{'runner':<16} {b_runner:>9.3f} {w_runner:>9.3f} {ratio:>7.3f}")
    print(f"{'process':<16} {b_proc:>9.3f} {w_proc:>9.3f} {ratio_proc:>7.3f}")
    se = ""
    if len(bare) > 1:
        b_all, w_all = [r.runner_ns_day for r in bare], [r.runner_ns_day for r in worker]
        spread = [max(x) / min(x) - 1 for x in (b_all, w_all)]
        # standard error of the ratio of the means, from the scatter between repeats
        rel = ((statistics.stdev(b_all) / b_runner) ** 2 / len(b_all)
               + (statistics.stdev(w_all) / w_runner) ** 2 / len(w_all)) ** 0.5
        se = f" +- {ratio * rel:.3f} (1 standard error)"
        print(f"spread between repeats (runner, max/min - 1): bare {spread[0]:.1%}, "
              f"worker {spread[1]:.1%}")
    other = max(r.load.other / r.load.window for r in runs if r.load)
    if other > OTHER_LOAD_WARN:
        print(f"WARNING: other processes used up to {other:.0%} of a core during a run: the "
              f"figures measure them too; run again on a quiet machine")
    print(f"target ratio >= {TARGET}: {'met' if ratio >= TARGET else 'MISSED'} ({ratio:.3f}{se})")
    print(f"RESULT bare_ns_day={b_runner:.3f} worker_ns_day={w_runner:.3f} ratio={ratio:.3f}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atoms", type=int, help="a water box of about N atoms instead of villin")
    p.add_argument("--steps", type=int, default=1500, help="MD steps per run (default 1500)")
    p.add_argument("--platform", default="auto", help="OpenMM platform (default auto)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPU platform threads for both runs (default: every CPU; 0: OpenMM's "
                        "default)")
    p.add_argument("--checkpoint-seconds", type=float, default=10.0,
                   help="the runner writes (and the worker uploads) a checkpoint this often")
    p.add_argument("--poll-seconds", type=float, default=1.0,
                   help="the worker looks for a new checkpoint this often")
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=2, help="bare + worker pairs (default 2)")
    p.add_argument("--timeout", type=float, default=3600.0, help="limit per run, s")
    p.add_argument("--home-parent", help="where the temporary directory goes")
    p.add_argument("--keep-home", action="store_true", help="keep logs and storage for a look")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeat < 1 or args.threads < 0 or args.checkpoint_seconds <= 0 \
            or args.poll_seconds <= 0 or args.heartbeat_interval <= 0:
        p.error("--steps, --repeat, --checkpoint-seconds, --poll-seconds and --heartbeat-interval "
                "must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    bench = Bench(args)
    try:
        return run(args, argv, bench)
    except Exception as exc:  # any failure: a message and exit status 1, never a traceback
        print(f"md_overhead benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())

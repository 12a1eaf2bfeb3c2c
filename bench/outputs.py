"""Output streaming benchmark: bytes uploaded per hour for a job with a growing trajectory, with
the trajectory in the checkpoint set (the old way) and as an `outputs:` entry (streamed once).

    python bench/outputs.py [--minutes 2] [--frame-kb 400] [--frame-seconds 1]
                            [--state-kb 2048] [--checkpoint-seconds 10] [--poll-seconds 1]

A synthetic engine stands in for a 100k-atom MD run on a GPU: it appends a --frame-kb frame
(about an XTC frame of 100k atoms) to traj.bin every --frame-seconds, and every
--checkpoint-seconds writes its state (state.bin, --state-kb of fresh bytes: about a
checkpoint.chk of that system) and then state.json (the sentinel); frames are held in memory and
appended just before each checkpoint, as the OpenMM runner does. Each mode runs the same engine
under a fresh `relaymd serve --port 0` (temporary RELAYMD_HOME, file:// storage) and one real
`relaymd worker` for --minutes, then hands the job back with SIGTERM:

  before  checkpoint.paths = [state.bin, state.json, traj.bin]: every checkpoint re-sends the
          whole trajectory so far (tar.gz; the frames are random bytes, as compressed
          coordinates are, so gzip cannot shrink them);
  after   checkpoint.paths = [state.bin, state.json], outputs = [traj.bin]: each checkpoint
          sends the state and only the frames added since the last one.

Bytes uploaded are counted by watching the job's checkpoints/ and outputs/ in the storage
directory every 0.1 s and summing the sizes of every object version seen (a path with a new
mtime counts again: the outputs index is rewritten at each checkpoint; pruned checkpoints are
seen too, as each lives until the next is accepted); per hour = scaled from the run's length.
The worker's CPU is its own process's (not the engine's), from /proc, over the run, divided by
the checkpoints accepted.
Since re-sending grows with the trajectory, it also projects a whole hour of the job from the
measured rates. The last line is `RESULT before_mb_h=.. after_mb_h=.. ratio=.. hour_before_gb=..
hour_after_gb=.. before_cpu_ms=.. after_cpu_ms=..`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import yaml  # noqa: E402
from _procs import CLK_TCK, die_with_parent, terminated  # noqa: E402
from md_overhead import Bench, tail  # noqa: E402

from relaymd.client import Client  # noqa: E402
from relaymd.models import JobCreate  # noqa: E402
from relaymd.storage.bundle import pack_directory  # noqa: E402

ENGINE = '''
import json, os, signal, sys, time
FRAME, EVERY, STATE, CKPT = (int(os.environ["FRAME_KB"]) * 1024, float(os.environ["FRAME_S"]),
                             int(os.environ["STATE_KB"]) * 1024, float(os.environ["CKPT_S"]))
stop, frames, n = [], [], 0
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
traj = open("traj.bin", "ab")

def checkpoint():
    traj.write(b"".join(frames)); traj.flush(); os.fsync(traj.fileno()); frames.clear()
    with open("state.bin.tmp", "wb") as fh:
        fh.write(os.urandom(STATE))
    os.replace("state.bin.tmp", "state.bin")
    with open("state.json.tmp", "w") as fh:
        json.dump({"frames": n, "time": time.time()}, fh)
    os.replace("state.json.tmp", "state.json")

last = time.monotonic()
while not stop:
    time.sleep(EVERY)
    frames.append(os.urandom(FRAME)); n += 1
    if time.monotonic() - last >= CKPT:
        checkpoint(); last = time.monotonic()
checkpoint()
sys.exit(75)
'''


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


class OutputsBench(Bench):
    def bundle_for(self, mode: str) -> Path:
        a = self.args
        src = self.home / f"job-{mode}"
        src.mkdir()
        (src / "engine.py").write_text(ENGINE)
        state = ["state.bin", "state.json"]
        spec = {
            "command": (f"FRAME_KB={a.frame_kb} FRAME_S={a.frame_seconds} STATE_KB={a.state_kb} "
                        f"CKPT_S={a.checkpoint_seconds} exec {shlex.quote(sys.executable)} "
                        "engine.py"),
            "checkpoint": {"paths": state + (["traj.bin"] if mode == "before" else []),
                           "sentinel": "state.json", "poll_seconds": a.poll_seconds},
            "outputs": ["traj.bin"] if mode == "after" else [],
            "resources": {"gpus": 0},
        }
        (src / "relaymd.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        bundle = self.home / f"{mode}.tar.gz"
        pack_directory(src, bundle)
        return bundle

    def run_mode(self, mode: str) -> dict[str, float]:
        a = self.args
        bundle = self.bundle_for(mode)
        storage_dir = Path(self.env["RELAYMD_HOME"]) / "storage"
        url, tokens = self.start_server()
        seen: dict[tuple[str, int], int] = {}  # (path, mtime): size; a rewrite counts again

        def look() -> None:
            for dirpath, _dirs, files in os.walk(storage_dir):
                if job_id not in dirpath or not any(f"/{d}" in dirpath
                                                    for d in ("checkpoints", "outputs")):
                    continue  # the bundle and the logs: the same in both modes
                for name in files:
                    if name.startswith("."):
                        continue  # a write in progress
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue  # deleted (a pruned checkpoint) between walk and stat
                    seen[(path, st.st_mtime_ns)] = st.st_size

        job_id = uuid.uuid4().hex
        try:
            with Client(url, tokens["operator"]) as op:
                op.upload_bundle(job_id, bundle)
                op.create_job(JobCreate(id=job_id, title=f"outputs bench {mode}"))
                env = {**self.env, "RELAYMD_URL": url,
                       "RELAYMD_WORKER_WORKDIR": str(self.home / f"work-{mode}"),
                       "RELAYMD_WORKER_IDLE": "immediate_exit"}
                log_path = self.home / f"worker-{mode}.log"
                with log_path.open("wb") as log:
                    worker = subprocess.Popen([sys.executable, "-m", "relaymd", "worker"],
                                              env=env, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL,
                                              preexec_fn=die_with_parent)
                self.procs.append(worker)
                deadline = time.monotonic() + 60
                while op.get_job(job_id).status != "running":
                    if worker.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{mode}: the job never ran: " + tail(log_path))
                    time.sleep(0.2)
                started = time.monotonic()
                cpu0 = cpu_seconds(worker.pid)
                while time.monotonic() - started < a.minutes * 60:
                    look()
                    time.sleep(0.1)
                cpu = cpu_seconds(worker.pid) - cpu0
                elapsed = time.monotonic() - started
                checkpoints = op.get_job(job_id).latest_checkpoint or 0
                traj = (self.home / f"work-{mode}").glob("*/traj.bin")
                traj_bytes = max((p.stat().st_size for p in traj), default=0)
                worker.send_signal(signal.SIGTERM)
                if worker.wait(120) != 0:
                    raise RuntimeError(f"{mode}: worker exit {worker.returncode}: "
                                       + tail(log_path))
                look()
                d = op.get_job(job_id)
                if d.status != "queued":
                    raise RuntimeError(f"{mode}: the job is {d.status} after the hand-off")
                op.cancel(job_id)  # the next mode's worker must not pick it up
        finally:
            self.stop_server()
        uploaded = sum(seen.values())
        return {"uploaded": uploaded, "per_hour": uploaded * 3600 / elapsed, "elapsed": elapsed,
                "checkpoints": checkpoints, "cpu_ms": 1000 * cpu / max(checkpoints, 1),
                "traj": traj_bytes}


def run(args: argparse.Namespace, argv: list[str], bench: OutputsBench) -> int:
    print("command: " + shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                                    *argv]))
    rate = args.frame_kb * 1024 / args.frame_seconds
    print(f"engine: a {args.frame_kb} KiB frame every {args.frame_seconds:g}s "
          f"({rate * 3600 / 2**20:.0f} MiB of trajectory per hour), {args.state_kb} KiB of state "
          f"every {args.checkpoint_seconds:g}s; {args.minutes:g} min per mode", flush=True)
    got = {}
    for mode in ("before", "after"):
        r = got[mode] = bench.run_mode(mode)
        print(f"  {mode:<6}: {r['uploaded'] / 2**20:.1f} MiB uploaded in {r['elapsed']:.0f}s "
              f"({r['per_hour'] / 2**30:.2f} GiB/hour), {r['checkpoints']:.0f} checkpoints, "
              f"trajectory {r['traj'] / 2**20:.1f} MiB, worker CPU {r['cpu_ms']:.0f} ms per "
              "checkpoint", flush=True)
    b, a = got["before"], got["after"]
    ratio = b["per_hour"] / a["per_hour"] if a["per_hour"] else float("inf")
    print(f"bytes uploaded per hour over these {args.minutes:g}-minute runs: before "
          f"{b['per_hour'] / 2**30:.2f} GiB, after {a['per_hour'] / 2**30:.2f} GiB "
          f"({ratio:.1f}x less)")
    # Re-sending the trajectory costs more the longer the job has run: project a whole hour
    # from this run's measured rates (checkpoints per second, trajectory growth, and the bytes
    # of state per checkpoint, which the after run gives: what it sent less the trajectory).
    per_s = a["checkpoints"] / a["elapsed"]
    growth = a["traj"] / a["elapsed"]
    state = max(a["uploaded"] - a["traj"], 0) / max(a["checkpoints"], 1)
    n = round(3600 * per_s)
    before_h = sum(state + growth * k / per_s for k in range(1, n + 1))
    after_h = n * state + growth * 3600
    print(f"projected for one hour of this job ({n} checkpoints, from the measured rates): "
          f"before {before_h / 2**30:.1f} GiB, after {after_h / 2**30:.2f} GiB "
          f"({before_h / after_h:.0f}x less); the gap grows with the job's age")
    print(f"RESULT before_mb_h={b['per_hour'] / 2**20:.0f} after_mb_h={a['per_hour'] / 2**20:.0f} "
          f"ratio={ratio:.1f} hour_before_gb={before_h / 2**30:.1f} "
          f"hour_after_gb={after_h / 2**30:.2f} before_cpu_ms={b['cpu_ms']:.0f} "
          f"after_cpu_ms={a['cpu_ms']:.0f}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=2.0, help="run length per mode (default 2)")
    p.add_argument("--frame-kb", type=int, default=400, help="KiB per frame (default 400)")
    p.add_argument("--frame-seconds", type=float, default=1.0, help="a frame this often (1 s)")
    p.add_argument("--state-kb", type=int, default=2048, help="KiB of state per checkpoint")
    p.add_argument("--checkpoint-seconds", type=float, default=10.0)
    p.add_argument("--poll-seconds", type=float, default=1.0,
                   help="the worker looks for a new checkpoint this often")
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--home-parent", help="where the temporary directory goes")
    p.add_argument("--keep-home", action="store_true", help="keep logs and storage for a look")
    args = p.parse_args(argv)
    if min(args.minutes, args.frame_kb, args.frame_seconds, args.state_kb,
           args.checkpoint_seconds, args.poll_seconds) <= 0:
        p.error("every figure must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    bench = OutputsBench(args, prefix="relaymd-outputs-")
    try:
        return run(args, argv, bench)
    except Exception as exc:  # any failure: a message and exit status 1, never a traceback
        print(f"outputs benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())

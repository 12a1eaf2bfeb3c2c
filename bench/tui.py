"""Console benchmark: the jobs table at 10,000 jobs and 1,000 workers, and the idle cost.

    python bench/tui.py [--jobs 10000] [--workers 1000] [--batches 5] [--batch 1000]
                        [--idle-seconds 20] [--no-tmux]

1. First render: `RelayApp` (headless, 200x50) over a source holding N jobs and M workers, from
   `run_test()` entering to the first patch of both tables on screen (every row added, one
   refresh painted); the patch itself (`apply_jobs`) is timed apart.
2. Updates: `--batches` times, `--batch` jobs change state at once through the source's change
   events (as the orchestrator's listener delivers them); timed from the first event to the
   table showing the last change (the events coalesce into one patch that re-reads only the
   changed rows).
3. Idle CPU, headless: the same app with N jobs, left alone for `--idle-seconds` with its
   2-second tick (ages, heartbeat progress); process CPU time over wall time.
4. Idle CPU, real: the real `relaymd` console (hosting a real orchestrator with no work, in a
   private tmux server, 120x34) for `--idle-seconds`; its CPU from /proc. Skipped without tmux.

The source is the fixed-data one the snapshot tests use (tests/console_data.py): what is timed
is the console, not SQLite. Ends with one `RESULT ...` line; exit status 1 when a render or an
update never showed up. Targets (issue 6): first render < 1 s, update batch < 50 ms, idle CPU
< 3 % of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relaymd.tui.app import RelayApp  # noqa: E402
from relaymd.tui.source import JobRow, WorkerRow, rate_of  # noqa: E402
from tests.console_data import NOW, FixedSource, clock  # noqa: E402

STATES = ("queued", "assigned", "running", "completed", "failed", "cancelled")


def rows(n_jobs: int, n_workers: int) -> tuple[list[JobRow], list[WorkerRow]]:
    workers = [WorkerRow(f"{i:032x}", f"cluster{i % 3}", "hpc", "1x NVIDIA A100",
                         "busy" if i % 2 else "idle", "", NOW - i % 30, NOW + 3600)
               for i in range(n_workers)]
    jobs = []
    for i in range(n_jobs):
        state = STATES[i % len(STATES)]
        worker = workers[i % n_workers].id if state in ("assigned", "running") else ""
        rate = rate_of({"done": i % 100, "total": 100, "unit": "ns",
                        "ns_per_day": 20.0 + i % 300}) if state == "running" else (None, None)
        jobs.append(JobRow(f"{i:08x}" + uuid.UUID(int=i).hex[8:], f"job-{i}", state,
                           (i % 100) / 100, f"{i % 100}/100 ns", i % 50, worker,
                           NOW - 60 * (i % 5000), NOW - 30 * (i % 100) if i % 4 else None,
                           *rate))
    return jobs, workers


async def wait(pilot, predicate, limit_s: float = 60) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        if predicate():
            return True
        await pilot.pause()
    return False


async def measure(args: argparse.Namespace) -> dict[str, float]:
    jobs, workers = rows(args.jobs, args.workers)
    source = FixedSource(jobs, workers)
    app = RelayApp(source, clock=clock, poll=2.0)
    patch_times: list[float] = []
    patch_ends: list[float] = []
    original = app.apply_jobs

    def timed_apply(*a, **kw):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        original(*a, **kw)
        patch_ends.append(time.perf_counter())
        patch_times.append(patch_ends[-1] - t)
    app.apply_jobs = timed_apply  # type: ignore[method-assign]
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    async with app.run_test(size=(200, 50)) as pilot:
        table = app.query_one("#jobs")
        wtable = app.query_one("#workers")
        ok = await wait(pilot, lambda: table.row_count == args.jobs
                        and wtable.row_count == args.workers)
        await pilot.pause()
        out["first_render_s"] = time.perf_counter() - t0
        out["first_patch_s"] = patch_times[0] if patch_times else float("nan")
        if not ok:
            raise SystemExit(f"first render never showed {args.jobs} jobs")
        print(f"first render: {out['first_render_s'] * 1000:.0f} ms to show {args.jobs:,} jobs "
              f"and {args.workers:,} workers (the jobs patch itself: "
              f"{out['first_patch_s'] * 1000:.0f} ms)")

        batch_times: list[float] = []
        shown_times: list[float] = []
        for b in range(args.batches):
            picked = jobs[b::max(1, args.jobs // args.batch)][: args.batch]
            new_state = STATES[(b + 1) % len(STATES)]
            changed = [replace(r, status=new_state, checkpoints=r.checkpoints + 1)
                       for r in picked]
            last = changed[-1]
            before = len(patch_times)
            t = time.perf_counter()
            for r in changed:
                source.change(r)
            shown = await wait(pilot, lambda last=last: table.get_row(last.id)[2].plain
                               == last.status, 30)
            await pilot.pause()
            dt = time.perf_counter() - t
            if not shown:
                raise SystemExit(f"batch {b + 1}: the last change never showed")
            applied = patch_ends[-1] - t
            batch_times.append(applied)
            shown_times.append(dt)
            print(f"  update batch {b + 1}: {len(changed):,} jobs -> {new_state:<9} in the "
                  f"table {applied * 1000:5.1f} ms after the first event "
                  f"({len(patch_times) - before} patch(es), "
                  f"{sum(patch_times[before:]) * 1000:.1f} ms patching), painted by "
                  f"{dt * 1000:5.1f} ms")
            jobs = [source.rows[r.id] for r in jobs]
        out["batch_ms_mean"] = statistics.mean(batch_times) * 1000
        out["batch_ms_max"] = max(batch_times) * 1000
        out["painted_ms_mean"] = statistics.mean(shown_times) * 1000

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(args.idle_seconds)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        out["idle_cpu_headless_pct"] = 100 * cpu / wall
        print(f"idle (headless, {args.jobs:,} jobs, tick every 2 s): {cpu:.2f} s CPU in "
              f"{wall:.1f} s = {out['idle_cpu_headless_pct']:.2f}% of one core")
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and its children that were waited for (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def idle_real_console(seconds: float) -> float | None:
    if shutil.which("tmux") is None:
        print("idle (real console): skipped, tmux not installed")
        return None
    sock = f"relaymd-bench-{uuid.uuid4().hex[:8]}"
    home = Path(tempfile.mkdtemp(prefix="relaymd-bench-tui-"))
    relaymd = Path(sys.executable).with_name("relaymd")
    env = {"RELAYMD_HOME": str(home), "RELAYMD_PORT": "0", "RELAYMD_LOCAL_WORKERS": "0",
           "HOME": str(home / "user"), "TERM": "xterm-256color"}
    try:
        subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-s", "c", "-x", "120", "-y",
                        "34", *[f"-e{k}={v}" for k, v in env.items()], str(relaymd)],
                       check=True, timeout=20)
        deadline = time.time() + 30
        pid = None
        while time.time() < deadline:
            screen = subprocess.run(["tmux", "-L", sock, "capture-pane", "-p", "-t", "c"],
                                    capture_output=True, text=True).stdout
            if "checkpoints/h" in screen:
                pid = int(subprocess.run(["tmux", "-L", sock, "display", "-p", "-t", "c",
                                          "#{pane_pid}"], capture_output=True,
                                         text=True).stdout)
                break
            time.sleep(0.2)
        if pid is None:
            print("idle (real console): the console did not come up")
            return None
        time.sleep(2)  # start-up settles
        c0, t0 = proc_cpu_seconds(pid), time.perf_counter()
        time.sleep(seconds)
        cpu, wall = proc_cpu_seconds(pid) - c0, time.perf_counter() - t0
        pct = 100 * cpu / wall
        print(f"idle (real `relaymd` in tmux, orchestrator inside, no work): {cpu:.2f} s CPU in "
              f"{wall:.1f} s = {pct:.2f}% of one core")
        return pct
    finally:
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", "c", "q"], capture_output=True)
        time.sleep(1.5)
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=1_000)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch", type=int, default=1_000, help="jobs changed per batch")
    p.add_argument("--idle-seconds", type=float, default=20)
    p.add_argument("--no-tmux", action="store_true", help="skip the real console's idle CPU")
    args = p.parse_args()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    out = asyncio.run(measure(args))
    real = None if args.no_tmux else idle_real_console(args.idle_seconds)
    targets = [("first render < 1 s", out["first_render_s"] < 1.0),
               ("update batch < 50 ms", out["batch_ms_max"] < 50),
               ("idle CPU < 3% (headless, with the jobs)", out["idle_cpu_headless_pct"] < 3)]
    if real is not None:
        targets.append(("idle CPU < 3% (real console)", real < 3))
    for name, met in targets:
        print(f"target {name}: {'met' if met else 'MISSED'}")
    print(f"RESULT first_render_s={out['first_render_s']:.3f} "
          f"first_patch_s={out['first_patch_s']:.3f} batch_ms_mean={out['batch_ms_mean']:.1f} "
          f"batch_ms_max={out['batch_ms_max']:.1f} painted_ms_mean={out['painted_ms_mean']:.1f} "
          f"idle_cpu_headless_pct={out['idle_cpu_headless_pct']:.2f} "
          f"idle_cpu_real_pct={'nan' if real is None else f'{real:.2f}'}")


if __name__ == "__main__":
    main()

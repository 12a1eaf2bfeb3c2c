"""A tiny restartable engine for the worker tests.

Computes x_{n+1} = (a*x_n + n) mod m for TOTAL steps, one step per STEP_S seconds, writes its state
atomically (temp, fsync, rename) every EVERY steps to state.json, resumes from state.json if
present, writes progress.json, and on SIGTERM writes a final checkpoint and exits with
TERM_EXIT (0 by default; AToM-OpenMM exits 1). FAIL_AT makes it exit 3 at that step. PAD_AT
writes PAD_MB of scratch output (pad.bin, not part of a checkpoint) at that step, as an engine
writing trajectory frames does: on a full disk it dies there with ENOSPC.
"""

import json
import os
import signal
import sys
import time

TOTAL = int(os.environ.get("TOTAL", "40"))
EVERY = int(os.environ.get("EVERY", "5"))
STEP_S = float(os.environ.get("STEP_S", "0.02"))
FAIL_AT = int(os.environ.get("FAIL_AT", "-1"))
TERM_EXIT = int(os.environ.get("TERM_EXIT", "0"))
PAD_AT = int(os.environ.get("PAD_AT", "-1"))
PAD_MB = int(os.environ.get("PAD_MB", "0"))
A, M = 1103515245, 2**31


def save(n: int, x: int) -> None:
    tmp = "state.json.tmp"
    with open(tmp, "w") as fh:
        json.dump({"n": n, "x": x}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, "state.json")
    with open("progress.json.tmp", "w") as fh:
        json.dump({"done": n, "total": TOTAL, "unit": "steps"}, fh)
    os.replace("progress.json.tmp", "progress.json")


def main() -> int:
    n, x = 0, 1
    if os.path.exists("state.json"):
        with open("state.json") as fh:
            state = json.load(fh)
        n, x = state["n"], state["x"]
        print(f"resumed at step {n}", flush=True)
    # every step computed, across all attempts (outside the job dir, for the tests' accounting)
    with open(os.environ.get("STEPS_LOG", "steps.log"), "a") as log:
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while n < TOTAL:
            if stop:
                save(n, x)
                print(f"SIGTERM at step {n}", flush=True)
                return TERM_EXIT
            if n == PAD_AT:
                with open("pad.bin", "wb") as pad:
                    for _ in range(PAD_MB):
                        pad.write(b"\0" * (1 << 20))
                    pad.flush()
                    os.fsync(pad.fileno())
            if n == FAIL_AT:
                print(f"failing at step {n}", file=sys.stderr, flush=True)
                return 3
            x = (A * x + n) % M
            n += 1
            log.write(f"{n}\n")
            log.flush()
            time.sleep(STEP_S)
            if n % EVERY == 0:
                save(n, x)
    save(n, x)
    with open("result.json", "w") as fh:
        json.dump({"x": x, "n": n}, fh)
    print(f"done: x={x}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

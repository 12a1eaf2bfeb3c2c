"""AToM-OpenMM for real: the README's walkthrough (tests/data/atom: a 4-state ABFE production of
the TEMOA-G1 host-guest complex, 5 samples per replica) submitted with `relaymd submit`, run by
real `relaymd worker` processes across a SIGTERM hand-off and a kill -9 of the worker and its
engine, and fetched with `relaymd results`: every replica reaches MAX_SAMPLES, and the stitched
`r*/temoa-g1.out` hold each sample exactly once (as many lines as the final checkpoint's cycle
count says were sampled).

What AToM does that RelayMD must handle: on SIGTERM it writes a checkpoint, sleeps 20 s and
exits 1 (a hand-off, not a failure); restored checkpoints without `ckpt_is_valid` make it exit 1
at once ("Bad checkpoints"), so the sentinel travels with the set; it writes sample lines as
cycles end, ahead of its checkpoints, so the outputs' lengths are taken when it removes the
sentinel to write one; it may run past MAX_SAMPLES by a cycle.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytest.importorskip("atom_openmm")

from relaymd.models import BundleSpec  # noqa: E402

from . import test_worker  # noqa: E402
from .conftest import RunningOrchestrator, make_settings  # noqa: E402
from .test_cli import clean_env  # noqa: E402
from .test_worker import (  # noqa: E402
    POLLING,
    end_started,
    engine_group,
    engine_log,
    kill_node,
    start_worker,
    wait_accepted,
    wait_for,
    why,
)

DATA = Path(__file__).parent / "data" / "atom"
REPLICAS = 4
MAX_SAMPLES = 5
no_leftover_processes = test_worker.no_leftover_processes


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[RunningOrchestrator]:
    """file:// storage; heartbeats roomy enough for a machine whose cores AToM keeps busy."""
    settings = make_settings(tmp_path / "home", heartbeat_interval=1.0, heartbeat_timeout=15.0)
    settings.reap_interval = 0.5
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()
    end_started(tmp_path)


def bundle_dir(dest: Path) -> Path:
    """The job directory as an operator prepares it: the control file, nodefile and
    relaymd.yaml, and the prepared inputs (stored gzipped here) under their own names."""
    dest.mkdir()
    for name in ("temoa-g1_asyncre.cntl", "nodefile", "relaymd.yaml"):
        shutil.copy(DATA / name, dest / name)
    for gz in DATA.glob("*.gz"):
        (dest / gz.name.removesuffix(".gz")).write_bytes(gzip.decompress(gz.read_bytes()))
    return dest


def cli(orch: RunningOrchestrator, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(orch.settings.home, **orch.settings.storage_env())
    return subprocess.run([sys.executable, "-m", "relaymd", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def cycles(checkpoint_xml: Path) -> int:
    """The replica's cycle counter in its checkpoint (samples taken = cycles - 1)."""
    m = re.search(r'RECycle="(\d+)"', checkpoint_xml.read_text())
    assert m, f"{checkpoint_xml} holds no RECycle parameter"
    return int(m.group(1))


def test_the_readme_walkthrough_survives_a_hand_off_and_a_kill_9(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    spec = BundleSpec.model_validate(yaml.safe_load((DATA / "relaymd.yaml").read_text()))
    submitted = cli(orch, "submit", str(bundle_dir(tmp_path / "temoa-g1")), "--title",
                    "TEMOA-G1 ABFE", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    op = orch.operator()

    # Attempt 1: runs to its first checkpoint (AToM's CHECKPOINT_TIME is 20 s), shows its
    # progress in ns from the bare fraction AToM writes, then the worker is told to stop.
    # AToM needs about 22 s to stop (a checkpoint, then a hard-coded 20 s sleep); its shutdown
    # runs inside its SIGTERM handler, which can deadlock on a lock the interrupted code held
    # (seen here: no exit at all). The worker kills it when the wait is over and hands the job
    # back with the newest complete checkpoint: 45 s keeps that bound short.
    w1 = start_worker(orch, tmp_path, "w1", RELAYMD_SHUTDOWN_WAIT="45")
    first = wait_accepted(op, job_id, tmp_path, "w1", timeout=120)
    progress = wait_for(lambda: (p := op.get_job(job_id).progress) and p.unit == "ns" and p,
                        30, "progress in ns from AToM's progress file")
    assert progress.total == spec.progress_total_ns and 0 <= progress.done <= progress.total, \
        progress
    w1.send_signal(signal.SIGTERM)  # AToM checkpoints, sleeps 20 s and exits 1
    assert w1.wait(120) == 0, f"worker w1 exit {w1.returncode} ({why(tmp_path, 'w1')})"
    d = op.get_job(job_id)
    assert d.status == "queued" and d.failures == 0, \
        f"after the hand-off the job is {d.status}, failures {d.failures}: {d.last_failure}"
    killed = "ignored SIGTERM" in (tmp_path / "worker-w1.log").read_text()
    if not killed:  # AToM stopped by itself: its checkpoint at SIGTERM came back with the job
        log1 = engine_log(orch, job_id, 1)
        assert "Termination signal" in log1, log1[-500:]
        assert (d.latest_checkpoint or 0) > (first.latest_checkpoint or 0), \
            "AToM's checkpoint at SIGTERM was not handed back"

    # Attempt 2 resumes from it (the sentinel came back with the set), checkpoints once more,
    # and its node dies with the cycles it ran since.
    w2 = start_worker(orch, tmp_path, "w2", **POLLING)
    wait_accepted(op, job_id, tmp_path, "w2", after=d.latest_checkpoint, timeout=120)
    group = engine_group(w2)
    assert group, f"no engine under worker w2 ({why(tmp_path, 'w2')})"
    kill_node(w2, group)

    # Attempt 3 finishes.
    w3 = start_worker(orch, tmp_path, "w3", **POLLING)
    d = wait_for(lambda: (d := op.get_job(job_id)).status in ("completed", "failed") and d, 240,
                 lambda: f"the job to finish ({why(tmp_path, 'w3')})")
    assert d.status == "completed", f"job {d.status}: {d.last_failure} ({why(tmp_path, 'w3')})"
    assert d.attempt == 3, f"{d.attempt} attempts"
    w3.send_signal(signal.SIGTERM)
    w3.wait(30)
    # Both resumed from the checkpoint they were given (attempt 2's node died with its log:
    # read on its disk).
    for log in ((tmp_path / "work-w2" / f"{job_id[:12]}-attempt2.log").read_text(),
                engine_log(orch, job_id, 3)):
        assert "Loading checkpointfile" in log and "Bad checkpoints" not in log, log[-800:]

    results = tmp_path / "results"
    fetched = cli(orch, "results", job_id, str(results), "--json")
    assert fetched.returncode == 0, fetched.stderr
    summary = json.loads(fetched.stdout)
    assert summary["attempts"] == [1, 2, 3], summary
    final = results / f"checkpoint-{summary['checkpoint']['seq']}"
    assert (final / "ckpt_is_valid").exists(), summary["checkpoint"]
    from openmm.app.internal.xtc_utils import read_xtc

    for i in range(REPLICAS):
        lines = (results / f"r{i}" / "temoa-g1.out").read_text().splitlines()
        samples = cycles(final / f"r{i}" / "temoa-g1_ckpt.xml") - 1
        assert samples >= MAX_SAMPLES, f"replica {i} stopped at {samples} samples"
        assert len(lines) == samples, \
            f"replica {i}: {len(lines)} sample lines stitched for {samples} samples taken " \
            f"({'repeated' if len(lines) > samples else 'lost'} work)"
        assert len(set(lines)) == len(lines), f"replica {i}: a sample line appears twice"
        coords, _box, _time, _steps = read_xtc(str(results / f"r{i}" / "temoa-g1.xtc").encode())
        assert coords.shape[0] == 8479 and coords.shape[2] <= len(lines), \
            f"replica {i}: {coords.shape[2]} frames of {coords.shape[0]} atoms, {len(lines)} samples"

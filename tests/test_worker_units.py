"""Unit tests of the worker's parts that need no orchestrator: the checkpoint watcher, the
hardware probes' parsers and the gateway's retry policy."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from relaymd.client import ApiError
from relaymd.storage import IntegrityError, StorageError
from relaymd.worker import checkpoint as checkpoint_mod
from relaymd.worker.checkpoint import IncompleteCheckpoint, Watcher
from relaymd.worker.gateway import Gateway, backoff, retryable
from relaymd.worker.hardware import Gpus, parse_nvidia_smi, parse_slurm_time, slurm_end_time

T0 = 1_700_000_000 * 10**9  # a fixed mtime (ns) so tests never depend on timestamp granularity


def write(path: Path, text: str, mtime_ns: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def two_looks(w: Watcher, newer_than: int | None = None) -> tuple[Any, Any]:
    return w.candidate(newer_than), w.candidate(newer_than)


# --------------------------------------------------------------------------- Watcher


def test_a_new_set_needs_two_equal_looks(tmp_path: Path) -> None:
    w = Watcher(tmp_path, ["*.chk"], None)
    assert w.candidate() is None, "no files: no candidate"
    write(tmp_path / "a.chk", "1", T0)
    assert w.candidate() is None, "a set seen once must not be packed yet"
    write(tmp_path / "a.chk", "12", T0 + 1)  # still being written
    assert w.candidate() is None, "a set that changed since the last look must not be packed"
    sig = w.candidate()
    assert sig == {"a.chk": (2, T0 + 1)}, f"second equal look should give the set, got {sig}"


def test_uploaded_set_is_not_offered_again_and_older_sets_never(tmp_path: Path) -> None:
    w = Watcher(tmp_path, ["*.chk"], None)
    write(tmp_path / "a.chk", "1", T0 + 10)
    sig = two_looks(w)[1]
    assert sig is not None, "first set not offered"
    w.mark_uploaded(sig)
    assert two_looks(w) == (None, None), "the uploaded set was offered again"
    write(tmp_path / "a.chk", "22", T0 + 5)  # different, but not newer
    assert two_looks(w) == (None, None), "a set older than the uploaded one was offered"
    write(tmp_path / "a.chk", "333", T0 + 20)
    assert two_looks(w)[1] == {"a.chk": (3, T0 + 20)}, "a newer set was not offered"


def test_missing_file_of_the_last_uploaded_set_blocks_upload(tmp_path: Path) -> None:
    w = Watcher(tmp_path, ["r*/ckpt.xml"], None)
    write(tmp_path / "r0" / "ckpt.xml", "a", T0)
    write(tmp_path / "r1" / "ckpt.xml", "a", T0)
    sig = two_looks(w)[1]
    assert sig is not None and len(sig) == 2, f"two-file set not offered: {sig}"
    w.mark_uploaded(sig)
    (tmp_path / "r1" / "ckpt.xml").unlink()  # mid-rewrite, not a deletion
    write(tmp_path / "r0" / "ckpt.xml", "bb", T0 + 1)
    assert two_looks(w) == (None, None), "a set lacking a file of the last upload was offered"
    write(tmp_path / "r1" / "ckpt.xml", "bb", T0 + 1)
    assert two_looks(w)[1] is not None, "the set once complete again was not offered"


def test_missing_sentinel_blocks_upload(tmp_path: Path) -> None:
    w = Watcher(tmp_path, ["*.xml"], "ckpt_is_valid")
    write(tmp_path / "s.xml", "x", T0)
    assert two_looks(w) == (None, None), "offered a set while its sentinel is missing"
    write(tmp_path / "ckpt_is_valid", "", T0)
    assert two_looks(w)[1] is not None, "sentinel present but the set was not offered"


def test_pack_refuses_a_missing_sentinel(tmp_path: Path) -> None:
    w = Watcher(tmp_path, ["*.xml"], "ok")
    write(tmp_path / "s.xml", "x", T0)
    with pytest.raises(IncompleteCheckpoint, match="sentinel"):
        w.pack({"s.xml": (1, T0)}, tmp_path / "out.tar.gz")


def test_sentinel_rewritten_during_pack_is_incomplete(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    w = Watcher(tmp_path, ["*.xml"], "ok")
    write(tmp_path / "s.xml", "x", T0)
    write(tmp_path / "ok", "", T0)
    sig = two_looks(w)[1]
    assert sig is not None, "set with sentinel not offered"
    real = checkpoint_mod.stat_files

    def engine_rewrites_sentinel(job_dir: Path, names: Any) -> Any:
        write(tmp_path / "ok", "", T0 + 7)  # the engine started its next checkpoint meanwhile
        return real(job_dir, names)

    monkeypatch.setattr(checkpoint_mod, "stat_files", engine_rewrites_sentinel)
    with pytest.raises(IncompleteCheckpoint):
        w.pack(sig, tmp_path / "out.tar.gz")


def test_file_changed_since_the_look_is_incomplete(tmp_path: Path) -> None:
    w = Watcher(tmp_path, ["*.xml"], None)
    write(tmp_path / "s.xml", "x", T0)
    sig = two_looks(w)[1]
    assert sig is not None, "set not offered"
    write(tmp_path / "s.xml", "xy", T0 + 3)
    with pytest.raises(IncompleteCheckpoint, match="s.xml"):
        w.pack(sig, tmp_path / "out.tar.gz")


def test_pack_holds_exactly_the_set(tmp_path: Path) -> None:
    w = Watcher(tmp_path, ["*.xml", "sub/*.chk"], None)
    write(tmp_path / "a.xml", "aaa", T0)
    write(tmp_path / "sub" / "b.chk", "bb", T0)
    write(tmp_path / "other.txt", "not part of it", T0)
    sig = two_looks(w)[1]
    assert sig is not None, "set not offered"
    packed = w.pack(sig, tmp_path / "out.tar.gz")
    with tarfile.open(packed.path) as tar:
        names = sorted(tar.getnames())
    assert names == ["a.xml", "sub/b.chk"], f"packed {names}"
    assert packed.files == {"a.xml": 3, "sub/b.chk": 2}, f"manifest files {packed.files}"
    assert packed.size == packed.path.stat().st_size, "size differs from the file's"


def test_a_set_replaced_by_rename_after_the_snapshot_packs_as_snapshotted(tmp_path: Path) -> None:
    """Packing reads a snapshot: the engine may write its next checkpoint (by rename, the way
    engines should) while the slow tar + gzip runs, and the packed set stays the one looked at."""
    job = tmp_path / "job"
    write(job / "a.xml", "first", T0)
    write(job / "b.chk", "first-binary", T0)
    w = Watcher(job, ["*.xml", "*.chk"], None)
    sig = two_looks(w)[1]
    assert sig is not None, "set not offered"
    snap = tmp_path / "snap"
    w.snapshot(sig, snap)
    for name in ("a.xml", "b.chk"):  # the next checkpoint lands, atomically
        write(job / f".{name}.tmp", "second!", T0 + 9)
        os.replace(job / f".{name}.tmp", job / name)
    packed = checkpoint_mod.pack_snapshot(snap, sig, tmp_path / "out.tar.gz")
    with tarfile.open(packed.path) as tar:
        got = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert got == {"a.xml": "first", "b.chk": "first-binary"}, f"packed {got}"
    assert packed.sha256 == hashlib.sha256(packed.path.read_bytes()).hexdigest(), "sha256 wrong"


def test_a_set_rewritten_in_place_during_packing_is_incomplete(tmp_path: Path) -> None:
    """An engine that rewrites in place changes the snapshot's linked inode: never shipped."""
    job = tmp_path / "job"
    write(job / "a.xml", "first", T0)
    w = Watcher(job, ["*.xml"], None)
    sig = two_looks(w)[1]
    assert sig is not None, "set not offered"
    snap = tmp_path / "snap"
    w.snapshot(sig, snap)
    write(job / "a.xml", "second", T0 + 9)  # same inode as the snapshot's link
    with pytest.raises(IncompleteCheckpoint, match="in place"):
        checkpoint_mod.pack_snapshot(snap, sig, tmp_path / "out.tar.gz")


def test_the_watcher_says_when_a_second_look_is_due(tmp_path: Path) -> None:
    w = Watcher(tmp_path, ["*.chk"], None)
    assert w.candidate() is None and not w.awaiting_second_look, "nothing there, nothing due"
    write(tmp_path / "a.chk", "1", T0)
    assert w.candidate() is None and w.awaiting_second_look, "a new set needs its second look"
    assert w.candidate() is not None and not w.awaiting_second_look, "the second look agrees"


def test_newer_than_a_baseline(tmp_path: Path) -> None:
    """A hand-off waits for a set strictly newer than the one present when shutdown began."""
    w = Watcher(tmp_path, ["*.chk"], None)
    write(tmp_path / "a.chk", "1", T0)
    baseline = w.baseline()
    assert baseline == T0, f"baseline {baseline} != newest mtime {T0}"
    assert two_looks(w, baseline) == (None, None), "a set not newer than the baseline was offered"
    write(tmp_path / "a.chk", "2", T0)  # rewritten with the same mtime: still not newer
    assert two_looks(w, baseline) == (None, None), "a same-mtime set passed the baseline"
    write(tmp_path / "a.chk", "3", T0 + 1)
    assert two_looks(w, baseline)[1] == {"a.chk": (1, T0 + 1)}, "the newer set was not offered"


def test_restored_files_are_not_progress(tmp_path: Path) -> None:
    write(tmp_path / "a.chk", "restored", T0)
    w = Watcher(tmp_path, ["*.chk"], None)
    w.mark_restored()
    assert two_looks(w) == (None, None), "the restored checkpoint was offered as new progress"
    write(tmp_path / "a.chk", "next", T0 + 1)
    assert two_looks(w)[1] is not None, "progress after the restore was not offered"


def test_links_leaving_the_job_dir_are_not_part_of_the_set(tmp_path: Path) -> None:
    job = tmp_path / "job"
    write(tmp_path / "outside.chk", "secret", T0)
    write(job / "in.chk", "x", T0)
    (job / "out.chk").symlink_to(tmp_path / "outside.chk")
    w = Watcher(job, ["*.chk"], None)
    sig = two_looks(w)[1]
    assert sig is not None and set(sig) == {"in.chk"}, f"set is {sig}"


# --------------------------------------------------------------------------- hardware


def test_parse_nvidia_smi_counts_gpus_and_takes_the_smallest_memory() -> None:
    text = "NVIDIA A100-SXM4-40GB, 40960\nNVIDIA A100-SXM4-80GB, 81920\n"
    assert parse_nvidia_smi(text) == Gpus(2, "NVIDIA A100-SXM4-40GB", 40.0)


def test_parse_nvidia_smi_memory_not_available() -> None:
    assert parse_nvidia_smi("Tesla T4, [N/A]\n") == Gpus(1, "Tesla T4", 0.0)
    assert parse_nvidia_smi("Tesla T4, N/A") == Gpus(1, "Tesla T4", 0.0)


@pytest.mark.parametrize("text", ["", "\n\n", "garbage", "No devices were found",
                                  "NVIDIA-SMI has failed because it couldn't communicate "
                                  "with the NVIDIA driver"])
def test_parse_nvidia_smi_garbage_means_no_gpus(text: str) -> None:
    assert parse_nvidia_smi(text) == Gpus(), f"{text!r} parsed as GPUs"


@pytest.mark.parametrize("text", ["N/A", "Unknown", "NONE", "INVALID", "", "  \n",
                                  "garbage", "2026-13-45T99:00:00", "tomorrow"])
def test_parse_slurm_time_unknowns_are_none(text: str) -> None:
    assert parse_slurm_time(text) is None, f"{text!r} parsed as a time"


def test_parse_slurm_time_is_local_time() -> None:
    expected = datetime(2026, 11, 25, 12, 0, 0).timestamp()
    assert parse_slurm_time("2026-11-25T12:00:00\n") == expected


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_end_time_from_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    end = int(time.time()) + 3600
    fake_tool(tmp_path / "bin", "squeue", f"date -d @{end} +%Y-%m-%dT%H:%M:%S")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert slurm_end_time("123") == end
    assert slurm_end_time(None) is None, "no SLURM job id must mean no end time"


def test_slurm_end_time_falls_back_to_scontrol_and_tolerates_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "squeue", "echo 'slurm_load_jobs error: Socket timed out' >&2; exit 1")
    fake_tool(bin_dir, "scontrol", "echo 'JobId=123 JobName=x'; echo '   StartTime=2026-11-25T"
              "10:00:00 EndTime=2026-11-25T12:00:00 Deadline=N/A'")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert slurm_end_time("123") == datetime(2026, 11, 25, 12).timestamp()
    fake_tool(bin_dir, "scontrol", "exit 1")
    assert slurm_end_time("123") is None, "failed probes must mean unknown"


# --------------------------------------------------------------------------- Gateway


class Flaky:
    """A callable that raises the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def gateway(max_delay: float = 0.01) -> Gateway:
    return Gateway(client=object(), max_delay=max_delay)  # type: ignore[arg-type]


async def test_gateway_retries_5xx_and_unreachable_then_succeeds() -> None:
    fn = Flaky(ApiError(503, "unavailable", "busy"), ApiError(0, "unreachable", "down"),
               ApiError(500, "error", "boom"))
    assert await gateway().call("x", fn, give_up_after=10) == "ok"
    assert fn.calls == 4, f"expected 3 retries then success, got {fn.calls} calls"


async def test_gateway_raises_409_at_once() -> None:
    fn = Flaky(ApiError(409, "job_transition_conflict", "stale attempt"))
    with pytest.raises(ApiError) as info:
        await gateway().call("x", fn, give_up_after=10)
    assert info.value.status == 409
    assert fn.calls == 1, f"a 409 was retried ({fn.calls} calls)"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_gateway_raises_other_4xx_at_once(status: int) -> None:
    fn = Flaky(ApiError(status, "nope", "nope"))
    with pytest.raises(ApiError):
        await gateway().call("x", fn)
    assert fn.calls == 1, f"a {status} was retried ({fn.calls} calls)"


async def test_gateway_give_up_after_bounds_the_retries() -> None:
    fn = Flaky(*[ApiError(503, "unavailable", "busy")] * 10_000)
    started = time.monotonic()
    with pytest.raises(ApiError):
        await gateway(max_delay=0.05).call("x", fn, give_up_after=0.4)
    took = time.monotonic() - started
    assert 0.3 <= took < 1.0, f"gave up after {took:.2f}s, expected about 0.4s"
    assert fn.calls > 2, f"only {fn.calls} calls in 0.4s of retrying"


async def test_gateway_never_sleeps_past_give_up_after() -> None:
    fn = Flaky(*[ApiError(0, "unreachable", "down")] * 100)
    started = time.monotonic()
    with pytest.raises(ApiError):
        # the backoff cap (30 s) is far beyond the bound: the pause must be cut to fit it
        await gateway(max_delay=30).call("x", fn, give_up_after=0.3)
    took = time.monotonic() - started
    assert took < 1.0, f"gave up after {took:.2f}s, expected about 0.3s"


async def test_gateway_retries_storage_errors_not_programming_errors() -> None:
    fn = Flaky(StorageError("disk busy"), OSError("EIO"), TimeoutError())
    assert await gateway().call("x", fn, give_up_after=10) == "ok"
    assert fn.calls == 4, f"storage/OS/timeouts should be retried, got {fn.calls} calls"
    bad = Flaky(ValueError("bug"))
    with pytest.raises(ValueError):
        await gateway().call("x", bad, give_up_after=10)
    assert bad.calls == 1, "a programming error was retried"


def test_gateway_backoff_is_capped_exponential_with_half_jitter() -> None:
    """Try n waits min(cap, 0.5 s * 2**(n-1)) times a random factor in [0.5, 1]."""
    wait = backoff(max_delay=3.0)

    class State:
        def __init__(self, n: int) -> None:
            self.attempt_number = n

    for n, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (10, 3.0), (200, 3.0)]:
        pauses = [wait(State(n)) for _ in range(500)]  # type: ignore[arg-type]
        assert all(0.5 * base <= p <= base for p in pauses), f"try {n}: {min(pauses)}..{max(pauses)}"
        assert max(pauses) - min(pauses) > 0.2 * base, f"try {n}: no jitter"


async def test_gateway_logs_each_retry(caplog: pytest.LogCaptureFixture) -> None:
    fn = Flaky(ApiError(503, "unavailable", "busy"), ApiError(0, "unreachable", "down"))
    with caplog.at_level("WARNING", logger="relaymd.worker.gateway"):
        assert await gateway().call("claim", fn, give_up_after=10) == "ok"
    lines = [r.getMessage() for r in caplog.records if r.name == "relaymd.worker.gateway"]
    assert len(lines) == 2 and lines[0].startswith("claim failed (try 1): "), lines
    assert "retrying in" in lines[1] and "(try 2)" in lines[1], lines


def test_corrupt_download_is_not_retried() -> None:
    assert not retryable(IntegrityError("sha256 mismatch")), "a sha256 mismatch is retried"


async def test_gateway_tracks_contact_with_the_orchestrator() -> None:
    now = [100.0]

    class FakeClient:
        def ping(self) -> str:
            return "pong"

        def refuse(self) -> None:
            raise ApiError(409, "conflict", "no")

        def unreachable(self) -> None:
            raise ApiError(0, "unreachable", "down")

    client = FakeClient()
    g = Gateway(client, max_delay=0.01, clock=lambda: now[0])  # type: ignore[arg-type]
    now[0] = 130.0
    assert g.silent_for() == 30.0, f"silent_for {g.silent_for()}"
    await g.call("ping", client.ping)
    assert g.silent_for() == 0.0, "a successful call did not count as contact"
    now[0] = 140.0
    with pytest.raises(ApiError):
        await g.call("refuse", client.refuse)
    assert g.silent_for() == 0.0, "an HTTP answer (409) did not count as contact"
    now[0] = 150.0
    with pytest.raises(ApiError):
        await g.call("down", client.unreachable, give_up_after=0)
    assert g.silent_for() == 10.0, "an unreachable orchestrator counted as contact"


# --------------------------------------------------------------------------- progress files


def reader(tmp_path: Path, **spec: Any) -> tuple[Any, Path, list[float]]:
    from relaymd.models import BundleSpec
    from relaymd.worker.progress import ProgressReader

    now = [1000.0]
    bundle = BundleSpec.model_validate({"command": "x", "progress": "progress", **spec})
    return ProgressReader(bundle, tmp_path, clock=lambda: now[0]), tmp_path / "progress", now


def test_a_bare_fraction_is_progress_in_percent_or_in_ns(tmp_path: Path) -> None:
    r, path, _ = reader(tmp_path)
    path.write_text("0.25\n")  # AToM-OpenMM's `progress` file
    p = r.read()
    assert p is not None and (p.done, p.total, p.unit, p.ns_per_day) == (25.0, 100, "%", None)
    r, path, _ = reader(tmp_path, progress_total_ns=8.0)
    path.write_text("0.25\n")
    p = r.read()
    assert p is not None and (p.done, p.total, p.unit) == (2.0, 8.0, "ns")
    path.write_text("1.05\n")  # overshoot by a cycle: done, not more than done
    p = r.read()
    assert p is not None and p.done == p.total == 8.0


def test_ns_per_day_comes_from_the_rate_of_a_bare_fraction(tmp_path: Path) -> None:
    r, path, now = reader(tmp_path, progress_total_ns=10.0)
    path.write_text("0.1")
    assert r.read().ns_per_day is None  # one reading: no rate yet
    now[0] += 10
    path.write_text("0.11")
    assert r.read().ns_per_day is None, "a rate from readings 10 s apart is too noisy"
    now[0] += 3590  # an hour after the first reading: 0.2 of 10 ns done in that hour
    path.write_text("0.3")
    p = r.read()
    assert p is not None and p.done == 3.0 and p.ns_per_day == pytest.approx(48.0)


def test_an_engines_own_rate_wins_and_unreadable_files_are_no_progress(tmp_path: Path) -> None:
    r, path, now = reader(tmp_path)
    path.write_text('{"done": 1, "total": 4, "unit": "ns", "ns_per_day": 7.5}')
    p = r.read()
    assert p is not None and (p.done, p.total, p.ns_per_day) == (1, 4, 7.5)
    for junk in ("", "  \n", "nan", "-0.5", "inf", "half", '{"done": -1}', "{broken"):
        path.write_text(junk)  # AToM truncates before it writes: an empty file is normal
        assert r.read() is None, f"{junk!r} read as progress"
    path.unlink()
    assert r.read() is None
    with pytest.raises(ValueError, match="progress_total_ns"):
        reader(tmp_path, progress_total_ns=0)


# --------------------------------------------------------------------------- sentinel marks


def test_output_lengths_are_marked_when_the_sentinel_is_removed(tmp_path: Path) -> None:
    """An engine that deletes its sentinel while it checkpoints (AToM-OpenMM) and writes
    outputs continuously: the lengths that belong to the checkpoint are those at the removal,
    not those when the set is later packed (more samples by then)."""
    from relaymd.worker.marks import SentinelMarks

    out, sentinel = tmp_path / "samples.out", tmp_path / "ckpt_is_valid"
    out.write_text("1\n2\n")
    sentinel.write_text("ok")
    marks = SentinelMarks(tmp_path, "ckpt_is_valid",
                          lambda: {"samples.out": out.stat().st_size})
    assert marks.start(), "inotify is not available here"
    try:
        assert marks.take() is None, "a mark before any checkpoint began"
        sentinel.unlink()  # the checkpoint begins: samples 1-2 are its
        time.sleep(0.2)  # writing the checkpoint files
        sentinel.write_text("ok")
        with out.open("a") as fh:
            fh.write("3\n4\n")  # the next cycles, before the worker packs the set
        mark = marks.take()
        assert mark is not None and mark.exact and mark.lengths == {"samples.out": 4}, mark
        gen = marks.generation()
        assert marks.take() == mark, "an unshipped set keeps its mark"
        marks.shipped(mark)
        assert marks.take() is None, "a mark served a second set"
        sentinel.unlink()
        sentinel.write_text("ok")  # a new checkpoint while the last was being packed
        assert marks.generation() == gen + 1
        assert marks.take() is not None
    finally:
        marks.close()
    assert marks._thread is not None and not marks._thread.is_alive()

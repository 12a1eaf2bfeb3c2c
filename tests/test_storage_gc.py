"""Checkpoint garbage collection, `purge` and `relaymd checkpoints`, on file:// and on s3://
(moto): the orchestrator keeps exactly the newest K checkpoints of a job in storage and its
records, deletes a finished job everywhere on request, and the CLI fetches a verified checkpoint."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaymd.client import ApiError
from relaymd.models import CheckpointReport
from relaymd.storage import checkpoint_key, job_prefix

from .conftest import RunningOrchestrator, make_settings, s3_settings, submit
from .test_cli import one_line_error, relaymd

KEEP = 3


@pytest.fixture(params=["file", "s3"])
def orch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningOrchestrator]:
    if request.param == "s3":
        settings = s3_settings(request.getfixturevalue("moto_server"), tmp_path / "home",
                               checkpoint_keep=KEEP)
    else:
        settings = make_settings(tmp_path / "home", checkpoint_keep=KEEP)
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()


def tarball(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


class StandIn:
    """A worker driven by hand: claims a job and uploads checkpoints the way the worker does."""

    def __init__(self, orch: RunningOrchestrator, job_id: str) -> None:
        self.orch, self.job_id = orch, job_id
        self.client, _ = orch.worker(gpus=1)
        a = self.client.claim()
        assert a is not None and a.job.id == job_id, "stand-in could not claim the job"
        self.attempt = a.attempt
        self.storage = orch.settings.open_storage()

    def upload(self, step: int) -> CheckpointReport:
        r = self.client.reserve_checkpoint(self.job_id, self.attempt)
        blob = tarball({"state.json": json.dumps({"step": step}).encode()})
        self.storage.put_bytes(r.key, blob, overwrite=True)
        manifest = {"seq": r.seq, "files": {}}  # the orchestrator reads its `files` map
        self.storage.put_bytes(r.manifest_key, json.dumps(manifest).encode(), overwrite=True)
        return CheckpointReport(attempt=self.attempt, seq=r.seq,
                                sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))

    def checkpoint(self, step: int) -> int:
        report = self.upload(step)
        self.client.report_checkpoint(self.job_id, report)
        self.orch.call(self.orch.service.drain())  # the prune runs in the background
        return report.seq


def stored_seqs(orch: RunningOrchestrator, job_id: str) -> list[str]:
    prefix = checkpoint_key(job_id, 0).rpartition("/")[0] + "/"
    return [k.rpartition("/")[2] for k in orch.settings.open_storage().list(prefix)]


def test_gc_keeps_exactly_the_newest_k_and_sweeps_unreported_uploads(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    op = orch.operator()
    job_id = submit(op, tmp_path)
    w = StandIn(orch, job_id)
    for step in range(1, 7):
        w.checkpoint(step)
        kept = list(range(max(1, step - KEEP + 1), step + 1))
        want = sorted(f"{s:06d}.{ext}" for s in kept for ext in ("json", "tar.gz"))
        assert stored_seqs(orch, job_id) == want, f"after checkpoint {step}"
        assert [c.seq for c in op.get_job(job_id).checkpoint_list] == kept
    d = op.get_job(job_id)
    assert (d.checkpoints, d.latest_checkpoint) == (6, 6), "the accepted count or pointer moved"

    orphan = w.upload(70)  # a worker uploaded checkpoint 7 and died before reporting it
    assert orphan.seq == 7
    w.checkpoint(8)  # keep 5, 6, 8: the orphan is newer than the oldest kept one, so it stays
    assert "000007.tar.gz" in stored_seqs(orch, job_id)
    w.checkpoint(9)
    w.checkpoint(10)  # keep 8, 9, 10: everything below 8 goes, reported or not
    assert stored_seqs(orch, job_id) == sorted(
        f"{s:06d}.{ext}" for s in (8, 9, 10) for ext in ("json", "tar.gz"))


def test_purge_refuses_a_live_job_then_deletes_everything_of_a_finished_one(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    op = orch.operator()
    job_id = submit(op, tmp_path, title="doomed")
    other = submit(op, tmp_path, title="bystander")
    w = StandIn(orch, job_id)
    w.checkpoint(1)
    storage = orch.settings.open_storage()
    before = storage.list(job_prefix(job_id))
    assert len(before) >= 3, f"bundle and a checkpoint expected in storage: {before}"
    with pytest.raises(ApiError) as err:
        op.purge(job_id)
    assert err.value.status == 409 and "cancel it first" in err.value.message
    assert storage.list(job_prefix(job_id)) == before, "a refused purge deleted objects"

    op.cancel(job_id)
    result = op.purge(job_id[:10])
    assert result == {"job_id": job_id, "objects_deleted": len(before), "database": True}
    assert storage.list(job_prefix(job_id)) == []
    with pytest.raises(ApiError) as err:
        op.get_job(job_id)
    assert err.value.status == 404
    assert [j.id for j in op.all_jobs()] == [other], "the listing still shows the purged job"
    assert storage.list(job_prefix(other)), "the other job's objects were touched"
    with pytest.raises(ApiError) as err:
        op.purge(job_id)
    assert err.value.status == 404 and "nothing stored" in err.value.message


def cli_env(orch: RunningOrchestrator) -> dict[str, str]:
    env = {"RELAYMD_URL": orch.url, "RELAYMD_TOKEN": orch.tokens()["operator"]}
    env.update(orch.settings.storage_env())
    return env


def test_checkpoints_cli_lists_downloads_verifies_and_purge_asks_first(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    op = orch.operator()
    job_id = submit(op, tmp_path)
    w = StandIn(orch, job_id)
    for step in (10, 20, 30, 40):
        w.checkpoint(step)
    home, env = tmp_path / "cli-home", cli_env(orch)

    listed = relaymd(home, "checkpoints", job_id[:8], "--json", **env)
    assert listed.returncode == 0, listed.stderr
    assert [c["seq"] for c in json.loads(listed.stdout)] == [2, 3, 4]
    table = relaymd(home, "checkpoints", job_id[:8], **env)
    assert table.returncode == 0 and "SEQ" in table.stdout and "SHA256" in table.stdout

    got = relaymd(home, "checkpoints", job_id[:8], "--download", str(tmp_path / "latest"), **env)
    assert got.returncode == 0, got.stderr
    assert json.loads((tmp_path / "latest" / "state.json").read_text()) == {"step": 40}
    older = relaymd(home, "checkpoints", job_id, "--download", str(tmp_path / "older"),
                    "--seq", "2", **env)
    assert older.returncode == 0, older.stderr
    assert json.loads((tmp_path / "older" / "state.json").read_text()) == {"step": 20}
    gone = relaymd(home, "checkpoints", job_id, "--download", str(tmp_path / "x"), "--seq", "1",
                   **env)
    assert "no checkpoint 1" in one_line_error(gone, 1)
    again = relaymd(home, "checkpoints", job_id, "--download", str(tmp_path / "latest"), **env)
    assert "not an empty directory" in one_line_error(again, 1)

    # a checkpoint whose bytes no longer match the recorded sha256 is refused, nothing extracted
    key = op.get_job(job_id).checkpoint_list[-1].key
    storage = orch.settings.open_storage()
    storage.put_bytes(key, tarball({"state.json": b'{"step": -1}'}), overwrite=True)
    bad = relaymd(home, "checkpoints", job_id, "--download", str(tmp_path / "bad"), **env)
    assert "sha256" in one_line_error(bad, 1)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())

    op.cancel(job_id)
    refused = relaymd(home, "purge", job_id[:8], **env)  # no terminal and no --yes
    assert "without --yes" in one_line_error(refused, 1)
    assert op.get_job(job_id).status == "cancelled", "purged without confirmation"
    done = relaymd(home, "purge", job_id[:8], "--yes", "--json", **env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["objects_deleted"] > 0
    with pytest.raises(ApiError):
        op.get_job(job_id)

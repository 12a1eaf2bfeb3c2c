"""The HTTP API on a real loopback server: claim storm, stale reaping, every 4xx path, auth."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from relaymd.client import ApiError, Client
from relaymd.models import CheckpointReport, WorkerRegister
from relaymd.storage import open_storage

from .conftest import FakeClock, RunningOrchestrator, submit

_http = httpx.Client(timeout=10)  # one client: building an SSL context per call costs ~40 ms


def raw(server: RunningOrchestrator, method: str, path: str, token: str | None = None,
        **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return _http.request(method, server.url + path, headers=headers, **kw)


# ---------------------------------------------------------------- claim storm


def test_claim_storm_never_double_assigns_nor_starves(server: RunningOrchestrator,
                                                      tmp_path: Path) -> None:
    op = server.operator()
    job_ids = {submit(op, tmp_path) for _ in range(200)}
    tokens = server.tokens()
    claimers = 60
    got: list[str] = []
    empty_while_queued: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(claimers)

    def claimer(i: int) -> None:
        c = Client(server.url, tokens["worker"])
        reg = c.register(WorkerRegister(hostname=f"h{i}", gpus=1))
        c.set_token(reg.token)
        barrier.wait()
        while True:
            a = c.claim()
            if a is None:
                # "no job" is only allowed once nothing is queued any more
                left = op_thread.list_jobs(["queued"], limit=1).jobs
                if left:
                    with lock:
                        empty_while_queued.append(i)
                return
            with lock:
                got.append(a.job.id)
            c.complete(a.job.id, a.attempt)

    op_thread = Client(server.url, tokens["operator"])
    with ThreadPoolExecutor(claimers) as pool:
        list(pool.map(claimer, range(claimers)))
    dupes = [j for j, n in Counter(got).items() if n > 1]
    assert dupes == [], f"jobs assigned twice: {dupes[:5]}"
    assert set(got) == job_ids
    assert empty_while_queued == []
    claims = [e for j in list(job_ids)[:20] for e in op.get_job(j).events if e.kind == "claim"]
    assert len(claims) == 20


# ---------------------------------------------------------------- stale reaping


def test_silent_worker_goes_stale_and_its_job_is_requeued(
        server: RunningOrchestrator, clock: FakeClock, tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    w, wid = server.worker()
    a = w.claim()
    assert a is not None
    w.heartbeat(wid, job_id, 1)
    # keep its checkpoint so the next attempt resumes from it
    r = w.reserve_checkpoint(job_id, 1)
    data = b"ckpt"
    open_storage(server.settings.storage).put_bytes(r.key, data)
    w.report_checkpoint(job_id, CheckpointReport(attempt=1, seq=r.seq, size=len(data),
                                                 sha256=hashlib.sha256(data).hexdigest()))
    other, other_id = server.worker()
    clock.advance(30)
    other.heartbeat(other_id)
    assert server.call(server.service.reap()) == 0  # 30 s < 45 s timeout
    clock.advance(20)
    other.heartbeat(other_id)
    assert server.call(server.service.reap()) == 1
    job = op.get_job(job_id)
    assert job.status == "queued" and job.failures == 0 and job.latest_checkpoint == r.seq
    assert job.events[-1].kind == "lose"
    states = {x.id: x.status for x in op.workers()}
    assert states == {wid: "stale", other_id: "idle"}
    # the old worker wakes up: its lease is gone (409), and it may work again as idle
    with pytest.raises(ApiError) as err:
        w.heartbeat(wid, job_id, 1)
    assert err.value.status == 409 and err.value.body["from"] == "queued"
    assert {x.id: x.status for x in op.workers()}[wid] == "idle"
    b = other.claim()
    assert b is not None and b.attempt == 2 and b.checkpoint_key == r.key


def test_cancel_tells_the_worker_to_stop(server: RunningOrchestrator, tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    w, wid = server.worker()
    a = w.claim()
    assert a is not None
    assert op.cancel(job_id[:10]).status == "cancelled"
    reply = w.heartbeat(wid, job_id, 1)
    assert reply.directive == "stop" and "cancel" in reply.reason
    assert w.claim() is None  # the worker was freed by the cancel
    with pytest.raises(ApiError) as err:
        w.complete(job_id, 1)
    assert err.value.status == 409 and err.value.body["from"] == "cancelled"


def test_requeue_of_running_job_fences_old_worker(server: RunningOrchestrator,
                                                  tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    w, wid = server.worker()
    assert w.claim() is not None
    w.heartbeat(wid, job_id, 1)
    assert op.requeue(job_id).status == "queued"
    with pytest.raises(ApiError) as err:
        w.heartbeat(wid, job_id, 1)
    assert err.value.status == 409


# ---------------------------------------------------------------- 4xx paths


def test_bad_json_and_bad_bodies(server: RunningOrchestrator) -> None:
    w, wid = server.worker()
    token = w.http.headers["Authorization"][7:]
    r = raw(server, "POST", f"/api/v1/workers/{wid}/heartbeat", token, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"] == "bad_json"
    r = raw(server, "POST", f"/api/v1/workers/{wid}/heartbeat", token, json={"bogus": 1})
    assert r.status_code == 422 and r.json()["error"] == "invalid_body"
    assert "bogus" in r.json()["message"]
    r = raw(server, "POST", f"/api/v1/workers/{wid}/heartbeat", token, json={"attempt": 0})
    assert r.status_code == 422
    r = raw(server, "POST", f"/api/v1/workers/{wid}/heartbeat", token, json=[1, 2])
    assert r.status_code == 422


def test_oversized_body_is_refused(server: RunningOrchestrator) -> None:
    w, wid = server.worker()
    token = w.http.headers["Authorization"][7:]
    big = b'{"pad": "' + b"x" * (2 << 20) + b'"}'
    r = raw(server, "POST", f"/api/v1/workers/{wid}/heartbeat", token, content=big)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_unknown_job_and_route(server: RunningOrchestrator) -> None:
    op = server.operator()
    with pytest.raises(ApiError) as err:
        op.get_job("deadbeef")
    assert err.value.status == 404
    with pytest.raises(ApiError) as err:
        op.cancel("not-hex!")
    assert err.value.status == 404
    r = raw(server, "GET", "/api/v1/nope", server.tokens()["operator"])
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = raw(server, "GET", "/api/v1/jobs?status=bogus", server.tokens()["operator"])
    assert r.status_code == 400 and "bogus" in r.json()["message"]
    r = raw(server, "GET", "/api/v1/jobs?limit=0", server.tokens()["operator"])
    assert r.status_code == 400
    w, _ = server.worker()
    with pytest.raises(ApiError) as err:
        w.complete("f" * 32, 1)
    assert err.value.status == 404


def test_ambiguous_prefix(server: RunningOrchestrator, tmp_path: Path) -> None:
    op = server.operator()
    ids = [submit(op, tmp_path) for _ in range(40)]
    first = Counter(i[0] for i in ids).most_common(1)[0][0]
    with pytest.raises(ApiError) as err:
        op.get_job(first)
    assert err.value.status == 409 and err.value.code == "ambiguous_job"


def test_stale_attempt_conflict_body(server: RunningOrchestrator, tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    w, _ = server.worker()
    assert w.claim() is not None
    with pytest.raises(ApiError) as err:
        w.complete(job_id, 7)
    body = err.value.body
    assert err.value.status == 409
    assert (body["error"], body["job_id"], body["from"], body["to"], body["attempt"]) == (
        "job_transition_conflict", job_id, "assigned", "completed", 1)


def test_checkpoint_report_needs_the_object_in_storage(server: RunningOrchestrator,
                                                       tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    w, _ = server.worker()
    assert w.claim() is not None
    r = w.reserve_checkpoint(job_id, 1)
    report = CheckpointReport(attempt=1, seq=r.seq, sha256="0" * 64, size=4)
    with pytest.raises(ApiError) as err:
        w.report_checkpoint(job_id, report)
    assert err.value.status == 422 and err.value.code == "checkpoint_missing"
    open_storage(server.settings.storage).put_bytes(r.key, b"12345")
    with pytest.raises(ApiError) as err:
        w.report_checkpoint(job_id, report)
    assert err.value.code == "checkpoint_size_mismatch"
    assert op.get_job(job_id).checkpoints == 0


def test_invalid_bundles_are_refused_at_submit(server: RunningOrchestrator,
                                               tmp_path: Path) -> None:
    import tarfile
    import uuid

    op = server.operator()
    token = server.tokens()["operator"]
    # no relaymd.yaml
    src = tmp_path / "nospec"
    src.mkdir()
    (src / "a.txt").write_text("a")
    bundle = tmp_path / "b.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(src / "a.txt", "a.txt")
    with pytest.raises(ApiError) as err:
        op.upload_bundle(uuid.uuid4().hex, bundle)
    assert err.value.status == 422 and "relaymd.yaml" in err.value.message
    # relaymd.yaml with a bad field
    (src / "relaymd.yaml").write_text("command: run\nmax_attempts: zero\n")
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(src / "relaymd.yaml", "relaymd.yaml")
    with pytest.raises(ApiError) as err:
        op.upload_bundle(uuid.uuid4().hex, bundle)
    assert "max_attempts" in err.value.message
    # an absolute path inside the tar
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(src / "relaymd.yaml", "relaymd.yaml")
        info = tarfile.TarInfo("/etc/evil")  # TarInfo keeps the slash that tar.add() strips
        info.size = 1
        tar.addfile(info, __import__("io").BytesIO(b"x"))
    with pytest.raises(ApiError) as err:
        op.upload_bundle(uuid.uuid4().hex, bundle)
    assert err.value.status == 422 and "/etc/evil" in err.value.message
    # garbage
    r = raw(server, "PUT", f"/api/v1/jobs/{uuid.uuid4().hex}/bundle", token, content=b"nope")
    assert r.status_code == 422
    # creating a job without its bundle
    r = raw(server, "POST", "/api/v1/jobs", token, json={"id": uuid.uuid4().hex})
    assert r.status_code == 409 and r.json()["error"] == "bundle_missing"
    assert op.list_jobs().jobs == []


# ---------------------------------------------------------------- auth

OPERATOR_ROUTES = [("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/api/v1/workers"),
                   ("GET", "/metrics"), ("GET", "/api/v1/jobs/abc"),
                   ("POST", "/api/v1/jobs/abc/cancel"), ("POST", "/api/v1/jobs/abc/requeue"),
                   ("PUT", "/api/v1/jobs/" + "a" * 32 + "/bundle"), ("DELETE", "/api/v1/jobs/abc")]
WORKER_ROUTES = [("POST", "/api/v1/jobs/claim"), ("POST", "/api/v1/jobs/" + "a" * 32 + "/fail"),
                 ("POST", "/api/v1/jobs/" + "a" * 32 + "/complete"),
                 ("POST", "/api/v1/jobs/" + "a" * 32 + "/release"),
                 ("POST", "/api/v1/jobs/" + "a" * 32 + "/checkpoints"),
                 ("POST", "/api/v1/jobs/" + "a" * 32 + "/checkpoints/reserve")]


def test_every_route_refuses_missing_wrong_and_misscoped_tokens(
        server: RunningOrchestrator) -> None:
    tokens = server.tokens()
    w, wid = server.worker()
    session = w.http.headers["Authorization"][7:]
    worker_routes = WORKER_ROUTES + [("POST", f"/api/v1/workers/{wid}/heartbeat"),
                                     ("POST", f"/api/v1/workers/{wid}/deregister")]
    cases = []
    for route in OPERATOR_ROUTES:
        cases += [(route, None, 401), (route, "wrong", 401), (route, session, 403),
                  (route, tokens["worker"], 403)]
    for route in worker_routes:
        cases += [(route, None, 401), (route, "wrong", 401), (route, tokens["operator"], 403),
                  (route, tokens["worker"], 403)]
    reg = ("POST", "/api/v1/workers/register")
    cases += [(reg, None, 401), (reg, "wrong", 401), (reg, tokens["operator"], 403),
              (reg, session, 403)]
    for (method, path), token, expected in cases:
        r = raw(server, method, path, token, json={})
        assert r.status_code == expected, (method, path, token and token[:4], r.text)
    assert raw(server, "GET", "/healthz").status_code == 200


def test_worker_cannot_touch_another_workers_job(server: RunningOrchestrator,
                                                 tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    a, aid = server.worker()
    b, bid = server.worker()
    assert a.claim() is not None
    for call in (lambda: b.complete(job_id, 1), lambda: b.fail(job_id, 1, 1, "x"),
                 lambda: b.release(job_id, 1), lambda: b.reserve_checkpoint(job_id, 1),
                 lambda: b.heartbeat(bid, job_id, 1)):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.status == 403, err.value.message
    r = raw(server, "POST", f"/api/v1/workers/{aid}/heartbeat",
            b.http.headers["Authorization"][7:], json={})
    assert r.status_code == 403
    assert op.get_job(job_id).status == "assigned"


def test_deregistered_worker_token_stops_working(server: RunningOrchestrator,
                                                 tmp_path: Path) -> None:
    op = server.operator()
    job_id = submit(op, tmp_path)
    w, wid = server.worker()
    assert w.claim() is not None
    w.deregister(wid)
    assert op.get_job(job_id).status == "queued"
    with pytest.raises(ApiError) as err:
        w.heartbeat(wid)
    assert err.value.status == 401


def test_metrics_and_health(server: RunningOrchestrator, tmp_path: Path) -> None:
    op = server.operator()
    submit(op, tmp_path)
    r = raw(server, "GET", "/metrics", server.tokens()["operator"])
    assert r.status_code == 200
    assert 'relaymd_jobs{state="queued"} 1' in r.text
    assert 'relaymd_http_requests_total{route="create_job",status="201"} 1' in r.text
    assert "relaymd_http_request_duration_seconds_bucket" in r.text
    assert raw(server, "GET", "/healthz").json()["status"] == "ok"


def test_a_checkpoint_reports_progress_newer_than_the_last_heartbeat(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    """A listing between heartbeats shows the progress of the newest accepted checkpoint, not
    the older figure of the heartbeat before it."""
    from relaymd.models import Progress

    op = server.operator()
    job_id = submit(op, tmp_path)
    w, wid = server.worker()
    assert w.claim() is not None
    w.heartbeat(wid, job_id, 1, Progress(done=1, total=10, unit="ns"))
    r = w.reserve_checkpoint(job_id, 1)
    data = b"ckpt"
    open_storage(server.settings.storage).put_bytes(r.key, data)
    w.report_checkpoint(job_id, CheckpointReport(
        attempt=1, seq=r.seq, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        progress=Progress(done=4, total=10, unit="ns")))
    progress = op.get_job(job_id).progress
    assert progress is not None and progress.done == 4, progress
    (listed,) = op.all_jobs()
    assert listed.progress is not None and listed.progress.done == 4, listed.progress


# ---------------------------------------------------------------- usage: GPU-hours, rates, ETAs


def report_checkpoint(server: RunningOrchestrator, w: Client, job_id: str, attempt: int,
                      done: float) -> int:
    """Upload and report one checkpoint at `done` of 100 ns (the engine says 200 ns/day)."""
    from relaymd.models import Progress

    r = w.reserve_checkpoint(job_id, attempt)
    data = f"state-{r.seq}".encode()
    open_storage(server.settings.storage).put_bytes(r.key, data)
    w.report_checkpoint(job_id, CheckpointReport(
        attempt=attempt, seq=r.seq, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        progress=Progress(done=done, total=100, unit="ns", ns_per_day=200)))
    return r.seq


def kill_and_resume(server: RunningOrchestrator, clock: FakeClock, tmp_path: Path
                    ) -> tuple[str, Client]:
    """A job whose first worker (2 GPUs) checkpoints 1 h in and is killed half an hour later;
    a 1-GPU worker resumes it from that checkpoint 10 min on and checkpoints at 10 ns/h:

      attempt 1: 1.5 h x 2 GPUs = 3 GPU-h, of which the 0.5 h after its checkpoint (1 GPU-h)
                 is redone by attempt 2;
      attempt 2: 2 h x 1 GPU so far = 2 GPU-h;
      so 5 GPU-h, 1 redone, 4 useful. ETA: 68 ns left at 10 ns/h (the rate between attempt
      2's checkpoints, not the engine's 200 ns/day) = 6.8 h = 24480 s.
    Returns the job and the worker running it (attempt 2)."""
    job_id = submit(server.operator(), tmp_path, title="villin", gpus=1)
    w1, wid1 = server.worker(gpus=2)
    assert w1.claim() is not None
    clock.advance(3600)
    first = report_checkpoint(server, w1, job_id, 1, done=10)
    clock.advance(1800)
    w1.deregister(wid1)  # killed: the job is lost back to the queue
    w2, _ = server.worker(gpus=1)
    clock.advance(600)
    resumed = w2.claim()
    assert resumed is not None and resumed.checkpoint_seq == first, resumed
    clock.advance(3600)
    report_checkpoint(server, w2, job_id, 2, done=22)
    clock.advance(3600)
    report_checkpoint(server, w2, job_id, 2, done=32)
    return job_id, w2


def test_job_detail_usage_and_metrics_count_useful_and_redone_gpu_hours(
        server: RunningOrchestrator, clock: FakeClock, tmp_path: Path) -> None:
    op = server.operator()
    job_id, worker = kill_and_resume(server, clock, tmp_path)
    submit(op, tmp_path, title="never ran")
    detail = op.get_job(job_id)
    assert (detail.gpu_hours, detail.gpu_hours_useful, detail.gpu_hours_redone) == \
        pytest.approx((5.0, 4.0, 1.0)), detail
    assert detail.ns_per_day == 200 and detail.eta_seconds == pytest.approx(24480), detail

    spent = op.usage()
    assert [(c.cluster, c.attempts) for c in spent.clusters] == [("local", 2)], spent.clusters
    (local,) = spent.clusters
    assert (local.gpu_hours, local.gpu_hours_useful, local.gpu_hours_redone) == \
        pytest.approx((5.0, 4.0, 1.0)), local
    (job,) = spent.jobs  # the job never claimed has used nothing and is not listed
    assert (job.id, job.title, job.attempts, job.eta_seconds) == \
        (job_id, "villin", 2, pytest.approx(24480)), job
    assert (spent.gpu_hours, spent.gpu_hours_redone) == pytest.approx((5.0, 1.0)), spent

    text = raw(server, "GET", "/metrics", server.tokens()["operator"]).text
    assert 'relaymd_gpu_hours{cluster="local",kind="useful"} 4.0\n' in text, text
    assert 'relaymd_gpu_hours{cluster="local",kind="redone"} 1.0\n' in text, text

    # The running attempt keeps counting (a cached history is not a frozen one) ...
    clock.advance(1800)
    assert op.usage().gpu_hours == pytest.approx(5.5)
    # ... and stops when it completes; a finished job has no ETA.
    worker.complete(job_id, 2)
    clock.advance(3600)
    detail = op.get_job(job_id)
    assert (detail.gpu_hours, detail.gpu_hours_redone, detail.eta_seconds) == \
        (pytest.approx(5.5), pytest.approx(1.0), None), detail
    assert op.usage().gpu_hours == pytest.approx(5.5)
    # A purged job's hours go with it.
    op.purge(job_id)
    after = op.usage()
    assert (after.jobs, after.gpu_hours, after.clusters) == ([], 0, []), after

"""Property-based fuzzing of every HTTP API route against one real running orchestrator.

Hypothesis draws path parameters (real ids, prefixes, random hex, unicode, '..', '%2e%2e', very
long and empty strings), query strings, bodies (JSON shaped like the route's model with wrong
types, edge and huge numbers, nulls, nested junk and extra keys; arbitrary JSON; raw, invalid
UTF-8 and truncated bytes), content types, tokens and hostile job bundles, and sends them over
loopback to a real orchestrator (uvicorn + SQLite + file storage, see conftest). Every answer must
come within a timeout, be 2xx or 4xx (never 5xx), a 2xx must match the documented reply model and
an error must be JSON with `error` and `message`. Afterwards the orchestrator must be healthy and
its jobs and workers consistent.

Bugs this fuzzer found are reproduced one by one by the `test_found_*` tests at the end of the
file (all fixed; 15 of them: int64 overflows, deep nesting, lone surrogates, infinities, impossible
YAML values, dates outside the datetime range, client hang-ups, a tiny bundle declaring a huge
member). The strategies draw those inputs too, so the fuzzing keeps guarding the fixes; a new bug
is kept out of the fuzzing by `known_bug()` until it is fixed.

RELAYMD_FUZZ_SCALE=10 multiplies the number of examples for a longer hunt; RELAYMD_FUZZ_KNOWN_BUGS=1
stops skipping the known bugs (to check a fix).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import re
import socket
import string
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlencode

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from relaymd.models import (
    LEASED_JOB_STATES,
    Assignment,
    BundleUploaded,
    CheckpointRejected,
    CheckpointReport,
    CheckpointReserved,
    ClusterInfo,
    Complete,
    Fail,
    Health,
    Heartbeat,
    HeartbeatReply,
    Job,
    JobCreate,
    JobDetail,
    JobPage,
    JobStatus,
    Lease,
    Release,
    Usage,
    Worker,
    WorkerRegister,
    WorkerRegistered,
    WorkerStatus,
)
from relaymd.storage import bundle_key, open_storage

from .conftest import RunningOrchestrator, make_settings, submit

MAX_BODY = 65536  # the fuzzed orchestrator's max_body_bytes
MAX_BUNDLE = 256 * 1024  # and its max_bundle_bytes
TIMEOUT = 10.0  # seconds an answer may take before the request counts as hung
SCALE = float(os.environ.get("RELAYMD_FUZZ_SCALE", "1"))
KNOWN_BUGS_TOO = os.environ.get("RELAYMD_FUZZ_KNOWN_BUGS") == "1"  # do not skip them (after a fix)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


FUZZ = settings(deadline=None, max_examples=examples(60), suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much,
    HealthCheck.data_too_large])


# --------------------------------------------------------------------------- routes


class Purged(BaseModel):
    job_id: str
    objects_deleted: int
    database: bool


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    name: str  # the endpoint's name in relaymd.server.api (and in /metrics)
    scope: str | None  # the token scope it needs
    model: type[BaseModel] | None = None  # the JSON body it reads
    reply: Any = None  # what a 2xx answer must parse as

    @property
    def params(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.path)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


V1 = "/api/v1"
JOB = V1 + "/jobs/{job_id}"
ROUTES = [
    Route("GET", "/healthz", "healthz", None, reply=Health),
    Route("GET", "/metrics", "metrics", "operator"),
    Route("POST", f"{V1}/jobs", "create_job", "operator", JobCreate, Job),
    Route("GET", f"{V1}/jobs", "list_jobs", "operator", reply=JobPage),
    Route("POST", f"{V1}/jobs/claim", "claim", "worker", reply=Assignment),
    Route("GET", JOB, "get_job", "operator", reply=JobDetail),
    Route("DELETE", JOB, "purge", "operator", reply=Purged),
    Route("PUT", JOB + "/bundle", "upload_bundle", "operator", reply=BundleUploaded),
    Route("POST", JOB + "/cancel", "cancel", "operator", reply=Job),
    Route("POST", JOB + "/requeue", "requeue", "operator", reply=Job),
    Route("POST", JOB + "/checkpoints/reserve", "reserve", "worker", Lease, CheckpointReserved),
    Route("POST", JOB + "/checkpoints", "checkpoint", "worker", CheckpointReport, Job),
    Route("POST", JOB + "/checkpoints/{seq}/reject", "reject", "worker", CheckpointRejected, Job),
    Route("POST", JOB + "/release", "release", "worker", Release, Job),
    Route("POST", JOB + "/complete", "complete", "worker", Complete, Job),
    Route("POST", JOB + "/fail", "fail", "worker", Fail, Job),
    Route("GET", f"{V1}/workers", "list_workers", "operator", reply=list[Worker]),
    Route("GET", f"{V1}/clusters", "list_clusters", "operator", reply=list[ClusterInfo]),
    Route("POST", f"{V1}/clusters/{{name}}/enable", "enable_cluster", "operator", reply=ClusterInfo),
    Route("POST", f"{V1}/clusters/{{name}}/disable", "disable_cluster", "operator", reply=ClusterInfo),
    Route("GET", f"{V1}/usage", "usage", "operator", reply=Usage),
    Route("GET", f"{V1}/tokens", "list_tokens", "operator", reply=list[dict[str, Any]]),
    Route("GET", f"{V1}/tokens/{{name}}", "show_token", "operator", reply=dict[str, str]),
    Route("POST", f"{V1}/tokens/{{name}}/rotate", "rotate_token", "operator", reply=dict[str, str]),
    Route("POST", f"{V1}/workers/register", "register", "bootstrap", WorkerRegister, WorkerRegistered),
    Route("POST", f"{V1}/workers/{{worker_id}}/heartbeat", "heartbeat", "worker", Heartbeat,
          HeartbeatReply),
    Route("POST", f"{V1}/workers/{{worker_id}}/deregister", "deregister", "worker"),
]
BY_NAME = {r.name: r for r in ROUTES}
BUNDLE = BY_NAME["upload_bundle"]
JSON_ROUTES = [r for r in ROUTES if r.model is not None]
SCOPED_ROUTES = [r for r in ROUTES if r.scope is not None]
ADAPTERS = {r.name: TypeAdapter(r.reply) for r in ROUTES if r.reply is not None}


# --------------------------------------------------------------------------- live references


class Ref(NamedTuple):
    """A value only known while the test runs: resolved by `World.ref` just before sending."""

    kind: str  # held, attempt, job, prefix, upper, fresh, pending, self, self-prefix, ...
    arg: int = 0


class Raw(NamedTuple):
    """A path segment put into the URL exactly as written (no percent-encoding by the test)."""

    text: str


class Json(NamedTuple):
    value: Any
    ascii: bool = True


class Cut(NamedTuple):
    """The JSON text of `value`, cut short after `keep` bytes (modulo its length)."""

    value: Any
    keep: int


class Bytes(NamedTuple):
    data: bytes


@dataclass
class Call:
    route: Route
    path: str
    decoded: dict[str, str]  # each path parameter as the server sees it
    query: dict[str, str]
    content: bytes
    content_type: str | None
    auth: str  # how the call authenticates, for the failure report
    authorization: str | bytes | None
    chunked: bool

    @property
    def elsewhere(self) -> bool:
        """httpx drops '.' and '..' segments before sending: then another route answers."""
        return httpx.URL("http://host" + self.path).raw_path.decode() != self.path

    def describe(self, r: httpx.Response | None = None) -> str:
        query = f"?{urlencode(self.query)}" if self.query else ""
        lines = [f"{self.route.method} {self.path}{query}", f"  auth: {self.auth}",
                 f"  content-type: {self.content_type!r}, chunked: {self.chunked}",
                 f"  body ({len(self.content)} bytes): {self.content[:1500]!r}"]
        if r is not None:
            lines.append(f"  -> {r.status_code} {r.text[:1500]!r}")
        return "\n".join(lines)


class World:
    """The orchestrator under fuzz, a plain HTTP client, and the live objects that path
    parameters and bodies refer to: a worker (the holder) that holds a job (the lease), a spare
    worker, a deregistered one, and every job created so far."""

    def __init__(self, server: RunningOrchestrator, root: Path) -> None:
        self.server, self.root, self.url = server, root, server.url
        tokens = server.tokens()
        self.tokens = {"operator": tokens["operator"], "bootstrap": tokens["worker"]}
        self.http = httpx.Client(timeout=TIMEOUT)
        self.op = server.operator()
        self.storage = open_storage(server.settings.storage)
        self.max_body = server.settings.max_body_bytes
        self.max_bundle = server.settings.max_bundle_bytes
        self.jobs: list[str] = []
        self.holder, self.held, self.attempt = "", "", 0
        # The spare ranks below the holder (fewer GPUs, lower provider priority), so a claim by
        # the holder never leaves work aside for it.
        self.other, self.tokens["other"] = self.register(gpus=0, provider="salad", hostname="spare")
        self.gone, gone_token = self.register(hostname="gone")
        assert self.post(f"{V1}/workers/{self.gone}/deregister", gone_token).status_code == 204
        self.lease()

    def close(self) -> None:
        self.http.close()
        self.op.close()

    # -- plumbing ---------------------------------------------------------------------------

    def post(self, path: str, token: str, **kw: Any) -> httpx.Response:
        return self.http.post(self.url + path, headers={"Authorization": f"Bearer {token}"}, **kw)

    def register(self, **fields: Any) -> tuple[str, str]:
        # The fuzzing may have rotated the local cluster's bootstrap token: read the current one.
        self.tokens["bootstrap"] = self.server.tokens()["worker"]
        r = self.post(f"{V1}/workers/register", self.tokens["bootstrap"], json=fields)
        assert r.status_code == 201, r.text
        return r.json()["worker_id"], r.json()["token"]

    def lease(self) -> None:
        """Make sure the holder holds a live job: the fuzzing cancels, requeues, completes and
        fails it, and deregisters or quarantines the holder."""
        if self.held:
            r = self.http.get(f"{self.url}{V1}/jobs/{self.held}",
                              headers={"Authorization": f"Bearer {self.tokens['operator']}"})
            if r.status_code == 200:
                job = r.json()
                if (job["status"] in LEASED_JOB_STATES and job["worker_id"] == self.holder
                        and job["attempt"] == self.attempt):
                    return
        if self.holder:  # idle, gone or quarantined by now: retire it, hand back what it holds
            self.post(f"{V1}/workers/{self.holder}/deregister", self.tokens["worker"])
        # Tops every other idle worker's rank, so its claim never sets work aside for them.
        self.holder, self.tokens["worker"] = self.register(
            gpus=64, provider="slurm", vram_gb=1e300, hostname="holder")
        for _ in range(5):
            self.jobs.append(submit(self.op, self.root))
            r = self.post(f"{V1}/jobs/claim", self.tokens["worker"])
            if r.status_code == 200:
                assignment = r.json()
                self.held, self.attempt = assignment["job"]["id"], assignment["attempt"]
                return
        raise AssertionError(f"the holder could not claim a job: {r.status_code} {r.text}")

    def pending(self) -> str:
        """The id of a job whose bundle is uploaded but which is not created yet."""
        job_id = uuid.uuid4().hex
        r = self.http.put(f"{self.url}{V1}/jobs/{job_id}/bundle", content=VALID_BUNDLE,
                          headers={"Authorization": f"Bearer {self.tokens['operator']}"})
        assert r.status_code == 201, r.text
        return job_id

    def ref(self, r: Ref) -> Any:
        k, n = r.kind, r.arg
        if k == "held":
            return self.held
        if k == "attempt":
            return self.attempt + n
        if k == "job":
            return self.jobs[n % len(self.jobs)]
        if k == "prefix":
            return self.held[:1 + n % 31]
        if k == "upper":
            return self.held.upper()
        if k == "fresh":
            return uuid.uuid4().hex
        if k == "pending":
            return self.pending()
        if k == "self":
            return self.holder
        if k == "self-prefix":
            return self.holder[:1 + n % 31]
        if k == "self-upper":
            return self.holder.upper()
        if k == "other":
            return self.other
        if k == "gone":
            return self.gone
        raise AssertionError(f"unknown reference {r}")

    def resolve(self, value: Any) -> Any:
        if isinstance(value, Ref):
            return self.ref(value)
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def materialize(self, spec: Json | Cut | Bytes) -> bytes:
        if isinstance(spec, Bytes):
            return spec.data
        text = json.dumps(self.resolve(spec.value),
                          ensure_ascii=spec.ascii if isinstance(spec, Json) else True
                          ).encode("utf-8", "surrogatepass")  # a raw lone surrogate: invalid UTF-8
        if isinstance(spec, Cut):
            return text[:spec.keep % (len(text) + 1)]
        return text

    def bearer(self, scope: str | None) -> str | None:
        return None if scope is None else f"Bearer {self.tokens[scope]}"

    # -- calls ------------------------------------------------------------------------------

    def call(self, route: Route, values: dict[str, Any], *, query: dict[str, str] | None = None,
             content: bytes = b"", content_type: str | None = "application/json",
             authorization: Any = ..., auth: str = "right",
             chunked: bool = False) -> Call:
        path, decoded = route.path, {}
        for name, value in values.items():
            value = self.ref(value) if isinstance(value, Ref) else value
            if isinstance(value, Raw):
                segment, decoded[name] = value.text, unquote(value.text)
            else:
                segment, decoded[name] = quote(str(value), safe=""), str(value)
            path = path.replace("{" + name + "}", segment)
        if authorization is ...:
            authorization = self.bearer(route.scope)
        return Call(route, path, decoded, dict(query or {}), content, content_type, auth,
                    authorization, chunked)

    def draw_call(self, data: st.DataObject, route: Route) -> Call:
        params = WORKER_PATH_PARAMS if route.scope == "worker" else PATH_PARAMS
        values = {p: data.draw(params[p], label=p) for p in route.params}
        query = data.draw(QUERIES.get(route.name, st.just({})), label="query")
        spec = data.draw(route_bodies(route), label="body")
        return self.call(route, values, query=query, content=self.materialize(spec),
                         content_type=data.draw(CONTENT_TYPES, label="content-type"),
                         chunked=data.draw(st.booleans(), label="chunked"))

    def send(self, call: Call) -> httpx.Response:
        headers = {}
        if call.authorization is not None:
            headers["Authorization"] = call.authorization
        if call.content_type is not None:
            headers["Content-Type"] = call.content_type
        content: bytes | Iterator[bytes] = call.content
        if call.chunked:  # no Content-Length: the server must count while it reads
            half = len(call.content) // 2
            content = iter([call.content[:half], call.content[half:]])
        try:
            return self.http.request(call.route.method, self.url + call.path,
                                     params=call.query or None, headers=headers, content=content)
        except httpx.TimeoutException:
            raise AssertionError(f"no answer within {TIMEOUT:g}s (a hang):\n{call.describe()}"
                                 ) from None
        except httpx.TransportError as exc:
            raise AssertionError(f"connection failed ({exc!r}):\n{call.describe()}") from None

    def settle(self, call: Call, r: httpx.Response, body: Any) -> None:
        """Bookkeeping after a call that changed something."""
        if call.route.name == "register" and r.status_code == 201:
            # A fresh idle worker may outrank the holder, whose claims would then set work aside
            # for it: let it go at once (exercising deregister with a fresh session token).
            gone = self.post(f"{V1}/workers/{body['worker_id']}/deregister", body["token"])
            assert gone.status_code == 204, gone.text
        elif call.route.name == "create_job" and r.status_code == 201:
            self.jobs.append(body["id"])


def strict_json(raw: bytes) -> Any:
    """Parse JSON refusing NaN and Infinity, which are not JSON."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(raw, parse_constant=refuse)


def check(call: Call, r: httpx.Response) -> Any:
    """The properties every answer has; returns its JSON (None for 204 and /metrics)."""
    where = call.describe(r)
    assert r.status_code < 500, f"server error:\n{where}"
    assert 200 <= r.status_code < 300 or r.status_code >= 400, f"unexpected status:\n{where}"
    if r.status_code == 204:
        assert r.content == b"", where
        return None
    if call.route.name == "metrics" and r.status_code == 200:
        assert r.headers["content-type"].startswith("text/plain"), where
        return None
    try:
        body = strict_json(r.content)
    except ValueError as exc:
        raise AssertionError(f"answer is not JSON ({exc}):\n{where}") from None
    if r.status_code >= 400:
        assert isinstance(body, dict), where
        assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), where
        if r.status_code == 401:
            assert r.headers.get("www-authenticate") == "Bearer", where
    elif call.route.name in ADAPTERS and not call.elsewhere:
        try:
            ADAPTERS[call.route.name].validate_json(r.content)
        except ValidationError as exc:
            raise AssertionError(f"answer does not match {call.route.reply}: {exc}\n{where}"
                                 ) from None
    return body


# --------------------------------------------------------------------------- known bugs

def known_bug(call: Call) -> str | None:
    """Which known bug this call would hit, so the fuzzing skips it: none now. The bugs found so
    far are fixed, each has its regression test (`test_found_*`) at the end of the file and the
    strategies above draw their inputs; a newly found one goes here until it is fixed (unless
    RELAYMD_FUZZ_KNOWN_BUGS=1, to check a fix)."""
    if KNOWN_BUGS_TOO:
        return None
    del call
    return None


# --------------------------------------------------------------------------- strategies

EDGE_INTS = [0, 1, -1, 2, 3, 31, 32, 33, 63, 64, 65, 999, 1000, 1001, -999, -1000, -1001,
             2**31 - 1, 2**31, 2**53, 2**53 + 1, INT64_MAX, INT64_MIN]
INTS = st.one_of(st.integers(-10, 1100), st.sampled_from(EDGE_INTS), st.integers(INT64_MIN, INT64_MAX))
HUGE = st.one_of(st.integers(INT64_MAX + 1, 2**256), st.integers(-(2**256), INT64_MIN - 1),
                 st.sampled_from([2**63, 2**64, 10**100]))
FLOATS = st.one_of(st.floats(),  # NaN and infinities included (sent as JSON's NaN/Infinity)
                   st.sampled_from([0.0, -0.0, 5e-324, -1e-300, 0.5, 59.999, 60.0, 60.0000001,
                                    1e15, 1e308, -1e308, float("inf"), float("-inf")]))
LENGTHS = [31, 32, 33, 49, 50, 51, 99, 100, 101, 199, 200, 201, 254, 255, 256, 499, 500, 501, 1999,
           2000, 2001]
ODD_STRINGS = ["", " ", "\t", "\r\n", "\x00", "\x7f", "\\", "..", ".", "../x", "../../etc/passwd",
               "/etc/passwd", "%2e%2e", "%00", "\u202e", "\ufeff", "\u2028", "😀", "null", "NaN",
               "Infinity", "true", "0", "-1", "1e400", "{}", "[]", "'; DROP TABLE jobs; --",
               "%s%n", "2001-13-01", "local", "queued", "a" * 32, "A" * 32, "0" * 64]
TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(ODD_STRINGS),
    st.sampled_from(["\ud800", "a\udfff", "\udc80\ud800", "\ud83d"]),  # lone surrogates
    st.sampled_from(LENGTHS).map(lambda n: "x" * n),
    st.sampled_from(LENGTHS).map(lambda n: "é" * n),
)
HEX32 = st.one_of(
    st.binary(min_size=16, max_size=16).map(bytes.hex),
    st.binary(min_size=16, max_size=16).map(lambda b: b.hex().upper()),
    st.text("0123456789abcdef", max_size=40),
)
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), INTS, HUGE, FLOATS, TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=10,
)


def field(*good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: mostly of the right kind, sometimes any JSON value at all."""
    return st.one_of(*good, JUNK)


def body_of(required: dict[str, st.SearchStrategy[Any]],
            optional: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like a model: all required keys, or any subset of keys, or extra keys."""
    full = st.fixed_dictionaries(required, optional=optional)
    loose = st.fixed_dictionaries({}, optional={**required, **optional})
    extra = st.tuples(full, st.dictionaries(TEXT, JUNK, min_size=1, max_size=2)).map(
        lambda pair: {**pair[1], **pair[0]})
    return st.one_of(full, full, loose, extra)


ATTEMPT = field(st.just(Ref("attempt")), st.just(Ref("attempt")), st.just(Ref("attempt", 1)),
                st.just(Ref("attempt", -1)), INTS, HUGE)
JOB_REF = st.one_of(st.just(Ref("held")), st.builds(Ref, st.just("job"), st.integers(0, 10**6)), HEX32)
SHA256 = st.binary(min_size=32, max_size=32).map(bytes.hex)
PROGRESS = body_of({"done": field(FLOATS, INTS, HUGE)}, {
    "total": field(FLOATS, st.none()), "unit": field(TEXT), "ns_per_day": field(FLOATS, st.none())})
CHECKPOINT = body_of(
    {"attempt": ATTEMPT, "seq": field(INTS, HUGE), "sha256": field(SHA256, HEX32, TEXT),
     "size": field(INTS, HUGE)},
    {"progress": field(PROGRESS, st.none())})
# Timezones with the widest offsets, over the whole datetime range.
ZONES = st.sampled_from([None, UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12)),
                         timezone(timedelta(hours=5, minutes=30))])
DATES = st.one_of(
    st.datetimes(timezones=ZONES).map(datetime.isoformat), st.integers(-(2**33), 2**33),
    st.sampled_from(["now", "2030-02-30T00:00:00Z", "2030-01-01", "", "0001-01-01T00:00:00+01:00",
                     "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"]))
SHAPES: dict[type[BaseModel], st.SearchStrategy[Any]] = {
    JobCreate: body_of(
        {"id": field(st.just(Ref("pending")), st.just(Ref("pending")), st.just(Ref("held")), HEX32)},
        {"title": field(TEXT), "max_attempts": field(INTS, st.none()), "gpus": field(INTS, st.none()),
         "priority": field(INTS),
         "preferred_clusters": field(st.lists(TEXT, max_size=6), st.none(),
                                     st.lists(st.just("c"), min_size=49, max_size=52))}),
    WorkerRegister: body_of({}, {
        "name": field(TEXT), "hostname": field(TEXT),
        "cluster": field(TEXT, st.sampled_from(["local", "fuzz"])),
        "provider": field(TEXT, st.sampled_from(["local", "slurm", "salad", "hpc"])),
        "provider_id": field(TEXT, st.none()),
        "platform": field(TEXT, st.sampled_from(["CUDA", "OpenCL", "CPU"])),
        "gpus": field(INTS), "gpu_model": field(TEXT), "vram_gb": field(FLOATS, INTS),
        "wall_time_end": field(DATES, st.none())}),
    Heartbeat: body_of({}, {"job_id": field(JOB_REF, st.none()), "attempt": field(ATTEMPT, st.none()),
                            "progress": field(PROGRESS, st.none())}),
    Lease: body_of({"attempt": ATTEMPT}, {}),
    CheckpointRejected: body_of({"attempt": ATTEMPT}, {"reason": field(TEXT)}),
    CheckpointReport: CHECKPOINT,
    Release: body_of({"attempt": ATTEMPT}, {"reason": field(TEXT),
                                            "checkpoint": field(CHECKPOINT, st.none())}),
    Complete: body_of({"attempt": ATTEMPT}, {"checkpoint": field(CHECKPOINT, st.none())}),
    Fail: body_of({"attempt": ATTEMPT}, {
        "exit_code": field(INTS, HUGE, st.none()), "reason": field(TEXT),
        "log_tail": field(TEXT, st.sampled_from([3000, 20000]).map(lambda n: "t" * n))}),
}
RAW_BODIES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([
        b"", b" ", b"\n", b"null", b"true", b"0", b"[]", b'""', b"{", b"}", b"{}}", b'{"a":1,}',
        b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"\x00", b'{"attempt": NaN}',
        b'{"attempt": -Infinity}', b'{"attempt": 1e400}', b'{"attempt": 1, "attempt": "x"}',
        b'{"progress": {"done": NaN}}', b'{"a": "\\u0000"}', b'{"__proto__": {}}', b"{'a': 1}",
        b'{"attempt": 01}', b'{"attempt": 1.0}', b'{"attempt": "1"}', b'{"attempt": true}',
    ]),
    # invalid UTF-8 inside a string
    st.binary(min_size=1, max_size=20).map(lambda b: b'{"title": "' + b + b'", "reason": "x"}'),
    # nesting up to far past the JSON parser's recursion limit
    st.integers(1, 20_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 10_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


@functools.cache
def route_bodies(route: Route) -> st.SearchStrategy[Json | Cut | Bytes]:
    values = JUNK if route.model is None else st.one_of(*[SHAPES[route.model]] * 3, JUNK)
    kinds = [*[st.builds(Json, values, st.booleans())] * 3, st.builds(Cut, values, st.integers(0, 10_000)),
             st.builds(Bytes, RAW_BODIES)]
    if route is BUNDLE:
        kinds.append(bundles().map(lambda b: Bytes(b.payload)))
    return st.one_of(*kinds)


CONTENT_TYPES = st.sampled_from([
    "application/json", "application/json", "application/json", None,
    "application/json; charset=utf-8", "application/json; charset=latin-1", "text/plain",
    "application/octet-stream", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=fuzz", "application/gzip", "*/*", "application/json, text/html"])

STATUS_WORDS = st.sampled_from([*JobStatus.__members__, *WorkerStatus.__members__, "", "bogus",
                                "QUEUED", "queued,", ",", "queued,running", "queued,,failed"])
QUERY_TEXT = st.one_of(STATUS_WORDS, st.text(max_size=20), st.lists(STATUS_WORDS, max_size=4).map(",".join))
LIMITS = st.one_of(st.integers(-5, 1005).map(str), st.text(max_size=8), st.sampled_from(
    ["", "abc", "1e3", " 7", "7 ", "0x10", "1_0", "١٢", "99999999999999999999", "-0", "+5"]))
CURSORS = st.one_of(st.integers(INT64_MIN, INT64_MAX).map(str), st.integers(-5, 2000).map(str),
                    HUGE.map(str), st.text(max_size=10),
                    st.sampled_from(["", "abc", "1.5", " 3", "1e3", "١", "1_000", "0x10"]))
QUERIES = {
    "list_jobs": st.fixed_dictionaries({}, optional={"status": QUERY_TEXT, "limit": LIMITS,
                                                     "cursor": CURSORS}),
    "list_workers": st.fixed_dictionaries({}, optional={"status": QUERY_TEXT}),
}

PATH_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(ODD_STRINGS),
    st.integers(33, 3000).map(lambda n: "a" * n),
    st.integers(1, 400).map(lambda n: "é" * n),
)
RAW_SEGMENTS = st.sampled_from([
    "..", ".", "%2e%2e", "%2E%2E", "%2e", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2f..%2fetc%2fpasswd",
    "%00", "%00" * 32, "%5C" * 32, "%", "%zz", "%ff%fe%fd", "%c0%ae%c0%ae", "a%20b", "%20",
    "%252e%252e", "~", ";", "a;b=c", "%3f", "%23", "*", "%E2%80%AE", "%F0%9F%98%80" * 8,
]).map(Raw)


def job_ids(held: int) -> st.SearchStrategy[Any]:
    """Job ids, `held` in about held+8 of them the holder's job."""
    return st.one_of(
        *[st.just(Ref("held"))] * held, st.builds(Ref, st.just("job"), st.integers(0, 10**6)),
        st.builds(Ref, st.just("prefix"), st.integers(0, 40)), st.just(Ref("upper")),
        st.just(Ref("fresh")), st.just(Ref("pending")), HEX32, PATH_TEXT, RAW_SEGMENTS)


JOB_IDS = job_ids(2)
WORKER_IDS = st.one_of(
    *[st.just(Ref("self"))] * 6, st.just(Ref("other")),
    st.just(Ref("gone")), st.builds(Ref, st.just("self-prefix"), st.integers(0, 40)),
    st.just(Ref("self-upper")), HEX32, PATH_TEXT, RAW_SEGMENTS)
CLUSTER_NAMES = st.one_of(st.sampled_from(["local", "slurm", "salad", "fuzz", "local-machine"]),
                          PATH_TEXT, RAW_SEGMENTS)
SEQS = st.one_of(st.integers(0, 10**12).map(str), HUGE.map(str), PATH_TEXT, RAW_SEGMENTS,
                 st.sampled_from(["1", "01", "-1", "+1", "1e3", "1.0", "٣", "１", "0x1", " 1"]))
PATH_PARAMS = {"job_id": JOB_IDS, "worker_id": WORKER_IDS, "name": CLUSTER_NAMES, "seq": SEQS}
WORKER_PATH_PARAMS = {**PATH_PARAMS, "job_id": job_ids(8)}  # a worker acts on the job it holds

# Path parameters that always reach their route (so an auth refusal is what must answer).
ALNUM = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=40)
ROUTABLE = {
    "job_id": st.one_of(st.just(Ref("held")), st.builds(Ref, st.just("job"), st.integers(0, 10**6)),
                        st.just(Ref("fresh")), HEX32.filter(bool), ALNUM),
    "worker_id": st.one_of(st.just(Ref("self")), st.just(Ref("other")), HEX32.filter(bool), ALNUM),
    "name": st.one_of(st.just("local"), ALNUM),
    "seq": st.one_of(st.integers(0, 10**6).map(str), ALNUM),
}


# --------------------------------------------------------------------------- bundles


class Member(NamedTuple):
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    link: str = ""
    size: int | None = None  # declared size, when it is not len(data)


class Bundle(NamedTuple):
    payload: bytes
    verdict: str  # refused: must be a 422; accepted: must be a 201; maybe: either
    members: tuple[str, ...]  # what is inside, for the failure report


def tar_bytes(members: list[Member], end: bool = True) -> bytes:
    """A tar stream written header by header, so sizes and types can lie."""
    out = []
    for m in members:
        info = tarfile.TarInfo(m.name)
        info.type, info.mode, info.mtime, info.linkname = m.type, 0o644, 0, m.link
        if m.type == tarfile.REGTYPE:
            info.size = len(m.data) if m.size is None else m.size
        out.append(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if m.type == tarfile.REGTYPE and m.data:
            out.append(m.data + b"\0" * (-len(m.data) % tarfile.BLOCKSIZE))
    if end:
        out.append(b"\0" * (2 * tarfile.BLOCKSIZE))
    return b"".join(out)


def describe(members: list[Member]) -> tuple[str, ...]:
    kinds = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
             tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "chardev", tarfile.BLKTYPE: "blockdev",
             tarfile.FIFOTYPE: "fifo"}
    return tuple(f"{kinds.get(m.type, m.type)} {m.name!r}" + (f" -> {m.link!r}" if m.link else "")
                 + (f" size={m.size}" if m.size is not None else "") for m in members)


VALID_BUNDLE = gzip.compress(tar_bytes([Member("relaymd.yaml", data=b"command: python run.py\n"),
                                        Member("run.py", data=b"print('hello')\n")]), mtime=0)
# Benign member names never contain "!", which every hostile one does: no accidental clash.
BENIGN_NAMES = st.one_of(
    st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=8)
             .filter(lambda s: s not in (".", "..")), min_size=1, max_size=3).map("/".join),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\x00!"), min_size=1,
            max_size=8).filter(lambda s: s not in (".", "..")),
)
# (lambdas: st.builds(Member, ...) would fill the defaulted fields, size included, at random)
BENIGN = st.one_of(
    st.builds(lambda n, d: Member(n, data=d), BENIGN_NAMES, st.binary(max_size=300)),
    st.builds(lambda n: Member(n, tarfile.DIRTYPE), BENIGN_NAMES),
    st.builds(lambda n, t: Member(n, tarfile.SYMTYPE, link=t), BENIGN_NAMES, BENIGN_NAMES),
    st.builds(lambda n, t: Member(n, tarfile.LNKTYPE, link=t), BENIGN_NAMES, BENIGN_NAMES),
)
HOSTILE = st.one_of(  # groups of members, each group refused whatever surrounds it
    st.sampled_from(["../x", "/etc/x", "a/../../x", "..", "./../x", "a/b/../../../x", "//etc/x",
                     "é/\x00x!"]).map(lambda n: (Member(n, data=b"x"),)),
    st.sampled_from(["/etc/passwd", "../../etc/passwd", "..", "a/../../x", "/", "../"]).map(
        lambda t: (Member("!link", tarfile.SYMTYPE, link=t),)),
    st.sampled_from(["/etc/passwd", "../x", "!missing", "/"]).map(
        lambda t: (Member("!hard", tarfile.LNKTYPE, link=t),)),
    st.sampled_from([tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE]).map(
        lambda t: (Member("!dev", t),)),
    # declared far past the data, under and over the 64 GiB unpacked limit
    st.sampled_from([2**20, 2**34, 60 << 30, 2**36 + 1, 2**40, 10**15]).map(
        lambda n: (Member("!huge", data=b"x" * 10, size=n),)),
    st.just((Member("!up/up", tarfile.SYMTYPE, link=".."),  # escapes only through both links
             Member("!esc", tarfile.SYMTYPE, link="!up/up/.."))),
    st.just((Member("!dup", data=b"1"), Member("!dup", data=b"2"))),
    st.just((Member("!file", data=b"1"), Member("!file/x", data=b"2"))),
)
SPEC_LIKE = st.fixed_dictionaries({"command": field(TEXT)}, optional={
    "max_attempts": field(INTS), "progress": field(TEXT, st.none()),
    "checkpoint": field(st.fixed_dictionaries({}, optional={
        "paths": field(st.lists(TEXT, max_size=3)), "poll_seconds": field(FLOATS),
        "settle_seconds": field(FLOATS), "sentinel": field(TEXT, st.none())})),
    "resources": field(st.fixed_dictionaries({}, optional={"gpus": field(INTS),
                                                           "min_vram_gb": field(FLOATS)}))})
YAML_TEXTS = st.one_of(
    SPEC_LIKE.map(yaml.safe_dump),
    st.sampled_from([
        "", "::", "[", "{", "command: [1, 2]", "- a\n- b", "command: run\n\tbad: tab",
        "command: &a [*a]", "command: run\ncheckpoint: &c {paths: *c}", "? [a]: b",
        "command: !!binary x", "command: !!python/object/apply:os.system ['true']",
        "command: run\ncommand: twice", "%YAML 9.9\n---\ncommand: run", "\x00", "command: \x07",
        "command: run\n" + "x: y\n" * 100, "command: " + "x" * (1 << 20), "command: run\n...\n[",
        "command: 2001-13-01", "command: !!int abc", "command: !!float x", "command: !!timestamp x",
        "command: " + "[" * 5000, 'command: run\nprogress: "\\ud800"', 'command: "\\ud800"',
        "command: run\ncheckpoint: {poll_seconds: .inf}", "command: run\nresources: {min_vram_gb: .inf}",
        'command: run\ncheckpoint: {paths: ["\\ud800"]}', "command: run\nmax_attempts: 1e400",
    ]),
)


@st.composite
def bundles(draw: st.DrawFn) -> Bundle:
    kind = draw(st.sampled_from(["bytes", "gzip", "tar", "tar", "tar", "valid"]))
    if kind == "bytes":
        return Bundle(draw(st.binary(min_size=1, max_size=3000)), "refused", ("raw bytes",))
    if kind == "gzip":
        data = gzip.compress(draw(st.binary(max_size=3000)), mtime=0)
        return Bundle(data, "refused", ("gzip of random bytes",))
    if kind == "valid":
        files = draw(st.dictionaries(st.sampled_from(["run.py", "in.pdb", "data/a.xml", "data/b.chk"]),
                                     st.binary(max_size=500), max_size=3))
        command = draw(st.text(min_size=1, max_size=30))
        members = [Member("relaymd.yaml", data=yaml.safe_dump({"command": command}).encode())]
        members += [Member(name, data=data) for name, data in files.items()]
        return Bundle(gzip.compress(tar_bytes(members), mtime=0), "accepted", describe(members))
    members: list[Member] = []
    if draw(st.booleans()):
        members.append(Member(draw(st.sampled_from(["relaymd.yaml", "./relaymd.yaml"])),
                              data=draw(YAML_TEXTS).encode()))
    members += draw(st.lists(BENIGN, max_size=4))
    hostile = draw(st.lists(HOSTILE, max_size=2))
    for group in hostile:
        at = draw(st.integers(0, len(members)))
        members[at:at] = list(group)
    verdict = "refused" if hostile else "maybe"
    payload = gzip.compress(tar_bytes(members, end=draw(st.booleans())),
                            compresslevel=draw(st.integers(1, 9)), mtime=0)
    if draw(st.integers(0, 9)) == 0:  # cut short: gzip must notice
        payload = payload[:draw(st.integers(1, len(payload) - 1))]
        verdict = "refused"
    return Bundle(payload, verdict, describe(members))


BUNDLE_TARGETS = st.one_of(*[st.just(Ref("fresh"))] * 6, st.just(Ref("pending")), st.just(Ref("held")),
                           JOB_IDS)


def padded(n: int) -> bytes:
    """A valid JSON body (`{}`) of exactly n bytes."""
    return b"{}" + b" " * (n - 2)


# --------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("api-fuzz")
    server = RunningOrchestrator(make_settings(root / "home", max_body_bytes=MAX_BODY,
                                               max_bundle_bytes=MAX_BUNDLE)).start()
    w = World(server, root)
    yield w
    w.close()
    server.stop()


# --------------------------------------------------------------------------- fuzzing


def test_the_route_table_is_every_api_route(world: World) -> None:
    from relaymd.server.api import Api

    served = {(m, r.path) for r in Api(world.server.service, world.server.orch.metrics).routes()
              for m in r.methods or () if m != "HEAD"}
    assert {(r.method, r.path) for r in ROUTES} == served


@pytest.mark.parametrize("route", ROUTES, ids=str)
@FUZZ
@given(data=st.data())
def test_fuzzed_requests_get_a_json_2xx_or_4xx_never_a_5xx_nor_a_hang(
        world: World, route: Route, data: st.DataObject) -> None:
    world.lease()
    call = world.draw_call(data, route)
    assume(known_bug(call) is None)
    r = world.send(call)
    world.settle(call, r, check(call, r))


@pytest.mark.parametrize("route", SCOPED_ROUTES, ids=str)
@settings(FUZZ, max_examples=examples(12))
@given(data=st.data())
def test_missing_garbage_and_misscoped_tokens_get_401_or_403_whatever_the_request(
        world: World, route: Route, data: st.DataObject) -> None:
    world.lease()
    how = data.draw(st.sampled_from(["none", "garbage", "scheme", "misscoped"]), label="auth")
    header: str | None = None
    if how == "garbage":
        header = "Bearer " + data.draw(st.text(string.ascii_letters + string.digits + "-_.~+/=",
                                               min_size=1, max_size=64), label="token")
    elif how == "scheme":
        header = data.draw(st.sampled_from(["", "Bearer", "Basic b3A6cHc=", "Token abc",
                                            "Bearer\tabc", "Bearerabc", "Bearer ,", b"Bearer \xff\xfe\x80",
                                            "Bearer " + "x" * 4000]), label="header")
    elif how == "misscoped":
        wrong = {"operator": ["bootstrap", "worker", "other"], "bootstrap": ["operator", "worker"],
                 "worker": ["operator", "bootstrap"]}[str(route.scope)]
        scope = data.draw(st.sampled_from(wrong), label="token")
        header, how = f"Bearer {world.tokens[scope]}", f"misscoped ({scope} token)"
    values = {p: data.draw(ROUTABLE[p], label=p) for p in route.params}
    spec = data.draw(route_bodies(route), label="body")
    call = world.call(route, values, content=world.materialize(spec), authorization=header, auth=how,
                      chunked=data.draw(st.booleans(), label="chunked"))
    r = world.send(call)
    check(call, r)
    assert r.status_code == (403 if how.startswith("misscoped") else 401), call.describe(r)


@settings(FUZZ, max_examples=examples(150))
@given(data=st.data())
def test_fuzzed_bundles_are_refused_with_422_invalid_bundle_never_a_5xx(
        world: World, data: st.DataObject) -> None:
    world.lease()
    target = data.draw(BUNDLE_TARGETS, label="job_id")
    bundle = data.draw(bundles(), label="bundle")
    call = world.call(BUNDLE, {"job_id": target}, content=bundle.payload, chunked=data.draw(
        st.booleans(), label="chunked"), content_type=data.draw(st.sampled_from(
            [None, "application/gzip", "application/octet-stream", "application/json"]), label="ct"))
    r = world.send(call)
    body = check(call, r)
    where = call.describe(r) + "\n  members: " + ", ".join(bundle.members)
    if target in (Ref("fresh"), Ref("pending")):
        if bundle.verdict == "refused":
            assert r.status_code == 422 and body["error"] == "invalid_bundle", where
        elif bundle.verdict == "accepted":
            assert r.status_code == 201, where
        else:
            assert r.status_code in (201, 422), where
    if r.status_code == 201:
        assert body["job_id"] == call.decoded["job_id"], where
        assert body["size"] == len(bundle.payload), where
        assert body["sha256"] == hashlib.sha256(bundle.payload).hexdigest(), where
    elif target == Ref("fresh"):  # a refused bundle is not kept
        assert not world.storage.exists(bundle_key(call.decoded["job_id"])), where
    health = world.http.get(world.url + "/healthz")
    assert health.status_code == 200, f"/healthz after the upload: {health.status_code}\n{where}"


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_every_other_method_on_a_route_gets_a_json_answer_never_a_5xx(world: World, route: Route) -> None:
    world.lease()
    values = {p: {"job_id": Ref("held"), "worker_id": Ref("self"), "name": "local", "seq": "1"}[p]
              for p in route.params}
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        if method != route.method:
            # another route may live at this path and method: check only what every answer has
            other = dataclasses.replace(route, method=method, name=f"{route.name} as {method}")
            call = world.call(other, values, content=b"{}")
            r = world.send(call)
            check(call, r)
            if any(r.method == method and re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", r.path), call.path)
                   for r in ROUTES):
                assert r.status_code != 405, call.describe(r)
            else:
                assert r.status_code == 405 and r.json()["error"] == "method_not_allowed", call.describe(r)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("route", JSON_ROUTES, ids=str)
def test_a_body_one_byte_over_max_body_bytes_is_413_and_one_at_the_limit_is_not(
        world: World, route: Route, chunked: bool) -> None:
    world.lease()
    values = {p: {"job_id": Ref("held"), "worker_id": Ref("self"), "seq": "1"}[p] for p in route.params}
    over = world.call(route, values, content=padded(world.max_body + 1), chunked=chunked)
    r = world.send(over)
    body = check(over, r)
    assert r.status_code == 413 and body["error"] == "body_too_large", over.describe(r)
    at = world.call(route, values, content=padded(world.max_body), chunked=chunked)
    r = world.send(at)
    world.settle(at, r, check(at, r))
    assert r.status_code != 413, at.describe(r)


@pytest.mark.parametrize("limit", [1024, 5000])
def test_max_body_bytes_is_the_configured_limit(tmp_path: Path, limit: int) -> None:
    server = RunningOrchestrator(make_settings(tmp_path / "home", max_body_bytes=limit)).start()
    try:
        token = server.tokens()["worker"]
        with httpx.Client(timeout=TIMEOUT, headers={"Authorization": f"Bearer {token}"}) as http:
            r = http.post(f"{server.url}{V1}/workers/register", content=padded(limit + 1))
            assert r.status_code == 413 and str(limit) in r.json()["message"], r.text
            r = http.post(f"{server.url}{V1}/workers/register", content=padded(limit))
            assert r.status_code == 201, r.text
    finally:
        server.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_bundle_one_byte_over_max_bundle_bytes_is_413_and_one_at_the_limit_is_not(
        world: World, chunked: bool) -> None:
    over = world.call(BUNDLE, {"job_id": Ref("fresh")}, content=b"x" * (world.max_bundle + 1),
                      content_type="application/gzip", chunked=chunked)
    r = world.send(over)
    body = check(over, r)
    assert r.status_code == 413 and body["error"] == "bundle_too_large", over.describe(r)
    at = world.call(BUNDLE, {"job_id": Ref("fresh")}, content=b"x" * world.max_bundle,
                    content_type="application/gzip", chunked=chunked)
    r = world.send(at)
    body = check(at, r)
    assert r.status_code == 422 and body["error"] == "invalid_bundle", at.describe(r)


def test_after_the_fuzzing_the_orchestrator_is_healthy_and_its_state_consistent(world: World) -> None:
    operator = {"Authorization": f"Bearer {world.tokens['operator']}"}
    health = world.http.get(world.url + "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text

    # every page of the job listing is strict JSON and a JobPage; together they list every job
    jobs: list[Job] = []
    cursor = None
    while True:
        params = {"limit": "7", **({"cursor": cursor} if cursor else {})}
        r = world.http.get(f"{world.url}{V1}/jobs", params=params, headers=operator)
        assert r.status_code == 200, r.text
        strict_json(r.content)
        page = JobPage.model_validate_json(r.content)
        jobs += page.jobs
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    by_job = {j.id: j for j in jobs}
    assert len(by_job) == len(jobs), "a job listed twice"
    assert set(world.jobs) <= set(by_job)
    assert {j.id for j in world.op.all_jobs()} == set(by_job)
    workers = {w.id: w for w in world.op.workers()}

    for job in jobs:
        assert re.fullmatch(r"[0-9a-f]{32}", job.id), job.id
        assert 0 <= job.failures <= job.max_attempts, job
        if job.status in LEASED_JOB_STATES:
            holder = workers.get(job.worker_id or "")
            assert holder is not None and holder.status == "busy" and holder.job_id == job.id, job
            assert job.attempt >= 1, job
        if job.status == JobStatus.queued:
            assert job.worker_id is None, job
        if job.status in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled):
            assert job.finished_at is not None, job
        if job.status in (JobStatus.completed, JobStatus.failed):
            assert job.attempt >= 1, job
        if job.status == JobStatus.failed:
            assert job.failures == job.max_attempts, job
    for worker in workers.values():
        if worker.status == WorkerStatus.busy:
            job = by_job.get(worker.job_id or "")
            assert job is not None and job.status in LEASED_JOB_STATES, worker
            assert job.worker_id == worker.id, worker
        else:
            assert worker.job_id is None, worker
    held = Counter(j.worker_id for j in jobs if j.status in LEASED_JOB_STATES)
    assert all(n == 1 for n in held.values()), held
    store = world.server.service.store
    assert world.server.call(store.run(store.orphaned_jobs)) == []

    # /metrics agrees with the listing, and not one request of the whole module got a 5xx
    text = world.http.get(world.url + "/metrics", headers=operator).text
    for status in JobStatus:
        n = sum(j.status == status for j in jobs)
        assert f'relaymd_jobs{{state="{status}"}} {float(n)}\n' in text, (status, n)
    errors = re.findall(r'relaymd_http_requests_total\{route="(\w+)",status="(5\d\d)"\} (\d+)', text)
    assert errors == [], errors

    # and it still runs a job from start to finish
    for job in jobs:
        if job.status == JobStatus.queued:
            assert world.post(f"{V1}/jobs/{job.id}/cancel", world.tokens["operator"]).status_code == 200
    job_id = submit(world.op, world.root)
    client, worker_id = world.server.worker(gpus=64, provider="slurm", vram_gb=1e300)
    try:
        assignment = client.claim()
        assert assignment is not None and assignment.job.id == job_id
        assert client.heartbeat(worker_id, job_id, assignment.attempt).directive == "continue"
        assert client.complete(job_id, assignment.attempt).status == JobStatus.completed
        client.deregister(worker_id)
    finally:
        client.close()


# --------------------------------------------------------------------------- found bugs
# Each reproduces one bug the fuzzing found (all fixed), on a fresh orchestrator, and asserts the
# behaviour it should have.

_http = httpx.Client(timeout=TIMEOUT)


def _raw(server: RunningOrchestrator, method: str, path: str, token: str | None = None,
         **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return _http.request(method, server.url + path, headers=headers, **kw)


def _bundle_with(yaml_text: str) -> bytes:
    return gzip.compress(tar_bytes([Member("relaymd.yaml", data=yaml_text.encode())]), mtime=0)


def _holder(server: RunningOrchestrator, tmp_path: Path) -> tuple[str, str, str]:
    """(session token, worker id, job id) of a worker holding a job at attempt 1."""
    job_id = submit(server.operator(), tmp_path)
    client, worker_id = server.worker()
    assignment = client.claim()
    assert assignment is not None and assignment.job.id == job_id
    return client.http.headers["Authorization"][7:], worker_id, job_id


def test_found_trailing_slash_got_an_empty_non_json_redirect(server: RunningOrchestrator) -> None:
    for method, path in (("GET", f"{V1}/jobs/"), ("POST", f"{V1}/workers/register/")):
        r = _raw(server, method, path, server.tokens()["operator"], follow_redirects=False)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert r.json()["error"] == "not_found" and "trailing slash" in r.json()["message"], r.text


def test_found_pending_bundles_were_kept_in_memory_without_bound(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    from relaymd.server import service as service_module

    svc = server.service
    token = server.tokens()["operator"]
    bundle = _bundle_with("command: 'true'\n")
    first = uuid.uuid4().hex
    ids = [first] + [uuid.uuid4().hex for _ in range(service_module.PENDING_BUNDLES + 5)]
    for job_id in ids:
        assert _raw(server, "PUT", f"{V1}/jobs/{job_id}/bundle", token,
                    content=bundle).status_code == 201
    assert len(svc._pending_bundles) == service_module.PENDING_BUNDLES
    assert first not in svc._pending_bundles
    # The oldest fell out of memory, not out of storage: its job can still be created.
    r = _raw(server, "POST", f"{V1}/jobs", token, json={"id": first})
    assert r.status_code == 201, r.text


def test_found_yaml_timestamp_tag_on_a_non_date_crashed_pyyaml(server: RunningOrchestrator) -> None:
    # PyYAML's timestamp constructor raises AttributeError (not a YAMLError) for `!!timestamp x`.
    bundle = _bundle_with("command: 'true'\nmax_attempts: !!timestamp soon\n")
    r = _raw(server, "PUT", f"{V1}/jobs/{uuid.uuid4().hex}/bundle", server.tokens()["operator"],
             content=bundle)
    assert r.status_code == 422 and r.json()["error"] == "invalid_bundle", r.text
    assert "cannot be read" in r.json()["message"], r.text


def test_found_list_jobs_cursor_beyond_int64(server: RunningOrchestrator) -> None:
    r = _raw(server, "GET", f"{V1}/jobs?cursor=9223372036854775808", server.tokens()["operator"])
    assert r.status_code < 500, r.text


def test_found_deeply_nested_json_body(server: RunningOrchestrator) -> None:
    r = _raw(server, "POST", f"{V1}/workers/register", server.tokens()["worker"],
             content=b"[" * 5000 + b"]" * 5000)
    assert r.status_code < 500, r.text


def test_found_purge_of_a_32_character_id_with_a_backslash(server: RunningOrchestrator) -> None:
    r = _raw(server, "DELETE", f"{V1}/jobs/" + "%5C" * 32, server.tokens()["operator"])
    assert r.status_code < 500, r.text


def test_found_wall_time_end_outside_the_datetime_range(server: RunningOrchestrator) -> None:
    r = _raw(server, "POST", f"{V1}/workers/register", server.tokens()["worker"],
             json={"wall_time_end": "0001-01-01T00:00:00+01:00"})
    assert r.status_code < 500, r.text
    r = _raw(server, "GET", f"{V1}/workers", server.tokens()["operator"])
    assert r.status_code == 200, r.text


def test_found_attempt_beyond_int64(server: RunningOrchestrator, tmp_path: Path) -> None:
    token, _, job_id = _holder(server, tmp_path)
    r = _raw(server, "POST", f"{V1}/jobs/{job_id}/checkpoints/reserve", token,
             json={"attempt": 2**63})
    assert r.status_code < 500, r.text


def test_found_bundle_yaml_with_an_impossible_date(server: RunningOrchestrator) -> None:
    r = _raw(server, "PUT", f"{V1}/jobs/{uuid.uuid4().hex}/bundle", server.tokens()["operator"],
             content=_bundle_with("command: 2001-13-01\n"))
    assert r.status_code < 500, r.text


def test_found_bundle_yaml_nested_deeply(server: RunningOrchestrator) -> None:
    r = _raw(server, "PUT", f"{V1}/jobs/{uuid.uuid4().hex}/bundle", server.tokens()["operator"],
             content=_bundle_with("command: " + "[" * 5000 + "\n"))
    assert r.status_code < 500, r.text


def test_found_lone_surrogate_in_preferred_clusters(server: RunningOrchestrator) -> None:
    token = server.tokens()["operator"]
    job_id = uuid.uuid4().hex
    assert _raw(server, "PUT", f"{V1}/jobs/{job_id}/bundle", token,
                content=VALID_BUNDLE).status_code == 201
    r = _raw(server, "POST", f"{V1}/jobs", token,
             content=b'{"id": "%s", "preferred_clusters": ["\\ud800"]}' % job_id.encode())
    assert r.status_code < 500, r.text
    r = _raw(server, "GET", f"{V1}/jobs", token)
    assert r.status_code == 200, r.text


def test_found_lone_surrogate_in_the_bundle_spec(server: RunningOrchestrator) -> None:
    r = _raw(server, "PUT", f"{V1}/jobs/{uuid.uuid4().hex}/bundle", server.tokens()["operator"],
             content=_bundle_with('command: run\nprogress: "\\ud800"\n'))
    assert r.status_code < 500, r.text


def test_found_lone_surrogate_in_the_heartbeat_job_id(server: RunningOrchestrator) -> None:
    client, worker_id = server.worker()
    r = _raw(server, "POST", f"{V1}/workers/{worker_id}/heartbeat",
             client.http.headers["Authorization"][7:], content=b'{"job_id": "\\ud800", "attempt": 1}')
    assert r.status_code < 500, r.text


def test_found_infinite_vram_breaks_the_workers_listing(server: RunningOrchestrator) -> None:
    r = _raw(server, "POST", f"{V1}/workers/register", server.tokens()["worker"],
             content=b'{"vram_gb": 1e400}')
    assert r.status_code < 500, r.text
    r = _raw(server, "GET", f"{V1}/workers", server.tokens()["operator"])
    assert r.status_code == 200, r.text
    TypeAdapter(list[Worker]).validate_json(r.content)


def test_found_infinite_progress_breaks_the_jobs_listing(server: RunningOrchestrator,
                                                             tmp_path: Path) -> None:
    token, worker_id, job_id = _holder(server, tmp_path)
    r = _raw(server, "POST", f"{V1}/workers/{worker_id}/heartbeat", token,
             content=b'{"job_id": "%s", "attempt": 1, "progress": {"done": 1e400}}' % job_id.encode())
    assert r.status_code < 500, r.text
    r = _raw(server, "GET", f"{V1}/jobs", server.tokens()["operator"])
    assert r.status_code == 200, r.text
    JobPage.model_validate_json(r.content)


def test_found_infinite_poll_seconds_in_the_bundle_spec(server: RunningOrchestrator) -> None:
    r = _raw(server, "PUT", f"{V1}/jobs/{uuid.uuid4().hex}/bundle", server.tokens()["operator"],
             content=_bundle_with("command: run\ncheckpoint: {poll_seconds: .inf}\n"))
    assert r.status_code == 422 and r.json()["error"] == "invalid_bundle", r.text


def test_found_a_client_hanging_up_mid_body_counts_as_a_500(server: RunningOrchestrator) -> None:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(f"POST {V1}/workers/register HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                     f"{server.tokens()['worker']}\r\nContent-Length: 1000\r\n\r\n".encode()
                     + b'{"name": "')
    deadline = time.monotonic() + 5
    while True:  # until the orchestrator has noticed the hang-up (or 5 s)
        text = _raw(server, "GET", "/metrics", server.tokens()["operator"]).text
        if 'route="register"' in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert re.findall(r'relaymd_http_requests_total\{route="register",status="5\d\d"\}', text) == []


def test_found_a_tiny_bundle_declaring_a_huge_member_takes_seconds(
        server: RunningOrchestrator) -> None:
    payload = gzip.compress(tar_bytes([Member("relaymd.yaml", data=b"command: run\n"),
                                       Member("big", data=b"x" * 10, size=8 << 30)]), mtime=0)
    try:
        r = _http.put(f"{server.url}{V1}/jobs/{uuid.uuid4().hex}/bundle", content=payload, timeout=2,
                      headers={"Authorization": f"Bearer {server.tokens()['operator']}"})
    except httpx.TimeoutException:
        raise AssertionError(f"no answer to a {len(payload)}-byte bundle within 2 s") from None
    assert r.status_code == 422, r.text

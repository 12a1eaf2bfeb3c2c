"""HTTP API (Starlette, JSON, under /api/v1): parse, authorise, call the service, serialise.

Every route is wrapped by `endpoint()`, which checks the bearer token's scope, enforces the body
size limit, maps domain errors to typed JSON errors and records request metrics.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from relaymd import __version__
from relaymd.models import (
    CheckpointRejected,
    CheckpointReport,
    Complete,
    Conflict,
    Fail,
    Health,
    Heartbeat,
    JobCreate,
    JobStatus,
    Lease,
    Release,
    WorkerRegister,
)
from relaymd.server.auth import Principal, Scope
from relaymd.server.metrics import Metrics
from relaymd.server.service import BadRequest, Service
from relaymd.server.transitions import (
    InvalidCheckpoint,
    JobNotFound,
    TransitionConflict,
    WorkerConflict,
)
from relaymd.storage import StorageError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Request, Principal | None], Awaitable[Response]]
JOB_ID = r"^[0-9a-f]{32}$"
DISK_ERRORS = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR}  # primary result codes


def _has_lone_surrogate(value: Any) -> bool:
    """JSON escapes can spell code points that are not characters; they would break SQLite
    binding and our own JSON output later, so they are refused at the door."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


class HTTPError(Exception):
    """A request-level refusal (bad body, bad query, too large) with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status)


def ok(model: BaseModel | list[BaseModel], status: int = 200) -> Response:
    if isinstance(model, list):
        body = b"[" + b",".join(m.__pydantic_serializer__.to_json(m) for m in model) + b"]"
    else:
        body = model.__pydantic_serializer__.to_json(model, by_alias=True)
    return Response(body, status_code=status, media_type="application/json")


def to_response(exc: Exception) -> Response:
    if isinstance(exc, HTTPError):
        return error(exc.status, exc.code, exc.message, exc.details)
    if isinstance(exc, TransitionConflict):
        body = Conflict.model_validate({"job_id": exc.job_id, "from": exc.current, "to": exc.to,
                                        "attempt": exc.attempt, "message": exc.message})
        return ok(body, 409)
    if isinstance(exc, BadRequest):
        return error(exc.status, exc.code, str(exc))
    if isinstance(exc, JobNotFound):
        return error(404, "not_found", f"no job {exc.args[0]}")
    if isinstance(exc, WorkerConflict):
        return error(409, "worker_conflict", str(exc))
    if isinstance(exc, InvalidCheckpoint):
        return error(422, "invalid_checkpoint", str(exc))
    if isinstance(exc, StorageError):
        return error(503, "storage_unavailable", f"object storage failed: {exc}")
    if isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF in DISK_ERRORS:
        # The orchestrator's own disk is full (or failing): the write was rolled back whole and
        # nothing was recorded; reads keep working, and writes again once there is room.
        log.error("database write refused: %s (is the disk holding the database full?)", exc)
        return error(503, "database_unavailable", f"the orchestrator could not write its "
                     f"database ({exc}); nothing was recorded: free space on its disk and retry")
    raise exc


class Api:
    def __init__(self, service: Service, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics
        self.max_body = service.settings.max_body_bytes
        self.max_bundle = service.settings.max_bundle_bytes

    def endpoint(self, name: str, scope: Scope | None, handler: Handler) -> Callable[
            [Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            started = time.perf_counter()
            status = 500
            try:
                response = await self._dispatch(request, scope, handler)
                status = response.status_code
                return response
            except ClientDisconnect:  # the caller hung up mid-body: nobody to answer, no fault
                status = 499
                return error(400, "client_disconnected", "the client hung up mid-request")
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return error(500, "internal_error", "internal error; see the orchestrator log")
            finally:
                self.metrics.observe(name, status, time.perf_counter() - started)

        return run

    async def _dispatch(self, request: Request, scope: Scope | None,
                        handler: Handler) -> Response:
        principal = None
        if scope is not None:
            principal = self.service.auth.identify(request.headers.get("authorization"))
            if principal is None:
                response = error(401, "unauthorized", "missing or invalid bearer token")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            if principal.scope != scope:
                return error(403, "forbidden",
                             f"a {principal.scope} token cannot use this route (needs {scope})")
            wid = request.path_params.get("worker_id")
            if wid is not None and wid != principal.worker_id:
                return error(403, "forbidden", "a worker may act only as itself")
        try:
            return await handler(request, principal)
        except Exception as exc:  # domain errors become typed JSON; anything else is a 500
            return to_response(exc)

    # ------------------------------------------------------------------ parsing

    async def body(self, request: Request, model: type[M]) -> M:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise HTTPError(413, "body_too_large", f"request body over {self.max_body} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body:
                raise HTTPError(413, "body_too_large", f"request body over {self.max_body} bytes")
        try:
            data = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise HTTPError(400, "bad_json", "request body is not valid JSON (or nested too "
                            "deeply)") from None
        if b"\\u" in raw and _has_lone_surrogate(data):
            raise HTTPError(400, "bad_json", "request body holds a lone UTF-16 surrogate "
                            "(\\ud800-\\udfff), which is not text")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            details = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                       for e in exc.errors()]
            first = details[0]
            raise HTTPError(422, "invalid_body",
                            f"{first['field'] or 'body'}: {first['message']}", details) from None

    @staticmethod
    def job_id(request: Request) -> str:
        job_id = request.path_params["job_id"]
        if len(job_id) != 32 or any(c not in "0123456789abcdef" for c in job_id):
            raise HTTPError(404, "not_found", f"no job {job_id!r} (workers use full job ids)")
        return str(job_id)

    # ------------------------------------------------------------------ operator routes

    async def health(self, request: Request, _: Principal | None) -> Response:
        return ok(Health(version=__version__, uptime_s=self.service.clock()
                         - self.service.started_at))

    async def metrics_text(self, request: Request, _: Principal | None) -> Response:
        jobs, workers = await self.service.counts()
        return PlainTextResponse(self.metrics.render(jobs, workers),
                                 media_type="text/plain; version=0.0.4")

    async def upload_bundle(self, request: Request, _: Principal | None) -> Response:
        job_id = self.job_id(request)
        fd, name = tempfile.mkstemp(prefix="relaymd-upload-", suffix=".tar.gz")
        path = Path(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_bundle:
                        raise HTTPError(413, "bundle_too_large",
                                        f"bundle over {self.max_bundle} bytes (max_bundle_bytes)")
                    fh.write(chunk)
            if size == 0:
                raise HTTPError(400, "empty_bundle", "empty request body; send bundle.tar.gz")
            return ok(await self.service.upload_bundle(job_id, path), 201)
        finally:
            path.unlink(missing_ok=True)  # noqa: ASYNC240 (a local temp file: microseconds)

    async def create_job(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.create_job(await self.body(request, JobCreate)), 201)

    async def list_jobs(self, request: Request, _: Principal | None) -> Response:
        q = request.query_params
        statuses = [s for part in q.getlist("status") for s in part.split(",") if s]
        bad = [s for s in statuses if s not in JobStatus.__members__]
        if bad:
            raise HTTPError(400, "bad_status", f"unknown status {bad[0]!r}; one of "
                            + ", ".join(JobStatus.__members__))
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            raise HTTPError(400, "bad_limit", "limit must be an integer") from None
        if not 1 <= limit <= 1000:
            raise HTTPError(400, "bad_limit", "limit must be between 1 and 1000")
        body = await self.service.list_jobs_json(statuses or None, limit, q.get("cursor"))
        return Response(body, media_type="application/json")

    async def get_job(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.get_job(request.path_params["job_id"]))

    async def purge(self, request: Request, _: Principal | None) -> Response:
        return JSONResponse(await self.service.purge(request.path_params["job_id"]))

    async def cancel(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.cancel(request.path_params["job_id"]))

    async def requeue(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.requeue(request.path_params["job_id"]))

    async def list_workers(self, request: Request, _: Principal | None) -> Response:
        statuses = [s for s in request.query_params.get("status", "").split(",") if s]
        return ok(await self.service.list_workers(statuses or None))

    async def list_clusters(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.clusters())

    async def enable_cluster(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.switch_cluster(request.path_params["name"], True))

    async def disable_cluster(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.switch_cluster(request.path_params["name"], False))

    async def list_tokens(self, request: Request, _: Principal | None) -> Response:
        return JSONResponse(self.service.tokens())

    async def show_token(self, request: Request, _: Principal | None) -> Response:
        return JSONResponse(self.service.token(request.path_params["name"]))

    async def rotate_token(self, request: Request, _: Principal | None) -> Response:
        return JSONResponse(await self.service.rotate_token(request.path_params["name"]))

    # ------------------------------------------------------------------ worker routes

    async def register(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.cluster is not None
        return ok(await self.service.register(await self.body(request, WorkerRegister),
                                              p.cluster), 201)

    async def heartbeat(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        hb = await self.body(request, Heartbeat)
        reply = await self.service.heartbeat(
            p.worker_id, hb.job_id, hb.attempt,
            hb.progress.model_dump() if hb.progress is not None else None)
        return ok(reply)

    async def deregister(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        await self.service.deregister(p.worker_id)
        return Response(status_code=204)

    async def claim(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        assignment = await self.service.claim(p.worker_id)
        return Response(status_code=204) if assignment is None else ok(assignment)

    async def reserve(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        lease = await self.body(request, Lease)
        return ok(await self.service.reserve_checkpoint(p.worker_id, self.job_id(request),
                                                        lease.attempt), 201)

    async def report(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        rep = await self.body(request, CheckpointReport)
        return ok(await self.service.report_checkpoint(p.worker_id, self.job_id(request), rep))

    async def reject(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        body = await self.body(request, CheckpointRejected)
        text = request.path_params["seq"]
        if not (text.isascii() and text.isdigit() and 0 < len(text) < 12):
            raise HTTPError(400, "bad_request", f"checkpoint seq {text[:40]!r} must be a positive "
                            "integer")
        seq = int(text)
        return ok(await self.service.reject_checkpoint(p.worker_id, self.job_id(request), seq,
                                                       body.attempt, body.reason))

    async def release(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        rel = await self.body(request, Release)
        return ok(await self.service.release(p.worker_id, self.job_id(request), rel.attempt,
                                             rel.reason, rel.checkpoint))

    async def complete(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        done = await self.body(request, Complete)
        return ok(await self.service.complete(p.worker_id, self.job_id(request), done.attempt,
                                              done.checkpoint))

    async def fail(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        f = await self.body(request, Fail)
        return ok(await self.service.fail(p.worker_id, self.job_id(request), f.attempt,
                                          f.exit_code, f.reason, f.log_tail))

    # ------------------------------------------------------------------ routing

    def routes(self) -> list[Route]:
        e = self.endpoint
        v1 = "/api/v1"
        return [
            Route("/healthz", e("healthz", None, self.health), methods=["GET"]),
            Route("/metrics", e("metrics", "operator", self.metrics_text), methods=["GET"]),
            Route(f"{v1}/jobs", e("create_job", "operator", self.create_job), methods=["POST"]),
            Route(f"{v1}/jobs", e("list_jobs", "operator", self.list_jobs), methods=["GET"]),
            Route(f"{v1}/jobs/claim", e("claim", "worker", self.claim), methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}", e("get_job", "operator", self.get_job),
                  methods=["GET"]),
            Route(f"{v1}/jobs/{{job_id}}", e("purge", "operator", self.purge),
                  methods=["DELETE"]),
            Route(f"{v1}/jobs/{{job_id}}/bundle", e("upload_bundle", "operator",
                                                     self.upload_bundle), methods=["PUT"]),
            Route(f"{v1}/jobs/{{job_id}}/cancel", e("cancel", "operator", self.cancel),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/requeue", e("requeue", "operator", self.requeue),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/checkpoints/reserve", e("reserve", "worker",
                                                                  self.reserve), methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/checkpoints", e("checkpoint", "worker", self.report),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/checkpoints/{{seq}}/reject", e("reject", "worker",
                                                                        self.reject),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/release", e("release", "worker", self.release),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/complete", e("complete", "worker", self.complete),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/fail", e("fail", "worker", self.fail), methods=["POST"]),
            Route(f"{v1}/workers", e("list_workers", "operator", self.list_workers),
                  methods=["GET"]),
            Route(f"{v1}/clusters", e("list_clusters", "operator", self.list_clusters),
                  methods=["GET"]),
            Route(f"{v1}/clusters/{{name}}/enable", e("enable_cluster", "operator",
                                                       self.enable_cluster), methods=["POST"]),
            Route(f"{v1}/clusters/{{name}}/disable", e("disable_cluster", "operator",
                                                        self.disable_cluster), methods=["POST"]),
            Route(f"{v1}/tokens", e("list_tokens", "operator", self.list_tokens),
                  methods=["GET"]),
            Route(f"{v1}/tokens/{{name}}", e("show_token", "operator", self.show_token),
                  methods=["GET"]),
            Route(f"{v1}/tokens/{{name}}/rotate", e("rotate_token", "operator",
                                                     self.rotate_token), methods=["POST"]),
            Route(f"{v1}/workers/register", e("register", "bootstrap", self.register),
                  methods=["POST"]),
            Route(f"{v1}/workers/{{worker_id}}/heartbeat", e("heartbeat", "worker",
                                                             self.heartbeat), methods=["POST"]),
            Route(f"{v1}/workers/{{worker_id}}/deregister", e("deregister", "worker",
                                                              self.deregister), methods=["POST"]),
        ]


class HeartbeatFastPath:
    """ASGI front for the hot route: a well-formed heartbeat with a valid session token skips
    Starlette's middleware, router and Request/Response objects (about half its CPU cost), so one
    core carries thousands of workers. Anything else, including every malformed or unauthorised
    heartbeat, goes to the Starlette app with its body replayed, so error answers stay those of
    the routed endpoint."""

    PREFIX = "/api/v1/workers/"
    SUFFIX = "/heartbeat"
    HEADERS = [(b"content-type", b"application/json")]

    def __init__(self, api: Api, app: Starlette) -> None:
        self.api, self.app = api, app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or scope["method"] != "POST"
                or not path.startswith(self.PREFIX) or not path.endswith(self.SUFFIX)):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        body, complete = bytearray(), True
        while True:
            message = await receive()
            if message["type"] != "http.request":
                complete = False
                break
            body += message.get("body", b"")
            if not message.get("more_body") or len(body) > self.api.max_body:
                complete = not message.get("more_body")
                break
        hb = self._parse(scope, bytes(body)) if complete else None
        if hb is None:
            return await self.app(scope, self._replay(bytes(body), complete, receive), send)
        worker_id, beat = hb
        try:
            reply = await self.api.service.heartbeat(
                worker_id, beat.job_id, beat.attempt,
                beat.progress.model_dump() if beat.progress is not None else None)
            status, payload = 200, reply.__pydantic_serializer__.to_json(reply)
        except Exception as exc:
            try:
                response = to_response(exc)
            except Exception:
                log.exception("POST %s failed", path)
                response = error(500, "internal_error", "internal error; see the orchestrator log")
            status, payload = response.status_code, bytes(response.body)
        await send({"type": "http.response.start", "status": status, "headers": [
            *self.HEADERS, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
        self.api.metrics.observe("heartbeat", status, time.perf_counter() - started)

    def _parse(self, scope: dict[str, Any], body: bytes) -> tuple[str, Heartbeat] | None:
        """(worker id, heartbeat) when this is a heartbeat the routed endpoint would accept."""
        worker_id = scope["path"][len(self.PREFIX):-len(self.SUFFIX)]
        if "/" in worker_id or len(body) > self.api.max_body:
            return None
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if authorization is None:
            return None
        principal = self.api.service.auth.identify(authorization.decode("latin-1"))
        if principal is None or principal.scope != "worker" or principal.worker_id != worker_id:
            return None
        try:
            return worker_id, Heartbeat.model_validate_json(body or b"{}")
        except ValidationError:
            return None

    @staticmethod
    def _replay(body: bytes, complete: bool, receive: Callable[[], Awaitable[Any]]
                ) -> Callable[[], Awaitable[Any]]:
        sent = False

        async def replayed() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": not complete}
            return await receive()

        return replayed


def create_app(service: Service, metrics: Metrics) -> HeartbeatFastPath:
    api = Api(service, metrics)

    async def not_found(request: Request, exc: Exception) -> Response:
        path = request.url.path
        hint = " (without the trailing slash)" if path.endswith("/") and path != "/" else ""
        return error(404, "not_found", f"no route {request.method} {path}{hint}")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error(405, "method_not_allowed", f"{request.method} not allowed here")

    app = Starlette(routes=api.routes(), exception_handlers={404: not_found, 405: bad_method})
    # No 307 to the slash-less path (an empty, non-JSON body that clients and the fuzzer had to
    # special-case): a trailing slash is an unknown route, answered like any other.
    app.router.redirect_slashes = False
    return HeartbeatFastPath(api, app)

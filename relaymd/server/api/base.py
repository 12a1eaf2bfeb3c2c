"""The API's plumbing: typed errors, JSON answers, the endpoint wrapper (scope check,
body limit, error mapping, metrics) and body parsing."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from relaymd.models import Conflict
from relaymd.server.auth import Principal, Scope
from relaymd.server.errors import BadRequest, TransitionConflict
from relaymd.server.metrics import Metrics
from relaymd.server.service import Service
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



def _conflict(exc: TransitionConflict) -> Response:
    body = Conflict.model_validate({"job_id": exc.job_id, "from": exc.current, "to": exc.to,
                                    "attempt": exc.attempt, "message": exc.message})
    return ok(body, 409)


def _database(exc: sqlite3.OperationalError) -> Response | None:
    if exc.sqlite_errorcode & 0xFF not in DISK_ERRORS:
        return None
    # The orchestrator's own disk is full (or failing): the write was rolled back whole and
    # nothing was recorded; reads keep working, and writes again once there is room.
    log.error("database write refused: %s (is the disk holding the database full?)", exc)
    return error(503, "database_unavailable", f"the orchestrator could not write its "
                 f"database ({exc}); nothing was recorded: free space on its disk and retry")


# Domain errors -> typed JSON answers, most specific first (a responder may decline: None).
ERROR_RESPONDERS: list[tuple[type[Exception], Callable[[Any], Response | None]]] = [
    (HTTPError, lambda e: error(e.status, e.code, e.message, e.details)),
    (TransitionConflict, _conflict),  # before BadRequest: a typed body of its own
    (BadRequest, lambda e: error(e.status, e.code, str(e))),  # every domain error
    (StorageError, lambda e: error(503, "storage_unavailable", f"object storage failed: {e}")),
    (sqlite3.OperationalError, _database),
]


def to_response(exc: Exception) -> Response:
    """The typed JSON answer to a domain error; anything else is re-raised (a 500)."""
    for kind, respond in ERROR_RESPONDERS:
        if isinstance(exc, kind):
            response = respond(exc)
            if response is not None:
                return response
    raise exc


class ApiBase:
    """Every route's wrapper (scope, metrics, errors) and the request parsing they share."""

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


"""Exceptions -> the API's typed JSON answers: the app's Starlette exception handlers.

Starlette answers an exception with the handler of its most specific class (it walks the MRO),
so `TransitionConflict` gets its typed 409 `Conflict` body although it is a `BadRequest`, and
every other domain error (relaymd/server/errors.py) the `{error, message}` body of its status. A
handler that cannot answer an exception re-raises it: a SQLite OperationalError is a 503 only
when the database's disk is full or failing, any other is an internal error.

The `Exception` entry is Starlette's 500 handler (its outermost ServerErrorMiddleware): anything
unexpected is logged with its traceback and answered 500 `internal_error`. ServerErrorMiddleware
then re-raises it "for the server to log"; `RequestMetrics` (middleware.py) stops it there, so
uvicorn neither logs it twice nor drops the keep-alive connection.

`answer()` applies the same table to code that runs below Starlette (the heartbeat fast path).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from relaymd.models import Conflict
from relaymd.server.api.base import HTTPError, error, ok
from relaymd.server.errors import BadRequest, TransitionConflict
from relaymd.storage import StorageError

log = logging.getLogger(__name__)
DISK_ERRORS = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR}  # primary result codes
METRICS_STATUS = "relaymd.metrics_status"  # ASGI scope key: the status the metrics record instead


async def http_error(request: Request, exc: HTTPError) -> Response:
    return error(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def transition_conflict(request: Request, exc: TransitionConflict) -> Response:
    body = Conflict.model_validate({"job_id": exc.job_id, "from": exc.current, "to": exc.to,
                                    "attempt": exc.attempt, "message": exc.message})
    return ok(body, 409)


async def bad_request(request: Request, exc: BadRequest) -> Response:
    return error(exc.status, exc.code, str(exc))


async def storage_unavailable(request: Request, exc: StorageError) -> Response:
    return error(503, "storage_unavailable", f"object storage failed: {exc}")


async def database_error(request: Request, exc: sqlite3.OperationalError) -> Response:
    if exc.sqlite_errorcode & 0xFF not in DISK_ERRORS:
        raise exc  # not ours to answer: an internal error
    # The orchestrator's own disk is full (or failing): the write was rolled back whole and
    # nothing was recorded; reads keep working, and writes again once there is room.
    log.error("database write refused: %s (is the disk holding the database full?)", exc)
    return error(503, "database_unavailable", f"the orchestrator could not write its "
                 f"database ({exc}); nothing was recorded: free space on its disk and retry")


async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
    # The caller hung up mid-body: nobody to answer and no fault of ours; counted as 499.
    request.scope[METRICS_STATUS] = 499
    return error(400, "client_disconnected", "the client hung up mid-request")


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error(500, "internal_error", "internal error; see the orchestrator log")


async def not_found(request: Request, exc: Exception) -> Response:
    path = request.url.path
    hint = " (without the trailing slash)" if path.endswith("/") and path != "/" else ""
    return error(404, "not_found", f"no route {request.method} {path}{hint}")


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return error(405, "method_not_allowed", f"{request.method} not allowed here")


Handler = Callable[[Request, Any], Awaitable[Response]]

# Starlette's exception_handlers: an exception class (its most specific one wins) or the status
# of an HTTPException that Starlette's router raises (unknown route, wrong method).
EXCEPTION_HANDLERS: dict[Any, Handler] = {
    404: not_found,
    405: method_not_allowed,
    HTTPError: http_error,
    TransitionConflict: transition_conflict,
    BadRequest: bad_request,
    StorageError: storage_unavailable,
    sqlite3.OperationalError: database_error,
    ClientDisconnect: client_disconnected,
    Exception: internal_error,
}


async def answer(request: Request, exc: Exception) -> Response:
    """The answer the app's handlers give `exc`, for code below Starlette: the handler of its
    most specific class; one that re-raises (declines) makes it an internal error."""
    handler = next(EXCEPTION_HANDLERS[c] for c in type(exc).__mro__ if c in EXCEPTION_HANDLERS)
    try:
        return await handler(request, exc)
    except Exception:
        return await internal_error(request, exc)

"""HTTP API (Starlette, JSON, under /api/v1): parse, authorise, call the service, serialise.

Every route is wrapped by `endpoint()`, which checks the bearer token's scope, enforces the body
size limit, maps domain errors to typed JSON errors and records request metrics.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relaymd.server.api.base import HTTPError, error, ok, to_response
from relaymd.server.api.fastpath import HeartbeatFastPath
from relaymd.server.api.operator import OperatorRoutes
from relaymd.server.api.workers import WorkerRoutes
from relaymd.server.metrics import Metrics
from relaymd.server.service import Service

__all__ = ["Api", "HTTPError", "HeartbeatFastPath", "create_app", "error", "ok", "to_response"]


class Api(OperatorRoutes, WorkerRoutes):
    """The whole API: the operator's routes and the workers'."""

    def routes(self) -> list[Route]:
        return [*OperatorRoutes.routes(self), *WorkerRoutes.routes(self)]


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

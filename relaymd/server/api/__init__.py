"""HTTP API (Starlette, JSON, under /api/v1): parse, authorise, call the service, serialise.

A request passes, outermost first: the heartbeat fast path (fastpath.py: most heartbeats are
answered there), `RequestMetrics` (middleware.py: count and latency per route name and status),
Starlette's ServerErrorMiddleware (unexpected exceptions -> 500 `internal_error`), `Authenticate`
(middleware.py: the bearer token's principal into the ASGI scope), Starlette's
ExceptionMiddleware (domain errors -> typed JSON, exception_handlers.py), the router and the
route (`ApiRoute`, base.py: the token scope it needs, checked once found), then its handler.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware

from relaymd.server.api.base import ApiRoute, ClusterControl, HTTPError, error, ok
from relaymd.server.api.exception_handlers import EXCEPTION_HANDLERS
from relaymd.server.api.fastpath import HeartbeatFastPath
from relaymd.server.api.middleware import Authenticate, RequestMetrics
from relaymd.server.api.operator import OperatorRoutes
from relaymd.server.api.workers import WorkerRoutes
from relaymd.server.metrics import Metrics
from relaymd.server.service import Service

__all__ = ["Api", "HTTPError", "HeartbeatFastPath", "create_app", "error", "ok"]


class Api(OperatorRoutes, WorkerRoutes):
    """The whole API: the operator's routes and the workers'."""

    def routes(self) -> list[ApiRoute]:
        return [*OperatorRoutes.routes(self), *WorkerRoutes.routes(self)]


def create_app(service: Service, metrics: Metrics,
               clusters: Callable[[], ClusterControl | None] = lambda: None) -> HeartbeatFastPath:
    api = Api(service, metrics, clusters)
    app = Starlette(routes=api.routes(), exception_handlers=EXCEPTION_HANDLERS,
                    middleware=[Middleware(Authenticate, auth=service.auth)])
    # No 307 to the slash-less path (an empty, non-JSON body that clients and the fuzzer had to
    # special-case): a trailing slash is an unknown route, answered like any other.
    app.router.redirect_slashes = False
    return HeartbeatFastPath(api, RequestMetrics(app, metrics))

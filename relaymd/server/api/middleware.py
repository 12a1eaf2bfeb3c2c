"""The API's two middlewares, plain ASGI (no per-request objects, unlike Starlette's
BaseHTTPMiddleware or AuthenticationMiddleware):

- `Authenticate` (inside the app) identifies the bearer token once per request and puts the
  `Principal`, or None, in the ASGI scope under "user" (`request.user`). It refuses nothing: each
  route says which scope it needs (`ApiRoute`, base.py) and is checked once routing found it.
- `RequestMetrics` (around the app) counts every routed request and its latency under the
  route's name and the status answered. It sits outside Starlette's ServerErrorMiddleware so that
  it sees the 500 that an unexpected exception is answered with, and it stops the exception
  which that middleware re-raises afterwards (exception_handlers.py says why).

The heartbeat fast path (fastpath.py) answers most heartbeats before either and records its own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relaymd.server.api.exception_handlers import METRICS_STATUS
from relaymd.server.auth import Authenticator
from relaymd.server.metrics import Metrics


class Authenticate:
    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            principal = None
            for key, value in scope["headers"]:
                if key == b"authorization":  # the first one, as request.headers.get() reads
                    principal = self.auth.identify(value.decode("latin-1"))
                    break
            scope["user"] = principal
        await self.app(scope, receive, send)


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 0  # no answer yet

        def sent(message: Message) -> Awaitable[None]:  # plain function: send's awaitable
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, sent)
        except Exception:
            if not status:  # not answered: nobody handled it, let the server say 500
                raise
            status = 500  # answered by the app's 500 handler, which logged it: stop it here
        finally:
            # Routed requests only (Starlette's router sets "route"): not a 404, nor a 405.
            route = scope.get("route")
            if route is not None and scope["method"] in route.methods:
                self.metrics.observe(route.name, scope.get(METRICS_STATUS) or status or 500,
                                     time.perf_counter() - started)

"""The heartbeat fast path: the hot route served below Starlette, its middlewares included."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp

from relaymd.models import Heartbeat
from relaymd.server.api.exception_handlers import answer


class HeartbeatFastPath:
    """ASGI front for the hot route: a well-formed heartbeat with a valid session token skips
    the middlewares, Starlette's router and Request/Response objects (about half its CPU cost), so
    one core carries thousands of workers; it records its own metrics, and answers the service's
    exceptions as the app's exception handlers do. Anything else, including every malformed or
    unauthorised heartbeat, goes to the app with its body replayed, so error answers stay those of
    the routed endpoint."""

    PREFIX = "/api/v1/workers/"
    SUFFIX = "/heartbeat"
    HEADERS = [(b"content-type", b"application/json")]

    def __init__(self, api: Any, app: ASGIApp) -> None:
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
            response = await answer(Request(scope), exc)
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



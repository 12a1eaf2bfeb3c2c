"""The API's plumbing: typed errors, JSON answers, the route class (each route's method, path,
metrics name and the token scope it needs, checked after routing) and body parsing.

Who the caller is comes from the `Authenticate` middleware (middleware.py), which puts the
bearer token's `Principal` (or None) in the ASGI scope under "user"; errors become JSON answers
by the app's exception handlers (exception_handlers.py); request metrics are recorded by the
`RequestMetrics` middleware, under the route's name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Send
from starlette.types import Scope as ASGIScope

from relaymd.models import ClusterInfo
from relaymd.server.auth import Principal, Scope
from relaymd.server.metrics import Metrics
from relaymd.server.service import Service

M = TypeVar("M", bound=BaseModel)
JOB_ID = r"^[0-9a-f]{32}$"


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


class ClusterControl(Protocol):
    """What the cluster routes ask of the provisioning loop (which the orchestrator owns: the
    service does not know it, so the two do not depend on each other)."""

    async def overview(self) -> list[ClusterInfo]: ...

    async def switch(self, name: str, enabled: bool) -> ClusterInfo: ...


class HTTPError(Exception):
    """A request-level refusal (bad body, bad query, too large, bad token) with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers


def error(status: int, code: str, message: str, details: Any = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def ok(model: BaseModel | list[BaseModel], status: int = 200) -> Response:
    if isinstance(model, list):
        body = b"[" + b",".join(m.__pydantic_serializer__.to_json(m) for m in model) + b"]"
    else:
        body = model.__pydantic_serializer__.to_json(model, by_alias=True)
    return Response(body, status_code=status, media_type="application/json")


class ApiRoute(Route):
    """One route: its method and path, its name (the `route` label of the request metrics) and
    the token scope it needs (None: anyone). The scope is checked here, once routing has found
    the route, so an unknown path stays a 404 and a wrong method a 405 whatever the token; a
    refusal is an HTTPError, answered by its exception handler."""

    def __init__(self, method: str, path: str, name: str, needs: Scope | None,
                 endpoint: Any) -> None:
        super().__init__(path, endpoint, methods=[method], name=name)
        self.needs = needs

    async def handle(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if self.needs is not None and scope["method"] in self.methods:
            self.authorise(scope)
        await super().handle(scope, receive, send)

    def authorise(self, scope: ASGIScope) -> None:
        principal: Principal | None = scope.get("user")
        if principal is None:
            raise HTTPError(401, "unauthorized", "missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
        if principal.scope != self.needs:
            raise HTTPError(403, "forbidden", f"a {principal.scope} token cannot use this route "
                            f"(needs {self.needs})")
        wid = scope["path_params"].get("worker_id")
        if wid is not None and wid != principal.worker_id:
            raise HTTPError(403, "forbidden", "a worker may act only as itself")


class ApiBase:
    """What every group of routes shares: the service, the metrics and request parsing."""

    def __init__(self, service: Service, metrics: Metrics,
                 clusters: Callable[[], ClusterControl | None] = lambda: None) -> None:
        self.service = service
        self.metrics = metrics
        self.clusters = clusters  # the provisioning loop, once (and while) it runs
        self.max_body = service.settings.max_body_bytes
        self.max_bundle = service.settings.max_bundle_bytes

    @staticmethod
    def caller(request: Request) -> Principal:
        """Who is calling, as the `Authenticate` middleware identified them. Only for routes that
        need a token: `ApiRoute` has refused the request before its handler runs without one."""
        principal: Principal | None = request.scope.get("user")
        assert principal is not None
        return principal

    @classmethod
    def worker_id(cls, request: Request) -> str:
        """The calling worker (routes that need a worker token)."""
        worker_id = cls.caller(request).worker_id
        assert worker_id is not None
        return worker_id

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


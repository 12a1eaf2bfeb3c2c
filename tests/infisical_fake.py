"""A stand-in for an Infisical server on loopback, for the `infisical` secrets provider's tests.

It serves, shaped as Infisical documents them and as its server code answers
(https://infisical.com/docs/api-reference/endpoints/universal-auth/login,
https://infisical.com/docs/api-reference/endpoints/secrets; Infisical/infisical
backend/src/server/routes/v4/secret-router.ts and plugins/error-handler.ts):

- POST /api/v1/auth/universal-auth/login, JSON {"clientId", "clientSecret"} -> {"accessToken",
  "expiresIn", "accessTokenMaxTTL", "tokenType": "Bearer"}; wrong credentials: 401
  {"statusCode": 401, "message": "Invalid credentials", "error": "UnauthorizedError"}; a body
  that is not that object: 422 ValidationFailure;
- GET /api/v4/secrets?projectId&environment&secretPath (and the deprecated
  GET /api/v3/secrets/raw?workspaceId&...), `Authorization: Bearer <token>`: no token 401
  "Token missing"; an unknown or expired token 403 TokenError (as the server answers a JWT it
  cannot verify); an unknown project 404 NotFound; a project the identity is not a member of
  403 ProjectMembershipNotFound; an unknown environment or path 200 with no secrets (Infisical
  does not report them); `recursive`, `include_imports`, `expandSecretReferences` ("true"/"false")
  and `viewSecretValue` work as documented;
- anything else: 404 as Fastify answers an unknown route ({"message": "Route GET:/x not found"}).

State lives in memory: `projects[project_id][environment][path] = {KEY: value}`, `imports`,
`members` (projects the identity may read; default: all). Access tokens are random and expire
after `token_ttl` seconds (or at once with `expire_tokens()`). Tests can make the next requests
fail with a status (`fail`), hang (`hang`), answer non-JSON (`garbage`) or JSON of the wrong
shape (`wrong_shape`), and read every request received in `requests`.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .http_fake import FakeHTTPServer

LOGIN = "/api/v1/auth/universal-auth/login"
LIST_V4 = "/api/v4/secrets"
LIST_V3 = "/api/v3/secrets/raw"
HIDDEN_VALUE = "<hidden-by-infisical>"  # what the server puts in place of a value it may not show

Folders = dict[str, dict[str, str]]  # path -> {KEY: value}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _norm(path: str) -> str:
    """The server's removeTrailingSlash: "/" stays, "/a/" -> "/a"."""
    return "/" + path.strip().strip("/")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, the raw text if it was not JSON, None if empty


@dataclass
class Fault:
    kind: str  # "status", "hang", "garbage", "wrong_shape"
    times: int
    status: int = 500
    seconds: float = 0.0
    path: str | None = None  # only this path (None: any)

    def matches(self, path: str) -> bool:
        return self.path is None or self.path == path


@dataclass
class Identity:
    client_id: str
    client_secret: str


@dataclass
class _Token:
    expires: float
    uses: int = 0


class FakeInfisical(FakeHTTPServer):
    """Start it (the constructor does), point the provider's site_url at `base_url`, `close()`."""

    def __init__(self, client_id: str | None = None, client_secret: str | None = None,
                 projects: dict[str, dict[str, Folders]] | None = None, token_ttl: int = 7200) -> None:
        super().__init__()
        self.identity = Identity(client_id or str(uuid.uuid4()),
                                 client_secret or secrets.token_hex(32))
        self.projects: dict[str, dict[str, Folders]] = projects if projects is not None else {}
        # (project, env, path) -> [(env, path), ...] imported into that folder, in order.
        self.imports: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
        self.members: set[str] | None = None  # None: the identity belongs to every project
        self.hide_values = False  # True: the identity may list but not read values
        self.v4 = True  # False: a server from before /api/v4/secrets
        self.token_ttl = token_ttl
        self.tokens: dict[str, _Token] = {}
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []

    @property
    def base_url(self) -> str:
        return self.origin

    # -- test controls ---------------------------------------------------------------------------

    def add_secrets(self, project: str, environment: str, values: dict[str, str], path: str = "/") -> None:
        with self.lock:
            folder = self.projects.setdefault(project, {}).setdefault(environment, {})
            folder.setdefault(_norm(path), {}).update(values)

    def add_import(self, project: str, environment: str, path: str, from_env: str, from_path: str) -> None:
        with self.lock:
            self.imports.setdefault((project, environment, _norm(path)), []).append(
                (from_env, _norm(from_path)))

    def expire_tokens(self) -> None:
        with self.lock:
            for token in self.tokens.values():
                token.expires = 0.0

    def fail(self, times: int = 1, status: int = 500, path: str | None = None) -> None:
        self._add(Fault("status", times, status=status, path=path))

    def hang(self, seconds: float, times: int = 1, path: str | None = None) -> None:
        self._add(Fault("hang", times, seconds=seconds, path=path))

    def garbage(self, times: int = 1, path: str | None = None) -> None:
        self._add(Fault("garbage", times, path=path))

    def wrong_shape(self, times: int = 1, path: str | None = None) -> None:
        self._add(Fault("wrong_shape", times, path=path))

    def _add(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def calls(self, path: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if path is None or r.path == path]

    def issued_tokens(self) -> list[str]:
        with self.lock:
            return list(self.tokens)

    # -- serving ---------------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        parts = urlsplit(req.path)
        path = parts.path
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in req.headers.items()}
        with self.lock:
            self.requests.append(Recorded(method, path, query, headers, body))
            fault = next((f for f in self.faults if f.matches(path)), None)
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
        if fault is not None:
            self._inject(req, fault)
            return
        status, payload = self._route(method, req.path, path, query, headers, body)
        self._send(req, status, payload)

    def _inject(self, req: BaseHTTPRequestHandler, fault: Fault) -> None:
        if fault.kind == "hang":
            self._closing.wait(fault.seconds)
            req.close_connection = True
            return  # the client has given up by now; nothing is sent
        if fault.kind == "status":
            messages = {500: "Something went wrong", 502: "Bad Gateway", 503: "Service Unavailable",
                        429: "Rate limit exceeded"}
            errors = {500: "InternalServerError", 429: "RateLimitExceeded"}
            self._send(req, fault.status, _error(fault.status, messages.get(fault.status, "Error"),
                                                 errors.get(fault.status, "Error")))
        elif fault.kind == "garbage":
            self.send_raw(req, 200, b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>",
                           "text/html")
        elif fault.kind == "wrong_shape":
            self._send(req, 200, {"data": [], "note": "not what Infisical answers"})

    def _route(self, method: str, raw_path: str, path: str, query: dict[str, str],
               headers: dict[str, str], body: Any) -> tuple[int, Any]:
        if method == "POST" and path == LOGIN:
            return self._login(body)
        if method == "GET" and (path == LIST_V3 or (path == LIST_V4 and self.v4)):
            return self._list(path, query, headers)
        # Fastify's default not-found answer.
        return 404, {"message": f"Route {method}:{raw_path} not found", "error": "Not Found",
                     "statusCode": 404}

    def _login(self, body: Any) -> tuple[int, Any]:
        if (not isinstance(body, dict) or not isinstance(body.get("clientId"), str)
                or not isinstance(body.get("clientSecret"), str)):
            return 422, {"reqId": _req_id(), "statusCode": 422, "error": "ValidationFailure",
                         "message": [{"code": "invalid_type", "path": ["clientId"], "message": "Required"}]}
        if (body["clientId"] != self.identity.client_id
                or body["clientSecret"] != self.identity.client_secret):
            return 401, _error(401, "Invalid credentials", "UnauthorizedError")
        token = "eyJ" + secrets.token_urlsafe(48)  # opaque here; the real one is a JWT
        with self.lock:
            self.tokens[token] = _Token(time.time() + self.token_ttl)
        return 200, {"accessToken": token, "expiresIn": self.token_ttl,
                     "accessTokenMaxTTL": self.token_ttl, "tokenType": "Bearer"}

    def _authorize(self, headers: dict[str, str]) -> tuple[int, Any] | None:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth or scheme.lower() != "bearer" or not token.strip():
            return 401, _error(401, "Token missing", "UnauthorizedError")
        with self.lock:
            known = self.tokens.get(token.strip())
            if known is not None:
                known.uses += 1
        if known is None:
            return 403, _error(403, "The provided access token is malformed. Please use a valid token "
                                    "or generate a new one and try again.", "TokenError")
        if known.expires <= time.time():
            return 403, _error(403, "Your token has expired. Please re-authenticate.", "TokenError")
        return None

    def _list(self, route: str, query: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        refused = self._authorize(headers)
        if refused is not None:
            return refused
        flags = {}
        for name, default in (("viewSecretValue", True), ("expandSecretReferences", False),
                              ("recursive", False), ("include_imports", False)):
            value = query.get(name, "true" if default else "false")
            if value not in ("true", "false"):
                return 422, {"reqId": _req_id(), "statusCode": 422, "error": "ValidationFailure",
                             "message": [{"code": "invalid_enum_value", "path": [name],
                                          "message": "Invalid enum value. Expected 'true' | 'false'"}]}
            flags[name] = value == "true"
        project = query.get("projectId" if route == LIST_V4 else "workspaceId", "").strip()
        environment = query.get("environment", "").strip()
        if not project or not environment:
            return 400, _error(400, "Missing project id or environment", "BadRequest")
        path = _norm(query.get("secretPath", "/"))
        with self.lock:
            if project not in self.projects:
                return 404, _error(404, f"Project with {project} not found", "NotFound")
            if self.members is not None and project not in self.members:
                return 403, _error(403, f"You are not a member of this project with ID {project}. Please "
                                        "assign this identity to the project with the appropriate "
                                        "permissions, then try again.", "ProjectMembershipNotFound")
            envs = self.projects[project]
            folders = envs.get(environment, {})
            if flags["recursive"]:
                below = path.rstrip("/") + "/"
                paths = sorted(p for p in folders if p == path or p.startswith(below))
            else:
                paths = [path] if path in folders else []  # unknown env or path: an empty list
            items = [self._item(project, environment, p, k, v, envs, flags)
                     for p in paths for k, v in folders[p].items()]
            imports = []
            if flags["include_imports"]:
                for p in paths:
                    for from_env, from_path in self.imports.get((project, environment, p), []):
                        source = envs.get(from_env, {}).get(from_path, {})
                        imports.append({
                            "secretPath": from_path, "environment": from_env,
                            "folderId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{from_env}{from_path}")),
                            "secrets": [self._item(project, from_env, from_path, k, v, envs, flags,
                                                   stamps=False) for k, v in source.items()],
                        })
        return 200, {"secrets": items, "imports": imports}

    def _item(self, project: str, environment: str, path: str, key: str, value: str,
              envs: dict[str, Folders], flags: dict[str, bool], stamps: bool = True) -> dict[str, Any]:
        hidden = self.hide_values or not flags["viewSecretValue"]
        if hidden:
            shown = HIDDEN_VALUE
        elif flags["expandSecretReferences"]:
            shown = _expand(value, environment, path, envs)
        else:
            shown = value
        item: dict[str, Any] = {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{project}/{environment}{path}/{key}")),
            "workspace": project, "environment": environment, "version": 1, "type": "shared",
            "secretKey": key, "secretValue": shown, "secretComment": "",
            "secretReminderNote": None, "secretReminderRepeatDays": None,
            "skipMultilineEncoding": False, "isRotatedSecret": False, "rotationId": None,
            "secretPath": path, "secretValueHidden": hidden, "secretMetadata": [], "tags": [],
        }
        item["_id"] = item["id"]
        if stamps:
            item["createdAt"] = item["updatedAt"] = _now()
        return item

    # -- replies ---------------------------------------------------------------------------------

    def _send(self, req: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        self.send_raw(req, status, json.dumps(payload).encode(), "application/json; charset=utf-8")


_REFERENCE = re.compile(r"\$\{([^}]+)\}")


def _expand(value: str, environment: str, path: str, envs: dict[str, Folders], depth: int = 0) -> str:
    """Infisical's reference syntax: ${KEY} (same folder), ${env.KEY} (root of env),
    ${env.a.b.KEY} (env, folder /a/b). Unresolvable references stay as written."""
    if depth > 5:
        return value

    def one(match: re.Match[str]) -> str:
        parts = match.group(1).split(".")
        if len(parts) == 1:
            env, folder, key = environment, path, parts[0]
        else:
            env, folder, key = parts[0], "/" + "/".join(parts[1:-1]), parts[-1]
        found = envs.get(env, {}).get(_norm(folder), {}).get(key)
        if found is None:
            return match.group(0)
        return _expand(found, env, _norm(folder), envs, depth + 1)

    return _REFERENCE.sub(one, value)


def _req_id() -> str:
    return f"req-{secrets.token_hex(6)}"


def _error(status: int, message: str, error: str) -> dict[str, Any]:
    return {"reqId": _req_id(), "statusCode": status, "message": message, "error": error}


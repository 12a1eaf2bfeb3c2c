"""A stand-in for Salad Cloud's public API on loopback, for the `salad` provider's tests.

It serves the container-group endpoints the provider uses, shaped as Salad documents them
(https://docs.salad.com/api-reference; OpenAPI in SaladTechnologies/salad-cloud-docs,
api-specs/salad-cloud.yaml):

- every request needs the `Salad-Api-Key` header: a wrong or missing key gets 401;
- GET/PATCH {prefix}/organizations/{org}/projects/{project}/containers/{name} (PATCH only as
  application/merge-patch+json, `replicas` an integer 0..500, else 415/400);
- POST .../containers/{name}/start and .../stop: 202, no body;
- GET .../containers/{name}/instances: {"instances": [{id, machine_id, state, ...}]};
- errors are ProblemDetails JSON; an unknown organization, project or group is a 404.

State lives in memory (`FakeSalad.group`, or `groups` for more than one): a started group gets one
instance per replica (each with its own machine_id, in `new_instance_state`), and instances go
when the count drops or the group stops. Tests can make the next requests fail (`fail`), hang
(`hang`), answer non-JSON (`garbage`) or JSON of the wrong shape (`wrong_shape`), and read every
request received in `requests`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from .http_fake import FakeHTTPServer

PREFIX = "/api/public"  # the path part of https://api.salad.com/api/public
MAX_REPLICAS = 500  # ContainerGroupPatch.replicas maximum
MERGE_PATCH = "application/merge-patch+json"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Recorded:
    method: str
    path: str  # without PREFIX
    body: Any  # parsed JSON, the raw text if it was not JSON, None if empty
    content_type: str | None
    authorized: bool


@dataclass
class Fault:
    kind: str  # "status", "hang", "garbage", "wrong_shape"
    times: int
    status: int = 500
    detail: str = ""
    seconds: float = 0.0
    method: str | None = None  # only requests with this method (None: any)
    path_suffix: str | None = None  # only paths ending so (None: any)

    def matches(self, method: str, path: str) -> bool:
        return ((self.method is None or self.method == method)
                and (self.path_suffix is None or path.endswith(self.path_suffix)))


@dataclass
class FakeGroup:
    organization: str
    project: str
    name: str
    replicas: int = 0
    status: str = "stopped"  # current_state.status
    description: str | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)
    version: int = 1
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)

    def machine_ids(self) -> list[str]:
        return [i["machine_id"] for i in self.instances]

    def as_json(self) -> dict[str, Any]:
        counts = {f"{s}_count": sum(1 for i in self.instances if i["state"] == s)
                  for s in ("allocating", "creating", "running", "stopping")}
        return {
            "id": self.id, "name": self.name, "display_name": self.name,
            "organization_name": self.organization, "project_name": self.project,
            "container": {"image": "ghcr.io/example/relaymd-worker:latest", "command": None,
                          "resources": {"cpu": 4, "memory": 16384, "gpu_classes": [str(uuid.UUID(int=1))]},
                          "environment_variables": {}, "image_caching": True},
            "autostart_policy": False, "restart_policy": "always", "priority": "high",
            "replicas": self.replicas, "country_codes": [],
            "current_state": {"status": self.status, "description": self.description,
                              "start_time": self.created, "finish_time": self.updated,
                              "instance_status_counts": counts},
            "create_time": self.created, "update_time": self.updated,
            "pending_change": False, "version": self.version,
        }


class FakeSalad(FakeHTTPServer):
    """Start it, point the provider's base_url at `base_url`, `close()` when done."""

    def __init__(self, api_key: str = "salad-test-key", organization: str = "acme-lab",
                 project: str = "md-runs", group: str = "relaymd-workers") -> None:
        super().__init__()
        self.api_key = api_key
        self.groups: dict[tuple[str, str, str], FakeGroup] = {}
        self.group = self.add_group(organization, project, group)
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.new_instance_state = "running"  # what a new instance reports (Salad: allocating first)

    @property
    def base_url(self) -> str:
        return self.origin + PREFIX

    # -- test controls ---------------------------------------------------------------------------

    def add_group(self, organization: str, project: str, name: str) -> FakeGroup:
        group = FakeGroup(organization, project, name)
        with self.lock:
            self.groups[(organization, project, name)] = group
        return group

    def set_group(self, *, replicas: int, status: str, group: FakeGroup | None = None) -> None:
        """Put a group straight into a state (instances follow, as after a start)."""
        g = group or self.group
        with self.lock:
            g.replicas, g.status = replicas, status
            g.instances.clear()
            self._sync_instances(g)

    def set_instance_state(self, machine_id: str, state: str, group: FakeGroup | None = None) -> None:
        g = group or self.group
        with self.lock:
            for i in g.instances:
                if i["machine_id"] == machine_id:
                    i["state"], i["update_time"] = state, _now()
            self._refresh_status(g)

    def fail(self, times: int = 1, status: int = 500, detail: str = "internal error",
             method: str | None = None, path_suffix: str | None = None) -> None:
        self._add(Fault("status", times, status=status, detail=detail, method=method,
                        path_suffix=path_suffix))

    def hang(self, seconds: float, times: int = 1, method: str | None = None) -> None:
        self._add(Fault("hang", times, seconds=seconds, method=method))

    def garbage(self, times: int = 1, method: str | None = None) -> None:
        self._add(Fault("garbage", times, method=method))

    def wrong_shape(self, times: int = 1, method: str | None = None) -> None:
        self._add(Fault("wrong_shape", times, method=method))

    def _add(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def calls(self, method: str | None = None, suffix: str | None = None) -> list[Recorded]:
        """Requests received, optionally only one method and paths ending in `suffix`."""
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (suffix is None or r.path.endswith(suffix))]

    def mutations(self) -> list[Recorded]:
        """Requests that could change a group (anything but GET)."""
        return [r for r in self.calls() if r.method != "GET"]

    def clear_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- serving ---------------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        path = req.path.split("?", 1)[0]
        path = path[len(PREFIX):] if path.startswith(PREFIX) else path
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        content_type = req.headers.get("Content-Type")
        authorized = req.headers.get("Salad-Api-Key") == self.api_key
        with self.lock:
            self.requests.append(Recorded(method, path, body, content_type, authorized))
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
        if fault is not None and self._inject(req, fault):
            return
        status, payload, ctype = self._route(method, path, body, content_type, authorized)
        self._send(req, status, payload, ctype)

    def _inject(self, req: BaseHTTPRequestHandler, fault: Fault) -> bool:
        """Answer with the fault; False when the request should then be served normally."""
        if fault.kind == "hang":
            self._closing.wait(fault.seconds)
            req.close_connection = True
            return True  # the client has given up by now; nothing is sent
        if fault.kind == "status":
            self._send(req, fault.status, _problem(fault.status, fault.detail), "application/json")
        elif fault.kind == "garbage":
            self.send_raw(req, 200, b"<html><body>502 Bad Gateway (nginx)</body></html>",
                           "text/html")
        elif fault.kind == "wrong_shape":
            self._send(req, 200, {"items": [], "note": "not a container group"}, "application/json")
        return True

    def _route(self, method: str, path: str, body: Any, content_type: str | None,
               authorized: bool) -> tuple[int, Any, str]:
        if not authorized:
            return 401, _problem(401, "The API key is missing or invalid."), "application/json"
        parts = path.strip("/").split("/")
        if (len(parts) not in (6, 7) or parts[0] != "organizations" or parts[2] != "projects"
                or parts[4] != "containers"):
            return 404, _problem(404, f"No route for {method} {path}."), "application/json"
        org, project, name = parts[1], parts[3], parts[5]
        action = parts[6] if len(parts) == 7 else None
        with self.lock:
            group = self.groups.get((org, project, name))
            if group is None:
                known_org = any(k[0] == org for k in self.groups)
                what = "Container group" if known_org else "Organization"
                return 404, _problem(404, f"{what} not found."), "application/json"
            if action is None and method == "GET":
                return 200, group.as_json(), "application/json"
            if action is None and method == "PATCH":
                return self._patch(group, body, content_type)
            if action == "instances" and method == "GET":
                return 200, {"instances": [dict(i) for i in group.instances]}, "application/json"
            if action in ("start", "stop") and method == "POST":
                if action == "start":
                    if group.status in ("stopped", "succeeded"):
                        group.status = "deploying"
                        self._sync_instances(group)
                else:
                    group.status = "stopped"
                    group.instances.clear()
                group.updated = _now()
                return 202, None, "application/json"
        return 405, _problem(405, f"{method} is not allowed here."), "application/json"

    def _patch(self, group: FakeGroup, body: Any, content_type: str | None) -> tuple[int, Any, str]:
        if (content_type or "").split(";")[0].strip() != MERGE_PATCH:
            return 415, _problem(415, f"Content-Type must be {MERGE_PATCH}."), "application/json"
        if not isinstance(body, dict):
            return 400, _problem(400, "The request body must be a JSON object."), "application/json"
        if body.get("replicas") is not None:
            replicas = body["replicas"]
            if isinstance(replicas, bool) or not isinstance(replicas, int) \
                    or not 0 <= replicas <= MAX_REPLICAS:
                return 400, _problem(400, f"replicas must be an integer from 0 to {MAX_REPLICAS}."), \
                    "application/json"
            group.replicas = replicas
            self._sync_instances(group)
        group.updated = _now()
        return 200, group.as_json(), MERGE_PATCH  # the documented response media type

    def _sync_instances(self, group: FakeGroup) -> None:
        """Instances follow the replica count while the group is not stopped (lock held)."""
        if group.status in ("stopped", "succeeded", "failed"):
            group.instances.clear()
            return
        while len(group.instances) < group.replicas:
            group.instances.append({"id": str(uuid.uuid4()), "machine_id": str(uuid.uuid4()),
                                    "state": self.new_instance_state, "update_time": _now(),
                                    "version": group.version, "ready": True, "started": True,
                                    "deletion_cost": 0})
        del group.instances[group.replicas:]  # Salad picks which go; here the newest
        self._refresh_status(group)

    @staticmethod
    def _refresh_status(group: FakeGroup) -> None:
        # Salad: deploying = started, no instance running yet; running = at least one is.
        if group.status in ("running", "deploying"):
            running = any(i["state"] == "running" for i in group.instances)
            group.status = "running" if running else "deploying"

    def _send(self, req: BaseHTTPRequestHandler, status: int, payload: Any, ctype: str) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_raw(req, status, data, ctype)


def _problem(status: int, detail: str) -> dict[str, Any]:
    titles = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
              405: "Method Not Allowed", 415: "Unsupported Media Type", 429: "Too Many Requests",
              500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
    return {"type": "about:blank", "title": titles.get(status, "Error"), "status": status,
            "detail": detail}

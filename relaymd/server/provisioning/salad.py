"""The `salad` provider: one Salad Cloud container group, scaled through Salad's public REST API.

Every replica of the group runs `relaymd worker`, which registers with provider_id = its
SALAD_MACHINE_ID. This provider only sets how many replicas there should be; Salad picks the
nodes, and it also picks which instance goes when the count drops. Hence:

- `submit(n)` raises the replica count (capped by the cluster's max_workers and Salad's limit) and
  starts the group when it is stopped;
- `reconcile` reads the group (and its instances) and reports replicas asked for but not yet
  registered as workers;
- `scale_in` never lowers the count while any worker of this cluster is busy (the instance Salad
  removes could be the one running a job). Only once none has been busy for `idle_grace` seconds
  does it take the whole group to zero: stop, then replicas 0.

Salad's API as documented on these pages (where this comment and the docs disagree, the docs
win):
  https://docs.salad.com/api-reference (OpenAPI source: github.com/SaladTechnologies/salad-cloud-docs,
  api-specs/salad-cloud.yaml, API version 0.9.0-alpha.15)
  https://docs.salad.com/api-reference/container_groups/get-a-container-group-instance
  https://docs.salad.com/products/sce/container-groups/deployment-lifecycle
- auth: header `Salad-Api-Key` on every request (securitySchemes.ApiKeyAuth); errors are
  ProblemDetails JSON {type, title, status, detail, instance}.
- GET   {base}/organizations/{org}/projects/{project}/containers/{name} -> ContainerGroup:
  `replicas` (ContainerGroupReplicas: integer 0..500), `current_state.status` (pending, running,
  stopped, succeeded, failed, deploying), `current_state.description`.
- PATCH the same path, Content-Type application/merge-patch+json, body {"replicas": n}
  (ContainerGroupPatch.replicas: integer, minimum 0, maximum 500) -> 200 with the ContainerGroup.
- POST  .../containers/{name}/start and .../stop -> 202 Accepted, no body.
- GET   .../containers/{name}/instances -> {"instances": [{id, machine_id, state, update_time,
  version, ready, started}]}; state is one of allocating, downloading, creating, running, stopping.
  (Older pages call the instance id `instance_id`; only machine_id and state are used here.)
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from relaymd.config import ClusterConfig, SaladSettings
from relaymd.models import LIVE_WORKER_STATES, WorkerStatus
from relaymd.server.provisioning.base import ProviderError, Seen

log = logging.getLogger(__name__)

SALAD_MAX_REPLICAS = 500  # ContainerGroupPatch.replicas maximum
SALAD_MIN_REPLICAS = 0  # ContainerGroupPatch.replicas minimum
MERGE_PATCH = "application/merge-patch+json"

# current_state.status values in which replicas are (or will be) coming up.
ACTIVE_STATES = frozenset({"running", "deploying", "pending"})
GROUP_FAILED = "failed"  # the group could not start (Salad's word, not a job state)
# Stopped-like: nothing runs and a POST start is needed before any replica does.
STOPPED_STATES = frozenset({"stopped", "succeeded"})
REGISTERED = LIVE_WORKER_STATES


class SaladError(ProviderError):
    """One Salad API call that failed; `operation` and `reason` are kept apart so reconcile can
    put them in a short note while the full message also names the cluster and the group."""

    def __init__(self, message: str, operation: str, reason: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.reason = reason


class SaladProvider:
    def __init__(self, cluster: ClusterConfig, api_key: str, *,
                 clock: Callable[[], float] = time.monotonic,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if cluster.salad is None:
            raise ProviderError(f"cluster {cluster.name}: provider salad needs a `salad:` section "
                                "(organization, project, container_group)")
        if not api_key:
            raise ProviderError(f"cluster {cluster.name}: no Salad API key; set salad.api_key for "
                                "this cluster or RELAYMD_SALAD_API_KEY")
        self.cluster = cluster
        self.salad: SaladSettings = cluster.salad
        self._key = api_key  # only for scrubbing messages; never logged
        self._clock = clock
        self._client = httpx.AsyncClient(base_url=self.salad.base_url,
                                         timeout=self.salad.request_timeout,
                                         headers={"Salad-Api-Key": api_key}, transport=transport)
        s = self.salad
        self._path = (f"/organizations/{quote(s.organization, safe='')}"
                      f"/projects/{quote(s.project, safe='')}"
                      f"/containers/{quote(s.container_group, safe='')}")
        self.group_ref = f"{s.organization}/{s.project}/{s.container_group}"
        # What the last successful look at the group said; None until one succeeded.
        self._replicas: int | None = None
        self._status: str | None = None
        self._instances: list[dict[str, Any]] = []
        self._pending = 0
        self._idle_since: float | None = None  # when scale_in first saw no busy worker

    def __repr__(self) -> str:  # the default would be harmless too, but say so explicitly: no key
        return f"SaladProvider(cluster={self.cluster.name!r}, group={self.group_ref!r})"

    # -- the Provider protocol -------------------------------------------------------------------

    async def reconcile(self, workers: list[dict[str, Any]]) -> Seen:
        if any(w.get("status") == WorkerStatus.busy for w in workers):
            self._idle_since = None
        try:
            replicas, status, description = await self._get_group()
            # A stopped group has no instances worth a request (stragglers still stopping are
            # Salad's to clean up and are not billed as replicas).
            instances = [] if status in STOPPED_STATES else await self._list_instances()
        except SaladError as exc:
            return Seen(pending=self._pending, note=f"salad: {exc.operation} failed: {exc.reason}",
                        details=self._details(len(self._instances)))
        self._instances = instances
        registered = sum(1 for w in workers if w.get("status") in REGISTERED)
        if status in ACTIVE_STATES:
            self._pending = max(0, replicas - registered)
        else:
            self._pending = 0
        return Seen(pending=self._pending, note=self._note(status, description, replicas),
                    details={**self._details(len(instances)), "registered": registered,
                             "instance_states": dict(Counter(str(i.get("state")) for i in instances))})

    async def submit(self, count: int) -> int:
        self._idle_since = None  # work is wanted: the idle countdown starts over
        if count <= 0:
            return 0
        replicas, status, description = await self._get_group()
        if status == GROUP_FAILED:
            why = description or "no description"
            raise self._error("start container group", f"the group is in state failed ({why}); "
                              "fix its image or registry credentials in the Salad portal, then start "
                              "it there or wait for the next submit")
        stopped = status in STOPPED_STATES
        current = 0 if stopped else replicas  # a stopped group's replica count runs nothing
        ceiling = min(self.cluster.max_workers, SALAD_MAX_REPLICAS)
        target = min(ceiling, current + count)
        if target <= current:
            log.info("cluster %s: not scaling Salad group %s past %d replicas (max_workers %d, "
                     "Salad's limit %d); %d more asked for", self.cluster.name, self.group_ref,
                     current, self.cluster.max_workers, SALAD_MAX_REPLICAS, count)
            return 0
        if target != replicas:
            log.info("cluster %s: scaling Salad group %s from %d to %d replicas for queued work",
                     self.cluster.name, self.group_ref, current, target)
            await self._patch_replicas(target)
        if stopped:
            log.info("cluster %s: starting stopped Salad group %s with %d replicas",
                     self.cluster.name, self.group_ref, target)
            await self._post(f"{self._path}/start", "start container group")
            self._status = "deploying"
        self._pending += target - current
        return target - current

    async def scale_in(self, workers: list[dict[str, Any]]) -> None:
        now = self._clock()
        if any(w.get("status") == WorkerStatus.busy for w in workers):
            # Salad, not we, picks which instance a lower count removes: with any job running,
            # the count stays, or a multi-day job could lose its node.
            self._idle_since = None
            return
        if self._replicas is None or self._status is None:
            await self._get_group()  # nothing cached yet: the decision needs the real state
        if self._status in STOPPED_STATES or self._replicas == SALAD_MIN_REPLICAS:
            self._idle_since = None
            return
        if self._idle_since is None:
            self._idle_since = now
            log.info("cluster %s: no busy worker on Salad group %s (%s replicas); scaling to zero "
                     "in %.0fs unless work arrives", self.cluster.name, self.group_ref,
                     self._replicas, self.salad.idle_grace)
        if now - self._idle_since < self.salad.idle_grace:
            return
        log.info("cluster %s: no busy worker for %.0fs; stopping Salad group %s (%s replicas)",
                 self.cluster.name, now - self._idle_since, self.group_ref, self._replicas)
        # Stop first: it is what ends the billing. The replica count is then set to the minimum
        # so that a start from the portal does not bring back the old fleet.
        await self._post(f"{self._path}/stop", "stop container group")
        self._status = "stopped"
        self._pending = 0
        self._idle_since = None
        try:
            await self._patch_replicas(SALAD_MIN_REPLICAS)
        except SaladError as exc:
            log.warning("cluster %s: Salad group %s is stopped, but setting its replicas to %d "
                        "failed: %s", self.cluster.name, self.group_ref, SALAD_MIN_REPLICAS,
                        exc.reason)

    async def stop(self) -> None:
        """Close the HTTP client. The group keeps its replicas: workers on Salad hand their jobs
        back on their own, and the next orchestrator picks the group up as it finds it."""
        await self._client.aclose()

    # -- Salad API calls -------------------------------------------------------------------------

    async def _get_group(self) -> tuple[int, str, str]:
        op = "get container group"
        body = await self._request("GET", self._path, op)
        replicas, status, description = self._parse_group(body, op)
        self._replicas, self._status = replicas, status
        return replicas, status, description

    async def _list_instances(self) -> list[dict[str, Any]]:
        op = "list instances"
        body = await self._request("GET", f"{self._path}/instances", op)
        items = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("machine_id"), str) for i in items):
            raise self._shape_error(op, "an object with `instances`: [{machine_id, state, ...}]", body)
        return items

    async def _patch_replicas(self, replicas: int) -> None:
        op = f"set replicas to {replicas}"
        body = await self._request("PATCH", self._path, op, json_body={"replicas": replicas})
        self._replicas, self._status, _ = self._parse_group(body, op)

    async def _post(self, path: str, op: str) -> None:
        await self._request("POST", path, op, want_json=False)

    async def _request(self, method: str, path: str, op: str, *, json_body: Any = None,
                       want_json: bool = True) -> Any:
        headers: dict[str, str] = {}
        content: bytes | None = None
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers["Content-Type"] = MERGE_PATCH
        try:
            resp = await self._client.request(method, path, content=content, headers=headers)
        except httpx.TimeoutException:
            raise self._error(op, f"no answer from {self.salad.base_url} within "
                              f"{self.salad.request_timeout:g}s (salad.request_timeout); Salad "
                              "may be slow or unreachable, retrying next cycle") from None
        except httpx.HTTPError as exc:
            raise self._error(op, f"cannot reach {self.salad.base_url}: {type(exc).__name__}: "
                              f"{exc}; check salad.base_url and this machine's network") from None
        if resp.status_code >= 400:
            raise self._error(op, self._status_reason(resp)) from None
        if not want_json:
            return None
        try:
            return json.loads(resp.content)
        except ValueError:
            raise self._error(op, f"HTTP {resp.status_code} with a body that is not JSON "
                              f"({_snippet(resp.text)!r}); is salad.base_url Salad's API?") from None

    # -- messages ----------------------------------------------------------------------------------

    def _status_reason(self, resp: httpx.Response) -> str:
        code = resp.status_code
        text = _problem_text(resp)
        said = f"HTTP {code}" + (f": {text}" if text else f" {resp.reason_phrase}".rstrip())
        s = self.salad
        if code == 401:
            fix = ("Salad refused the API key; set a valid key in salad.api_key or "
                   "RELAYMD_SALAD_API_KEY (portal: Account, API Access)")
        elif code == 403:
            fix = (f"the API key has no access to organization {s.organization!r} / project "
                   f"{s.project!r}; use a key of a member of that organization")
        elif code == 404:
            fix = (f"no container group {s.container_group!r} in organization {s.organization!r}, "
                   f"project {s.project!r}; check salad.organization, salad.project and "
                   "salad.container_group (create the group in the Salad portal first)")
        elif code == 429:
            fix = "Salad is rate-limiting this key; retrying next cycle"
        elif code >= 500:
            fix = "a fault on Salad's side; retrying next cycle"
        else:
            fix = "Salad refused the request"
        return f"{said} ({fix})"

    def _parse_group(self, body: Any, op: str) -> tuple[int, str, str]:
        state = body.get("current_state") if isinstance(body, dict) else None
        replicas = body.get("replicas") if isinstance(body, dict) else None
        status = state.get("status") if isinstance(state, dict) else None
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not isinstance(status, str):
            raise self._shape_error(op, "a container group with `replicas` and "
                                    "`current_state.status`", body)
        description = state.get("description") if isinstance(state, dict) else None
        return replicas, status, description if isinstance(description, str) else ""

    def _shape_error(self, op: str, wanted: str, body: Any) -> SaladError:
        return self._error(op, f"expected {wanted}, got {_snippet(json.dumps(body))!r}; Salad's API "
                           "may have changed: report it with this message")

    def _error(self, op: str, reason: str) -> SaladError:
        reason = self._scrub(reason)
        return SaladError(self._message(op, reason), op, reason)

    def _message(self, op: str, reason: str) -> str:
        return self._scrub(f"cluster {self.cluster.name}: Salad {op} for container group "
                           f"{self.group_ref} failed: {reason}")

    def _scrub(self, text: str) -> str:
        # Salad has no reason to echo the key, but a proxy or a misconfigured base_url might.
        return text.replace(self._key, "<api key>") if self._key else text

    def _note(self, status: str, description: str, replicas: int) -> str:
        if status == GROUP_FAILED:
            return (f"salad: container group failed ({description or 'no description'}); fix its "
                    "image or registry credentials in the Salad portal")
        if status in STOPPED_STATES:
            return "container group stopped"
        if status == "pending":
            return f"container group preparing its image; {self._pending} replicas to come"
        if self._pending:
            return f"{self._pending} replica{'s' if self._pending != 1 else ''} starting"
        return f"{replicas} replica{'s' if replicas != 1 else ''} up"

    def _details(self, instances: int) -> dict[str, Any]:
        return {"replicas": self._replicas, "state": self._status, "instances": instances,
                "group": self.group_ref}


def _problem_text(resp: httpx.Response) -> str:
    """Salad's own words from a ProblemDetails body (title and detail), or the body's start."""
    try:
        body = json.loads(resp.content)
    except ValueError:
        return _snippet(resp.text) if resp.text.strip() else ""
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("title", "detail") if body.get(k)]
        if parts:
            return _snippet(": ".join(parts), 300)
    return _snippet(json.dumps(body))


def _snippet(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."

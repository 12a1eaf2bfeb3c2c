"""Typed httpx client of the orchestrator API, used by the CLI and the worker.

It never imports the server: it speaks only the models of `relaymd.models`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from relaymd.config import ReachSettings
from relaymd.models import (
    Assignment,
    BundleUploaded,
    CheckpointReport,
    CheckpointReserved,
    ClusterInfo,
    HeartbeatReply,
    Job,
    JobCreate,
    JobDetail,
    JobPage,
    Progress,
    Usage,
    Worker,
    WorkerRegister,
    WorkerRegistered,
)

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """The orchestrator refused a request (4xx/5xx) or could not be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.body = status, code, message, body

    def __str__(self) -> str:
        return self.message


def discover_url(settings: ReachSettings) -> str:
    """--url / RELAYMD_URL, else what the orchestrator of this home wrote, else host:port."""
    if settings.url:
        return settings.url.rstrip("/")
    try:
        data = json.loads(settings.endpoint_file.read_text())
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            return str(data["url"])
    except (OSError, ValueError):
        pass
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def discover_token(settings: ReachSettings, kind: str = "operator") -> str | None:
    """The configured token (RELAYMD_TOKEN for operators, RELAYMD_WORKER_TOKEN for workers),
    else the token file of this home (same machine)."""
    # A worker's settings hold only the bootstrap token; the operator's token is the CLI's.
    configured = getattr(settings, "worker_token" if kind == "worker" else "token", None)
    if configured is not None:
        return configured.get_secret_value()
    env = os.environ.get(f"RELAYMD_{kind.upper()}_TOKEN")
    if env:
        return env
    try:
        data = json.loads(settings.tokens_path.read_text())
    except (OSError, ValueError):
        return None
    value = data.get(kind) if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, proxy: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.initial_token = token  # the one it was made with (a worker's bootstrap token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if transport is None:
            # Without TCP_NODELAY a POST's body waits on the server's delayed ACK of its
            # headers (Nagle): ~40 ms per call instead of ~1 ms.
            transport = httpx.HTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)], proxy=proxy)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                 transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_token(self, token: str) -> None:
        self.http.headers["Authorization"] = f"Bearer {token}"

    # ------------------------------------------------------------------ plumbing

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise ApiError(0, "timeout", f"orchestrator at {self.url} did not answer in time"
                           ) from None
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"cannot reach the orchestrator at {self.url} "
                           f"({exc}); is it running? start it with `relaymd serve`") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict):
                code = str(body.get("error", "error"))
                message = str(body.get("message") or code)
            else:
                code, message = "error", response.text[:200] or response.reason_phrase
            raise ApiError(response.status_code, code, message, body)
        return response

    def _get(self, path: str, model: type[M], **kw: Any) -> M:
        return model.model_validate_json(self.request("GET", path, **kw).content)

    def _post(self, path: str, model: type[M], body: BaseModel | dict[str, Any] | None = None,
              ) -> M:
        payload = body.model_dump(mode="json", exclude_none=True) \
            if isinstance(body, BaseModel) else (body or {})
        return model.model_validate_json(self.request("POST", path, json=payload).content)

    # ------------------------------------------------------------------ operator

    def health(self) -> dict[str, Any]:
        return dict(self.request("GET", "/healthz").json())

    def upload_bundle(self, job_id: str, path: Path) -> BundleUploaded:
        def chunks() -> Iterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk

        response = self.request("PUT", f"/api/v1/jobs/{job_id}/bundle", content=chunks(),
                                headers={"Content-Type": "application/gzip"})
        return BundleUploaded.model_validate_json(response.content)

    def create_job(self, req: JobCreate) -> Job:
        return self._post("/api/v1/jobs", Job, req)

    def list_jobs(self, statuses: list[str] | None = None, limit: int = 500,
                  cursor: str | None = None) -> JobPage:
        params: dict[str, Any] = {"limit": limit}
        if statuses:
            params["status"] = ",".join(statuses)
        if cursor:
            params["cursor"] = cursor
        return self._get("/api/v1/jobs", JobPage, params=params)

    def all_jobs(self, statuses: list[str] | None = None) -> list[Job]:
        jobs: list[Job] = []
        cursor = None
        while True:
            page = self.list_jobs(statuses, 1000, cursor)
            jobs.extend(page.jobs)
            if page.next_cursor is None:
                return jobs
            cursor = page.next_cursor

    def get_job(self, ref: str) -> JobDetail:
        return self._get(f"/api/v1/jobs/{ref}", JobDetail)

    def cancel(self, ref: str) -> Job:
        return self._post(f"/api/v1/jobs/{ref}/cancel", Job)

    def requeue(self, ref: str) -> Job:
        return self._post(f"/api/v1/jobs/{ref}/requeue", Job)

    def purge(self, ref: str) -> dict[str, Any]:
        """Delete a finished job's rows and stored objects: {job_id, objects_deleted, database}."""
        return dict(self.request("DELETE", f"/api/v1/jobs/{ref}").json())

    def workers(self) -> list[Worker]:
        data = self.request("GET", "/api/v1/workers").json()
        return [Worker.model_validate(w) for w in data]

    def clusters(self) -> list[ClusterInfo]:
        data = self.request("GET", "/api/v1/clusters").json()
        return [ClusterInfo.model_validate(c) for c in data]

    def usage(self) -> Usage:
        """GPU-hours per job and per cluster, useful and redone."""
        return self._get("/api/v1/usage", Usage)

    def tokens(self) -> list[dict[str, Any]]:
        """Each cluster's bootstrap token, masked."""
        return list(self.request("GET", "/api/v1/tokens").json())

    def token(self, cluster: str) -> str:
        data = self.request("GET", f"/api/v1/tokens/{quote(cluster, safe='')}").json()
        return str(data["token"])

    def rotate_token(self, cluster: str) -> str:
        data = self.request("POST", f"/api/v1/tokens/{quote(cluster, safe='')}/rotate").json()
        return str(data["token"])

    def set_cluster_enabled(self, name: str, enabled: bool) -> ClusterInfo:
        action = "enable" if enabled else "disable"
        return self._post(f"/api/v1/clusters/{quote(name, safe='')}/{action}", ClusterInfo)

    # ------------------------------------------------------------------ worker

    def register(self, req: WorkerRegister) -> WorkerRegistered:
        return self._post("/api/v1/workers/register", WorkerRegistered, req)

    def heartbeat(self, worker_id: str, job_id: str | None = None, attempt: int | None = None,
                  progress: Progress | None = None) -> HeartbeatReply:
        body: dict[str, Any] = {}
        if job_id is not None:
            body.update(job_id=job_id, attempt=attempt)
        if progress is not None:
            body["progress"] = progress.model_dump(exclude_none=True)
        return self._post(f"/api/v1/workers/{worker_id}/heartbeat", HeartbeatReply, body)

    def deregister(self, worker_id: str) -> None:
        self.request("POST", f"/api/v1/workers/{worker_id}/deregister")

    def claim(self) -> Assignment | None:
        response = self.request("POST", "/api/v1/jobs/claim")
        if response.status_code == 204:
            return None
        return Assignment.model_validate_json(response.content)

    def reserve_checkpoint(self, job_id: str, attempt: int) -> CheckpointReserved:
        return self._post(f"/api/v1/jobs/{job_id}/checkpoints/reserve", CheckpointReserved,
                          {"attempt": attempt})

    def reject_checkpoint(self, job_id: str, seq: int, attempt: int, reason: str) -> Job:
        return self._post(f"/api/v1/jobs/{job_id}/checkpoints/{seq}/reject", Job,
                          {"attempt": attempt, "reason": reason[:500]})

    def report_checkpoint(self, job_id: str, report: CheckpointReport) -> Job:
        return self._post(f"/api/v1/jobs/{job_id}/checkpoints", Job, report)

    def release(self, job_id: str, attempt: int, reason: str = "released",
                checkpoint: CheckpointReport | None = None) -> Job:
        body: dict[str, Any] = {"attempt": attempt, "reason": reason}
        if checkpoint is not None:
            body["checkpoint"] = checkpoint.model_dump(mode="json", exclude_none=True)
        return self._post(f"/api/v1/jobs/{job_id}/release", Job, body)

    def complete(self, job_id: str, attempt: int,
                 checkpoint: CheckpointReport | None = None) -> Job:
        body: dict[str, Any] = {"attempt": attempt}
        if checkpoint is not None:
            body["checkpoint"] = checkpoint.model_dump(mode="json", exclude_none=True)
        return self._post(f"/api/v1/jobs/{job_id}/complete", Job, body)

    def fail(self, job_id: str, attempt: int, exit_code: int | None, reason: str,
             log_tail: str = "") -> Job:
        return self._post(f"/api/v1/jobs/{job_id}/fail", Job,
                          {"attempt": attempt, "exit_code": exit_code, "reason": reason,
                           "log_tail": log_tail})

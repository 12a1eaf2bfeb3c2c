"""Operator routes: jobs, workers, clusters, usage, bootstrap tokens, health and metrics; the route
table says which token each needs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relaymd import __version__
from relaymd.models import ClusterInfo, Health, JobCreate, JobStatus
from relaymd.server.api.base import ApiBase, ApiRoute, HTTPError, ok
from relaymd.server.errors import NotFound
from relaymd.server.metrics import CONTENT_TYPE


class OperatorRoutes(ApiBase):
    async def health(self, request: Request) -> Response:
        return ok(Health(version=__version__, uptime_s=self.service.clock()
                         - self.service.started_at))

    async def metrics_text(self, request: Request) -> Response:
        jobs, workers = await self.service.counts()
        gpu_hours = await self.service.gpu_hours_by_cluster()
        return Response(self.metrics.render(jobs, workers, gpu_hours), media_type=CONTENT_TYPE)

    async def usage(self, request: Request) -> Response:
        return ok(await self.service.usage_report())

    async def upload_bundle(self, request: Request) -> Response:
        job_id = self.job_id(request)
        fd, name = tempfile.mkstemp(prefix="relaymd-upload-", suffix=".tar.gz")
        path = Path(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_bundle:
                        raise HTTPError(413, "bundle_too_large",
                                        f"bundle over {self.max_bundle} bytes (max_bundle_bytes)")
                    fh.write(chunk)
            if size == 0:
                raise HTTPError(400, "empty_bundle", "empty request body; send bundle.tar.gz")
            return ok(await self.service.upload_bundle(job_id, path), 201)
        finally:
            path.unlink(missing_ok=True)  # noqa: ASYNC240 (a local temp file: microseconds)

    async def create_job(self, request: Request) -> Response:
        return ok(await self.service.create_job(await self.body(request, JobCreate)), 201)

    async def list_jobs(self, request: Request) -> Response:
        q = request.query_params
        statuses = [s for part in q.getlist("status") for s in part.split(",") if s]
        bad = [s for s in statuses if s not in JobStatus.__members__]
        if bad:
            raise HTTPError(400, "bad_status", f"unknown status {bad[0]!r}; one of "
                            + ", ".join(JobStatus.__members__))
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            raise HTTPError(400, "bad_limit", "limit must be an integer") from None
        if not 1 <= limit <= 1000:
            raise HTTPError(400, "bad_limit", "limit must be between 1 and 1000")
        body = await self.service.list_jobs_json(statuses or None, limit, q.get("cursor"))
        return Response(body, media_type="application/json")

    async def get_job(self, request: Request) -> Response:
        return ok(await self.service.get_job(request.path_params["job_id"]))

    async def purge(self, request: Request) -> Response:
        return JSONResponse(await self.service.purge(request.path_params["job_id"]))

    async def cancel(self, request: Request) -> Response:
        return ok(await self.service.cancel(request.path_params["job_id"]))

    async def requeue(self, request: Request) -> Response:
        return ok(await self.service.requeue(request.path_params["job_id"]))

    async def list_workers(self, request: Request) -> Response:
        statuses = [s for s in request.query_params.get("status", "").split(",") if s]
        return ok(await self.service.list_workers(statuses or None))

    async def list_clusters(self, request: Request) -> Response:
        clusters = self.clusters()
        return ok(await clusters.overview() if clusters is not None else [])

    async def enable_cluster(self, request: Request) -> Response:
        return ok(await self._switch(request.path_params["name"], True))

    async def disable_cluster(self, request: Request) -> Response:
        return ok(await self._switch(request.path_params["name"], False))

    async def _switch(self, name: str, enabled: bool) -> ClusterInfo:
        clusters = self.clusters()
        if clusters is None:
            raise NotFound(f"no cluster {name!r}: provisioning is not running")
        return await clusters.switch(name, enabled)

    async def list_tokens(self, request: Request) -> Response:
        return JSONResponse(self.service.tokens())

    async def show_token(self, request: Request) -> Response:
        return JSONResponse(self.service.token(request.path_params["name"]))

    async def rotate_token(self, request: Request) -> Response:
        return JSONResponse(await self.service.rotate_token(request.path_params["name"]))

    def routes(self) -> list[ApiRoute]:
        v1 = "/api/v1"
        return [  # method, path, name (the metrics' route label), token scope needed, handler
            ApiRoute("GET", "/healthz", "healthz", None, self.health),
            ApiRoute("GET", "/metrics", "metrics", "operator", self.metrics_text),
            ApiRoute("POST", f"{v1}/jobs", "create_job", "operator", self.create_job),
            ApiRoute("GET", f"{v1}/jobs", "list_jobs", "operator", self.list_jobs),
            ApiRoute("GET", f"{v1}/jobs/{{job_id}}", "get_job", "operator", self.get_job),
            ApiRoute("DELETE", f"{v1}/jobs/{{job_id}}", "purge", "operator", self.purge),
            ApiRoute("PUT", f"{v1}/jobs/{{job_id}}/bundle", "upload_bundle", "operator",
                     self.upload_bundle),
            ApiRoute("POST", f"{v1}/jobs/{{job_id}}/cancel", "cancel", "operator", self.cancel),
            ApiRoute("POST", f"{v1}/jobs/{{job_id}}/requeue", "requeue", "operator",
                     self.requeue),
            ApiRoute("GET", f"{v1}/workers", "list_workers", "operator", self.list_workers),
            ApiRoute("GET", f"{v1}/clusters", "list_clusters", "operator", self.list_clusters),
            ApiRoute("POST", f"{v1}/clusters/{{name}}/enable", "enable_cluster", "operator",
                     self.enable_cluster),
            ApiRoute("POST", f"{v1}/clusters/{{name}}/disable", "disable_cluster", "operator",
                     self.disable_cluster),
            ApiRoute("GET", f"{v1}/usage", "usage", "operator", self.usage),
            ApiRoute("GET", f"{v1}/tokens", "list_tokens", "operator", self.list_tokens),
            ApiRoute("GET", f"{v1}/tokens/{{name}}", "show_token", "operator", self.show_token),
            ApiRoute("POST", f"{v1}/tokens/{{name}}/rotate", "rotate_token", "operator",
                     self.rotate_token),
        ]

"""Operator routes: jobs, workers, clusters, bootstrap tokens, health and metrics."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from relaymd import __version__
from relaymd.models import Health, JobCreate, JobStatus
from relaymd.server.api.base import ApiBase, HTTPError, ok
from relaymd.server.auth import Principal


class OperatorRoutes(ApiBase):
    async def health(self, request: Request, _: Principal | None) -> Response:
        return ok(Health(version=__version__, uptime_s=self.service.clock()
                         - self.service.started_at))

    async def metrics_text(self, request: Request, _: Principal | None) -> Response:
        jobs, workers = await self.service.counts()
        return PlainTextResponse(self.metrics.render(jobs, workers),
                                 media_type="text/plain; version=0.0.4")

    async def upload_bundle(self, request: Request, _: Principal | None) -> Response:
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

    async def create_job(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.create_job(await self.body(request, JobCreate)), 201)

    async def list_jobs(self, request: Request, _: Principal | None) -> Response:
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

    async def get_job(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.get_job(request.path_params["job_id"]))

    async def purge(self, request: Request, _: Principal | None) -> Response:
        return JSONResponse(await self.service.purge(request.path_params["job_id"]))

    async def cancel(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.cancel(request.path_params["job_id"]))

    async def requeue(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.requeue(request.path_params["job_id"]))

    async def list_workers(self, request: Request, _: Principal | None) -> Response:
        statuses = [s for s in request.query_params.get("status", "").split(",") if s]
        return ok(await self.service.list_workers(statuses or None))

    async def list_clusters(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.clusters())

    async def enable_cluster(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.switch_cluster(request.path_params["name"], True))

    async def disable_cluster(self, request: Request, _: Principal | None) -> Response:
        return ok(await self.service.switch_cluster(request.path_params["name"], False))

    async def list_tokens(self, request: Request, _: Principal | None) -> Response:
        return JSONResponse(self.service.tokens())

    async def show_token(self, request: Request, _: Principal | None) -> Response:
        return JSONResponse(self.service.token(request.path_params["name"]))

    async def rotate_token(self, request: Request, _: Principal | None) -> Response:
        return JSONResponse(await self.service.rotate_token(request.path_params["name"]))

    def routes(self) -> list[Route]:
        e = self.endpoint
        v1 = "/api/v1"
        return [
            Route("/healthz", e("healthz", None, self.health), methods=["GET"]),
            Route("/metrics", e("metrics", "operator", self.metrics_text), methods=["GET"]),
            Route(f"{v1}/jobs", e("create_job", "operator", self.create_job), methods=["POST"]),
            Route(f"{v1}/jobs", e("list_jobs", "operator", self.list_jobs), methods=["GET"]),
            Route(f"{v1}/jobs/{{job_id}}", e("get_job", "operator", self.get_job),
                  methods=["GET"]),
            Route(f"{v1}/jobs/{{job_id}}", e("purge", "operator", self.purge),
                  methods=["DELETE"]),
            Route(f"{v1}/jobs/{{job_id}}/bundle", e("upload_bundle", "operator",
                                                     self.upload_bundle), methods=["PUT"]),
            Route(f"{v1}/jobs/{{job_id}}/cancel", e("cancel", "operator", self.cancel),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/requeue", e("requeue", "operator", self.requeue),
                  methods=["POST"]),
            Route(f"{v1}/workers", e("list_workers", "operator", self.list_workers),
                  methods=["GET"]),
            Route(f"{v1}/clusters", e("list_clusters", "operator", self.list_clusters),
                  methods=["GET"]),
            Route(f"{v1}/clusters/{{name}}/enable", e("enable_cluster", "operator",
                                                       self.enable_cluster), methods=["POST"]),
            Route(f"{v1}/clusters/{{name}}/disable", e("disable_cluster", "operator",
                                                        self.disable_cluster), methods=["POST"]),
            Route(f"{v1}/tokens", e("list_tokens", "operator", self.list_tokens),
                  methods=["GET"]),
            Route(f"{v1}/tokens/{{name}}", e("show_token", "operator", self.show_token),
                  methods=["GET"]),
            Route(f"{v1}/tokens/{{name}}/rotate", e("rotate_token", "operator",
                                                     self.rotate_token), methods=["POST"]),
        ]

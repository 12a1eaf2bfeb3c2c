"""Worker routes: registration, heartbeat, claim, checkpoints and settling a job."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relaymd.models import (
    CheckpointRejected,
    CheckpointReport,
    Complete,
    Fail,
    Heartbeat,
    Lease,
    Release,
    WorkerRegister,
)
from relaymd.server.api.base import ApiBase, HTTPError, ok
from relaymd.server.auth import Principal


class WorkerRoutes(ApiBase):
    async def register(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.cluster is not None
        return ok(await self.service.register(await self.body(request, WorkerRegister),
                                              p.cluster), 201)

    async def heartbeat(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        hb = await self.body(request, Heartbeat)
        reply = await self.service.heartbeat(
            p.worker_id, hb.job_id, hb.attempt,
            hb.progress.model_dump() if hb.progress is not None else None)
        return ok(reply)

    async def deregister(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        await self.service.deregister(p.worker_id)
        return Response(status_code=204)

    async def claim(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        assignment = await self.service.claim(p.worker_id)
        return Response(status_code=204) if assignment is None else ok(assignment)

    async def reserve(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        lease = await self.body(request, Lease)
        return ok(await self.service.reserve_checkpoint(p.worker_id, self.job_id(request),
                                                        lease.attempt), 201)

    async def report(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        rep = await self.body(request, CheckpointReport)
        return ok(await self.service.report_checkpoint(p.worker_id, self.job_id(request), rep))

    async def reject(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        body = await self.body(request, CheckpointRejected)
        text = request.path_params["seq"]
        if not (text.isascii() and text.isdigit() and 0 < len(text) < 12):
            raise HTTPError(400, "bad_request", f"checkpoint seq {text[:40]!r} must be a positive "
                            "integer")
        seq = int(text)
        return ok(await self.service.reject_checkpoint(p.worker_id, self.job_id(request), seq,
                                                       body.attempt, body.reason))

    async def release(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        rel = await self.body(request, Release)
        return ok(await self.service.release(p.worker_id, self.job_id(request), rel.attempt,
                                             rel.reason, rel.checkpoint))

    async def complete(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        done = await self.body(request, Complete)
        return ok(await self.service.complete(p.worker_id, self.job_id(request), done.attempt,
                                              done.checkpoint))

    async def fail(self, request: Request, p: Principal | None) -> Response:
        assert p is not None and p.worker_id is not None
        f = await self.body(request, Fail)
        return ok(await self.service.fail(p.worker_id, self.job_id(request), f.attempt,
                                          f.exit_code, f.reason, f.log_tail))

    def routes(self) -> list[Route]:
        e = self.endpoint
        v1 = "/api/v1"
        return [
            Route(f"{v1}/jobs/claim", e("claim", "worker", self.claim), methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/checkpoints/reserve", e("reserve", "worker",
                                                                  self.reserve), methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/checkpoints", e("checkpoint", "worker", self.report),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/checkpoints/{{seq}}/reject", e("reject", "worker",
                                                                        self.reject),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/release", e("release", "worker", self.release),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/complete", e("complete", "worker", self.complete),
                  methods=["POST"]),
            Route(f"{v1}/jobs/{{job_id}}/fail", e("fail", "worker", self.fail), methods=["POST"]),
            Route(f"{v1}/workers/register", e("register", "bootstrap", self.register),
                  methods=["POST"]),
            Route(f"{v1}/workers/{{worker_id}}/heartbeat", e("heartbeat", "worker",
                                                             self.heartbeat), methods=["POST"]),
            Route(f"{v1}/workers/{{worker_id}}/deregister", e("deregister", "worker",
                                                              self.deregister), methods=["POST"]),
        ]

"""Worker routes: registration, heartbeat, claim, checkpoints and settling a job; the route table
says which token each needs."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

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
from relaymd.server.api.base import ApiBase, ApiRoute, HTTPError, ok


class WorkerRoutes(ApiBase):
    async def register(self, request: Request) -> Response:
        cluster = self.caller(request).cluster  # a bootstrap token's cluster
        assert cluster is not None
        return ok(await self.service.register(await self.body(request, WorkerRegister), cluster),
                  201)

    async def heartbeat(self, request: Request) -> Response:
        worker_id = self.worker_id(request)
        hb = await self.body(request, Heartbeat)
        reply = await self.service.heartbeat(
            worker_id, hb.job_id, hb.attempt,
            hb.progress.model_dump() if hb.progress is not None else None)
        return ok(reply)

    async def deregister(self, request: Request) -> Response:
        worker_id = self.worker_id(request)
        await self.service.deregister(worker_id)
        return Response(status_code=204)

    async def claim(self, request: Request) -> Response:
        worker_id = self.worker_id(request)
        assignment = await self.service.claim(worker_id)
        return Response(status_code=204) if assignment is None else ok(assignment)

    async def reserve(self, request: Request) -> Response:
        worker_id = self.worker_id(request)
        lease = await self.body(request, Lease)
        return ok(await self.service.reserve_checkpoint(worker_id, self.job_id(request),
                                                        lease.attempt), 201)

    async def report(self, request: Request) -> Response:
        worker_id = self.worker_id(request)
        rep = await self.body(request, CheckpointReport)
        return ok(await self.service.report_checkpoint(worker_id, self.job_id(request), rep))

    async def reject(self, request: Request) -> Response:
        worker_id = self.worker_id(request)
        body = await self.body(request, CheckpointRejected)
        text = request.path_params["seq"]
        if not (text.isascii() and text.isdigit() and 0 < len(text) < 12):
            raise HTTPError(400, "bad_request", f"checkpoint seq {text[:40]!r} must be a positive "
                            "integer")
        seq = int(text)
        return ok(await self.service.reject_checkpoint(worker_id, self.job_id(request), seq,
                                                       body.attempt, body.reason))

    async def release(self, request: Request) -> Response:
        worker_id = self.worker_id(request)
        rel = await self.body(request, Release)
        return ok(await self.service.release(worker_id, self.job_id(request), rel.attempt,
                                             rel.reason, rel.checkpoint))

    async def complete(self, request: Request) -> Response:
        worker_id = self.worker_id(request)
        done = await self.body(request, Complete)
        return ok(await self.service.complete(worker_id, self.job_id(request), done.attempt,
                                              done.checkpoint))

    async def fail(self, request: Request) -> Response:
        worker_id = self.worker_id(request)
        f = await self.body(request, Fail)
        return ok(await self.service.fail(worker_id, self.job_id(request), f.attempt,
                                          f.exit_code, f.reason, f.log_tail))

    def routes(self) -> list[ApiRoute]:
        v1 = "/api/v1"
        job = f"{v1}/jobs/{{job_id}}"
        return [  # method, path, name (the metrics' route label), token scope needed, handler
            ApiRoute("POST", f"{v1}/jobs/claim", "claim", "worker", self.claim),
            ApiRoute("POST", f"{job}/checkpoints/reserve", "reserve", "worker", self.reserve),
            ApiRoute("POST", f"{job}/checkpoints", "checkpoint", "worker", self.report),
            ApiRoute("POST", f"{job}/checkpoints/{{seq}}/reject", "reject", "worker", self.reject),
            ApiRoute("POST", f"{job}/release", "release", "worker", self.release),
            ApiRoute("POST", f"{job}/complete", "complete", "worker", self.complete),
            ApiRoute("POST", f"{job}/fail", "fail", "worker", self.fail),
            ApiRoute("POST", f"{v1}/workers/register", "register", "bootstrap", self.register),
            ApiRoute("POST", f"{v1}/workers/{{worker_id}}/heartbeat", "heartbeat", "worker",
                     self.heartbeat),
            ApiRoute("POST", f"{v1}/workers/{{worker_id}}/deregister", "deregister", "worker",
                     self.deregister),
        ]

"""The orchestrator's domain errors, one family: each carries the HTTP status and error code it
is answered with (`api/base.py` turns them into typed JSON), and its message says what happened
and what to do."""

from __future__ import annotations


class BadRequest(Exception):
    """The caller sent something unusable; the message says what and how to fix it."""

    def __init__(self, message: str, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.code, self.status = code, status


class ConflictError(BadRequest):
    """The request conflicts with the state of things (not a job transition: see below)."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message, code, 409)


class Forbidden(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, "forbidden", 403)


class NotFound(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, "not_found", 404)


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


class WorkerConflict(ConflictError):
    """A worker-level change that its current status does not allow."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "worker_conflict")


class InvalidCheckpoint(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, "invalid_checkpoint", 422)


class TransitionConflict(ConflictError):
    """The job is not in a state (or lease) that allows the change; nothing was written. Answered
    with the typed `Conflict` body (models.py): what the caller asked for, what the job is."""

    def __init__(self, job_id: str, current: str, to: str, attempt: int, message: str) -> None:
        super().__init__(message, "job_transition_conflict")
        self.job_id, self.current, self.to, self.attempt = job_id, current, to, attempt
        self.message = message

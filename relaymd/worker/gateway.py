"""The worker's calls to the orchestrator and to storage, with retries, backoff and jitter.

Network trouble and 5xx answers are retried; a 4xx is the orchestrator's final word and goes
straight back to the caller (a 409 means the lease is gone). Blocking calls run in threads so the
heartbeat keeps beating while a checkpoint uploads.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from relaymd.client import ApiError, Client
from relaymd.storage import IntegrityError, ObjectNotFound, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.status == 0 or exc.status >= 500
    if isinstance(exc, IntegrityError | ObjectNotFound):
        # The bytes are wrong or gone (objects are immutable; the orchestrator saw each one
        # before accepting it), not the link: fetching again cannot help.
        return False
    return isinstance(exc, StorageError | OSError | TimeoutError)


class Gateway:
    def __init__(self, client: Client, max_delay: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.max_delay = max_delay
        self.clock = clock
        self.last_contact = clock()  # monotonic: a duration, not a deadline

    async def call(self, what: str, fn: Callable[..., T], *args: Any,
                   give_up_after: float | None = None, **kwargs: Any) -> T:
        """Run fn in a thread, retrying transient failures with capped exponential backoff."""
        started = self.clock()
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await asyncio.to_thread(fn, *args, **kwargs)
                if getattr(fn, "__self__", None) is self.client:
                    self.last_contact = self.clock()
                return result
            except Exception as exc:
                if isinstance(exc, ApiError) and exc.status:
                    self.last_contact = self.clock()  # it answered: the link is up
                if not retryable(exc):
                    raise
                waited = self.clock() - started
                if give_up_after is not None and waited >= give_up_after:
                    raise
                pause = min(self.max_delay, delay) * random.uniform(0.5, 1.0)
                if give_up_after is not None:
                    pause = max(0.0, min(pause, give_up_after - waited))
                log.warning("%s failed (try %d): %s; retrying in %.1fs", what, attempt, exc, pause)
                await asyncio.sleep(pause)
                delay *= 2

    def silent_for(self) -> float:
        return self.clock() - self.last_contact

"""The worker's calls to the orchestrator and to storage, with retries, backoff and jitter.

Network trouble and 5xx answers are retried; a 4xx is the orchestrator's final word and goes
straight back to the caller (a 409 means the lease is gone). Blocking calls run in threads so the
heartbeat keeps beating while a checkpoint uploads. The retry loop itself is tenacity's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential,
    wait_random_exponential,
)

from relaymd.client import ApiError, Client
from relaymd.storage import IntegrityError, ObjectNotFound, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST_DELAY = 0.5  # seconds before the first retry (before jitter); doubles each time up to the cap


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.status == 0 or exc.status >= 500
    if isinstance(exc, IntegrityError | ObjectNotFound):
        # The bytes are wrong or gone (objects are immutable; the orchestrator saw each one
        # before accepting it), not the link: fetching again cannot help.
        return False
    return isinstance(exc, StorageError | OSError | TimeoutError)


def backoff(max_delay: float) -> Callable[[RetryCallState], float]:
    """min(max_delay, 0.5 s * 2**(try - 1)) scaled by a random factor in [0.5, 1]: at least half
    the capped delay (so retries really back off), at most all of it (so workers that lost the
    orchestrator together spread out). Written as tenacity's fixed half plus its full-jitter half."""
    half = FIRST_DELAY / 2
    return (wait_exponential(multiplier=half, max=max_delay / 2)
            + wait_random_exponential(multiplier=half, max=max_delay / 2))


class Gateway:
    def __init__(self, client: Client, max_delay: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.max_delay = max_delay
        self.clock = clock
        self.last_contact = clock()  # monotonic: a duration, not a deadline

    async def call(self, what: str, fn: Callable[..., T], *args: Any,
                   give_up_after: float | None = None, **kwargs: Any) -> T:
        """Run fn in a thread, retrying transient failures with capped exponential backoff.

        With give_up_after (seconds), the last failure is raised once that long has passed
        since the first try, and no pause runs past that moment.
        """
        started = self.clock()
        backoff_wait = backoff(self.max_delay)

        def waited() -> float:
            return self.clock() - started

        def stop(state: RetryCallState) -> bool:
            return give_up_after is not None and waited() >= give_up_after

        def wait(state: RetryCallState) -> float:
            pause = backoff_wait(state)
            if give_up_after is not None:
                pause = max(0.0, min(pause, give_up_after - waited()))
            return pause

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s failed (try %d): %s; retrying in %.1fs", what, state.attempt_number,
                        exc, state.upcoming_sleep)

        async def once() -> T:
            try:
                result = await asyncio.to_thread(fn, *args, **kwargs)
            except ApiError as exc:
                if exc.status:
                    self.last_contact = self.clock()  # it answered: the link is up
                raise
            if getattr(fn, "__self__", None) is self.client:
                self.last_contact = self.clock()
            return result

        # A fresh AsyncRetrying per call: tenacity keeps a loop's state on the object (per
        # thread), and the worker runs several calls at once on one event loop.
        retrying = AsyncRetrying(
            sleep=asyncio.sleep, stop=stop, wait=wait, retry=retry_if_exception(retryable),
            before_sleep=before_sleep, reraise=True)
        return await retrying(once)

    def silent_for(self) -> float:
        return self.clock() - self.last_contact

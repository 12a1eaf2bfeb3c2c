"""What an S3 store's failures mean: botocore's and the network's exceptions as one-line
StorageErrors (never a credential in them), which of those another try cannot fix, and the retry
of a streamed transfer. Used by `s3.py`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from relaymd.storage.base import IntegrityError, ObjectExists, ObjectNotFound, StorageError

log = logging.getLogger("relaymd.storage.s3")

NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
              "InvalidToken", "ExpiredToken", "Unauthorized", "401"}
OUTER_ATTEMPTS = 3  # re-runs of a streamed transfer; botocore retries each request inside
T = TypeVar("T")


class Permanent(StorageError):
    """Asking again cannot help: refused credentials, no such bucket, an unsatisfiable range."""


def transient(exc: BaseException) -> bool:
    """Whether re-running a transfer that failed with exc may help: a StorageError other than
    "not there", "already there", "wrong bytes" or a Permanent refusal."""
    return isinstance(exc, StorageError) and not isinstance(
        exc, ObjectNotFound | ObjectExists | IntegrityError | Permanent)


def retry_transfer(what: str, fn: Callable[[], T]) -> T:
    """Run fn, a streamed transfer (whose body botocore cannot replay), again on transient
    errors: OUTER_ATTEMPTS tries, 0.5 s, 1 s, ... (at most 10 s) apart; the last error is raised."""
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (try %d of %d), again in %.1fs: %s", what, state.attempt_number,
                    OUTER_ATTEMPTS, state.upcoming_sleep, exc)

    retrying = Retrying(stop=stop_after_attempt(OUTER_ATTEMPTS),
                        wait=wait_exponential(multiplier=0.5, max=10.0),
                        retry=retry_if_exception(transient), before_sleep=before_sleep,
                        reraise=True)
    return retrying(fn)


class S3Errors:
    """Turns failures at one bucket into StorageErrors that name the endpoint and the key."""

    def __init__(self, endpoint: str, url: str, bucket: str) -> None:
        self.endpoint, self.url, self.bucket = endpoint, url, bucket

    @contextmanager
    def translating(self, action: str, key: str = "") -> Iterator[None]:
        """botocore's and the network's exceptions as one-line StorageErrors (no secrets)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        what = f"{action} {key}".strip()
        try:
            yield
        except StorageError:
            raise
        except ClientError as exc:
            raise self.client_error(exc, what, key) from None
        except NoCredentialsError:
            raise StorageError(
                f"S3 {self.endpoint}: no credentials to {what}; set s3_access_key_id and "
                "s3_secret_access_key (RELAYMD_S3_ACCESS_KEY_ID / RELAYMD_S3_SECRET_ACCESS_KEY) "
                "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
        except (BotoCoreError, OSError) as exc:
            raise StorageError(
                f"S3 {self.endpoint} unreachable or failing: cannot {what}: "
                f"{type(exc).__name__}: {exc}") from None

    def client_error(self, exc: Any, what: str, key: str) -> StorageError:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = err.get("Message") or code or f"HTTP {status}"
        if code in NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
            return ObjectNotFound(f"no object {key} in {self.url} ({self.endpoint})")
        if code == "PreconditionFailed" or status == 412:
            return self.exists(key)
        if code == "NoSuchBucket":
            return Permanent(f"S3 {self.endpoint}: bucket {self.bucket!r} does not exist")
        if code == "InvalidRange" or status == 416:
            return Permanent(f"S3 {self.endpoint}: cannot {what}: the range is past its end")
        if code in AUTH_CODES or status in (401, 403):
            return Permanent(
                f"S3 {self.endpoint} refused the credentials to {what} ({code or status}: "
                f"{message}); check s3_access_key_id / s3_secret_access_key and the key's "
                f"rights on bucket {self.bucket!r}")
        return StorageError(f"S3 {self.endpoint}: cannot {what}: {code or status}: {message}")

    def exists(self, key: str) -> ObjectExists:
        return ObjectExists(f"object {key} already exists in {self.url}; stored objects are "
                            "never overwritten (write a new key)")

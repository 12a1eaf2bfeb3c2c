"""Keeping secret values out of logs: `RedactSecrets`, a handler filter that masks given values
wherever they appear in a record, `environment_secrets` (what in the environment looks like a
secret) and `redact_logs`, which installs the filter on the root logger's handlers."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from relaymd.models import MIN_ENV_SECRET_LENGTH, RESERVED_ENV_PREFIXES
from relaymd.secrets.base import MASK

# What every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime"}


class RedactSecrets(logging.Filter):
    """A handler filter that writes "****" wherever one of the given values appears in a record:
    its message, its arguments, a formatted exception or stack, its `extra` fields."""

    def __init__(self, secrets: Iterable[str | None], name: str = "") -> None:
        super().__init__(name)
        self._secrets: list[str] = []
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        """More values to hide (e.g. a token issued after the filter was installed)."""
        values = set(self._secrets) | {s for s in secrets if isinstance(s, str) and s}
        # Longest first: a secret that contains another is replaced whole.
        self._secrets = sorted(values, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for value in self._secrets:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def _has_secret(self, text: str) -> bool:
        return any(value in text for value in self._secrets)

    def _scrub(self, arg: Any) -> Any:
        if isinstance(arg, str):
            return self.redact(arg) if self._has_secret(arg) else arg
        if arg is None or isinstance(arg, int | float):
            return arg
        try:
            text = str(arg)
        except Exception:
            return arg
        # An object whose text holds a secret goes in as its redacted text.
        return self.redact(text) if self._has_secret(text) else arg

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        args = record.args
        if isinstance(args, Mapping):
            record.args = {k: self._scrub(v) for k, v in args.items()}
        elif isinstance(args, tuple):
            record.args = tuple(self._scrub(a) for a in args)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what can be shown, redacted
            message = f"{record.msg} {record.args}"
        redacted = self.redact(message)
        if redacted != message or record.args != args:
            record.msg, record.args = redacted, ()
        if record.exc_info:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            if self._has_secret(text):
                record.exc_text = self.redact(text)
        if record.stack_info and self._has_secret(record.stack_info):
            record.stack_info = self.redact(record.stack_info)
        # Fields passed with `extra={...}` reach the output of any formatter that shows them
        # (the worker's JSON lines, a `%(command)s` format). They are scrubbed here, on the
        # record, rather than in a formatter's finished line: that covers every formatter, and
        # escaping (JSON's \uXXXX, \", \\) cannot hide a secret from the search.
        for key, value in list(vars(record).items()):
            if key not in _RECORD_FIELDS:
                scrubbed = self._scrub(value)
                if scrubbed is not value:
                    setattr(record, key, scrubbed)
        return True


SECRET_ENV_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL", "AUTH")


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values in the environment that look like secrets (RELAYMD_WORKER_TOKEN,
    AWS_SECRET_ACCESS_KEY, INFISICAL_CLIENT_SECRET, TAILSCALE_AUTHKEY, ...): for redaction.
    The names are the worker's own (the prefixes a job's `env:` may not set)."""
    source = os.environ if environ is None else environ
    return [v for k, v in source.items() if k.upper().startswith(RESERVED_ENV_PREFIXES)
            and any(w in k.upper() for w in SECRET_ENV_WORDS) and len(v) >= MIN_ENV_SECRET_LENGTH]


def redact_logs(values: Iterable[str | None]) -> None:
    """Install (or extend) a RedactSecrets filter on every handler of the root logger."""
    for handler in logging.getLogger().handlers:
        found = next((f for f in handler.filters if isinstance(f, RedactSecrets)), None)
        if found is None:
            handler.addFilter(RedactSecrets(values))
        else:
            found.add(*values)

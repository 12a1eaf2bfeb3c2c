"""What every secrets provider shares: the SecretsProvider protocol, SecretsError, the names
RelayMD treats as secrets, and the masks that keep a value out of messages and reprs."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

MASK = "****"

# The env-var style names RelayMD treats as secrets (wherever they come from).
SECRET_NAMES: frozenset[str] = frozenset({
    "RELAYMD_OPERATOR_TOKEN",
    "RELAYMD_WORKER_TOKEN",
    "RELAYMD_TOKEN",
    "RELAYMD_S3_ACCESS_KEY_ID",
    "RELAYMD_S3_SECRET_ACCESS_KEY",
    "RELAYMD_SALAD_API_KEY",
    "RELAYMD_TAILSCALE_AUTH_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
})

# Settings fields a secrets provider may fill.
SETTING_SECRETS: tuple[str, ...] = (
    "operator_token", "worker_token", "token", "s3_access_key_id", "s3_secret_access_key",
    "salad_api_key", "tailscale_auth_key",
)


class SecretsError(Exception):
    """A provider could not deliver secrets; the message names the provider, the cause and the fix,
    and never contains a secret value."""


@runtime_checkable
class SecretsProvider(Protocol):
    name: str

    def fetch(self) -> dict[str, str]:
        """Secret NAME -> value."""
        ...


def mask(value: str | None) -> str:
    """What to show for a secret: "****" when set (no characters of it, not even its length), ""
    when unset."""
    return MASK if value else ""


class Hidden:
    """A string kept out of reprs, so a debugger, a traceback with locals or `vars()` shows ****."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return repr(MASK)

    __str__ = __repr__


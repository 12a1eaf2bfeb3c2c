"""Where RelayMD's secrets come from: the process environment, a private file, or Infisical.

A provider's `fetch()` returns secret NAME -> value (names as environment variables spell them,
RELAYMD_WORKER_TOKEN and so on); `settings_from_secrets` turns those into Settings field names.
The config loader picks a provider with `open_secrets`; the orchestrator installs `RedactSecrets`
on its log handlers so a value that slips into a log line comes out as "****".

Nothing here puts a secret value, a client secret or an access token into an exception message,
a log record or a repr: errors name the provider, what went wrong and the fix.

Modules: `base.py` (the protocol, SecretsError, the secret names, masks), `local.py` (env and
file), `infisical.py` (the Infisical client), `redact.py` (the log filter); this module picks a
provider and maps what it fetched onto Settings fields. Every name is importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from relaymd.secrets.base import (
    MASK,
    SECRET_NAMES,
    SETTING_SECRETS,
    SecretsError,
    SecretsProvider,
    mask,
)
from relaymd.secrets.infisical import DEFAULT_INFISICAL_SITE, InfisicalSecrets
from relaymd.secrets.local import EnvSecrets, FileSecrets
from relaymd.secrets.redact import (
    SECRET_ENV_WORDS,
    RedactSecrets,
    environment_secrets,
    redact_logs,
)

__all__ = [
    "DEFAULT_INFISICAL_SITE",
    "INFISICAL_KEYS",
    "MASK",
    "PROVIDERS",
    "SECRET_ENV_WORDS",
    "SECRET_NAMES",
    "SETTING_SECRETS",
    "EnvSecrets",
    "FileSecrets",
    "InfisicalSecrets",
    "RedactSecrets",
    "SecretsError",
    "SecretsProvider",
    "environment_secrets",
    "mask",
    "open_secrets",
    "redact_logs",
    "settings_from_secrets",
]

PROVIDERS = ("env", "file", "infisical")
INFISICAL_KEYS = ("site_url", "client_id", "client_secret", "project_id", "environment", "path", "timeout")
_AWS_FALLBACK = {"AWS_ACCESS_KEY_ID": "s3_access_key_id", "AWS_SECRET_ACCESS_KEY": "s3_secret_access_key"}


def open_secrets(kind: str, *, environ: Mapping[str, str], file: Path | None = None,
                 infisical: Mapping[str, str] | None = None) -> SecretsProvider:
    """The provider named `kind` ("env", "file" or "infisical"), configured."""
    choice = (kind or "").strip().lower()
    if choice == "env":
        return EnvSecrets(environ)
    if choice == "file":
        if file is None:
            raise SecretsError("file: no secrets file given; set the path of a YAML or JSON file of "
                               "NAME: value with mode 0600")
        return FileSecrets(Path(file))
    if choice == "infisical":
        cfg = dict(infisical or {})
        unknown = sorted(set(cfg) - set(INFISICAL_KEYS))
        if unknown:
            raise SecretsError(f"infisical: unknown setting(s) {', '.join(unknown)}; the settings are "
                               f"{', '.join(INFISICAL_KEYS)}")
        client_id = cfg.get("client_id") or environ.get("INFISICAL_CLIENT_ID") or ""
        client_secret = cfg.get("client_secret") or environ.get("INFISICAL_CLIENT_SECRET") or ""
        if not client_id or not client_secret:
            raise SecretsError("infisical: no machine identity credentials; set INFISICAL_CLIENT_ID and "
                               "INFISICAL_CLIENT_SECRET (the universal-auth client id and client secret) "
                               "in this process's environment")
        project_id = cfg.get("project_id") or ""
        if not project_id:
            raise SecretsError("infisical: project_id is not set; give the project's ID (Infisical: "
                               "project settings, 'Copy project ID')")
        timeout = cfg.get("timeout")
        try:
            timeout_s = float(timeout) if timeout not in (None, "") else 15.0
        except (TypeError, ValueError):
            raise SecretsError(f"infisical: timeout {timeout!r} is not a number of seconds") from None
        return InfisicalSecrets(
            site_url=cfg.get("site_url") or DEFAULT_INFISICAL_SITE,
            client_id=client_id,
            client_secret=client_secret,
            project_id=project_id,
            environment=cfg.get("environment") or "prod",
            path=cfg.get("path") or "/",
            timeout=timeout_s,
        )
    raise SecretsError(f"unknown secrets provider {kind!r}; choose one of: {', '.join(PROVIDERS)}")


def settings_from_secrets(secrets: Mapping[str, str]) -> dict[str, str]:
    """Settings field -> value for the fetched secrets RelayMD knows (others are ignored).

    RELAYMD_WORKER_TOKEN -> worker_token and so on; the field names themselves are accepted too
    (the env-style name wins if both are given). AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY fill the
    s3 key pair only when neither half came under a RelayMD name: a key id from one credential and
    a secret from another would never sign.
    """
    out: dict[str, str] = {}
    for field in SETTING_SECRETS:
        value = secrets.get(field)
        if value:
            out[field] = value
    for name, value in secrets.items():
        if not value or not name.startswith("RELAYMD_"):
            continue
        field = name[len("RELAYMD_"):].lower()
        if field in SETTING_SECRETS:
            out[field] = value
    if "s3_access_key_id" not in out and "s3_secret_access_key" not in out:
        for name, field in _AWS_FALLBACK.items():
            if secrets.get(name):
                out[field] = secrets[name]
    return out


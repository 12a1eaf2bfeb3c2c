"""Where RelayMD's secrets come from: the process environment, a private file, or Infisical.

A provider's `fetch()` returns secret NAME -> value (names as environment variables spell them,
RELAYMD_WORKER_TOKEN and so on); `settings_from_secrets` turns those into Settings field names.
The config loader picks a provider with `open_secrets`; the orchestrator installs `RedactSecrets`
on its log handlers so a value that slips into a log line comes out as "****".

Nothing here puts a secret value, a client secret or an access token into an exception message,
a log record or a repr: errors name the provider, what went wrong and the fix.

Infisical, as documented (checked against the docs and the server's source, 2025/2026):

- Login, universal auth: POST {site}/api/v1/auth/universal-auth/login, JSON {"clientId",
  "clientSecret"} (optional "organizationSlug") -> 200 {"accessToken", "expiresIn",
  "accessTokenMaxTTL", "tokenType": "Bearer"}; wrong credentials -> 401 "Invalid credentials".
  https://infisical.com/docs/api-reference/endpoints/universal-auth/login
  https://infisical.com/docs/documentation/platform/identities/universal-auth
- List secrets: GET {site}/api/v4/secrets?projectId=&environment=&secretPath=/ (also
  viewSecretValue, expandSecretReferences, recursive, include_imports: "true"/"false") with
  `Authorization: Bearer <accessToken>` -> 200 {"secrets": [{"secretKey", "secretValue",
  "secretValueHidden", ...}], "imports": [{"secretPath", "environment", "secrets": [...]}]}.
  https://infisical.com/docs/api-reference/endpoints/secrets (GET /api/v4/secrets)
  The v3 form, GET /api/v3/secrets/raw?workspaceId=..., is listed as deprecated:
  https://infisical.com/docs/api-reference/endpoints/deprecated/secrets/list.md
  https://infisical.com/docs/api-reference/overview ("use the highest version listed")
- Errors are JSON {"reqId", "statusCode", "message", "error"}: 401 UnauthorizedError (bad login,
  missing token), 403 TokenError (malformed or expired token), 403 PermissionDenied /
  ProjectMembershipNotFound (identity not allowed), 404 NotFound (unknown project). An unknown
  environment slug or folder path is NOT an error: the list comes back empty. (Infisical/infisical
  backend/src/server/plugins/error-handler.ts, routes/v4/secret-router.ts,
  ee/services/permission/permission-service.ts, services/secret-v2-bridge.)
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import yaml

from relaymd import __version__
from relaymd.models import MIN_ENV_SECRET_LENGTH, RESERVED_ENV_PREFIXES

log = logging.getLogger(__name__)

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

_AWS_FALLBACK = {"AWS_ACCESS_KEY_ID": "s3_access_key_id", "AWS_SECRET_ACCESS_KEY": "s3_secret_access_key"}

PROVIDERS = ("env", "file", "infisical")
DEFAULT_INFISICAL_SITE = "https://app.infisical.com"
INFISICAL_KEYS = ("site_url", "client_id", "client_secret", "project_id", "environment", "path", "timeout")


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


class _Hidden:
    """A string kept out of reprs, so a debugger, a traceback with locals or `vars()` shows ****."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return repr(MASK)

    __str__ = __repr__


# -- env ------------------------------------------------------------------------------------------


class EnvSecrets:
    """RELAYMD_* secret variables of the process environment (the default provider)."""

    name = "env"

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def fetch(self) -> dict[str, str]:
        # AWS_* stay where they are: boto3 reads them from the environment itself.
        return {k: v for k, v in self._environ.items()
                if k.startswith("RELAYMD_") and k in SECRET_NAMES and v}

    def __repr__(self) -> str:
        return "EnvSecrets()"


# -- file -----------------------------------------------------------------------------------------


class _SecretsLoader(yaml.SafeLoader):
    """safe_load, except that numbers, booleans and dates stay the text written: a token such as
    0123 (YAML 1.1 octal: 83), 1e3 (1000.0) or `yes` (True) must not be rewritten on the way; and
    a name given twice is an error, not "the last one wins" (two tokens: which was meant?)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may override on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"the name {key} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


for _tag in ("int", "float", "bool", "timestamp"):
    _SecretsLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _as_written)

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without the quoted source line PyYAML puts into str(exc)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    # Problems can quote a character or a tag from the file: drop anything quoted.
    what = f": {_QUOTED.sub('(…)', problem)}" if isinstance(problem, str) else ""
    return f"not valid YAML or JSON{where}{what}"


class FileSecrets:
    """A YAML or JSON mapping NAME: value in a file only its owner can read (mode 0600)."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileSecrets({str(self.path)!r})"

    def fetch(self) -> dict[str, str]:
        path = self.path
        # Open first, then check the mode of what was opened (fstat): no window in which the file
        # checked and the file read differ.
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SecretsError(f"file: secrets file {path} does not exist; create it with "
                               f"`install -m 600 /dev/null {path}` and add NAME: value lines, "
                               "or point the config at the right file") from None
        except OSError as exc:
            raise SecretsError(f"file: cannot open secrets file {path}: {exc.strerror}; "
                               "check the path and that this user may read it") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SecretsError(f"file: {path} is not a regular file; give the path of a YAML or "
                                   "JSON file of NAME: value")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise SecretsError(f"file: secrets file {path} has mode {mode:04o}: group or others "
                                   f"may read or change it; run `chmod 600 {path}`")
            raw = fh.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise SecretsError(f"file: {path} is not UTF-8 text; save it as UTF-8 YAML or JSON") from None
        try:
            data = yaml.load(text, Loader=_SecretsLoader)  # a SafeLoader: no arbitrary objects
        except yaml.YAMLError as exc:
            # `from None`: the YAMLError's own text quotes the offending line, which may hold a secret.
            raise SecretsError(f"file: {path}: {_yaml_problem(exc)}; fix the file (NAME: value, one "
                               "per line, or a JSON object)") from None
        if data is None:
            raise SecretsError(f"file: {path} is empty; add NAME: value lines "
                               "(e.g. RELAYMD_WORKER_TOKEN: ...)")
        if not isinstance(data, dict):
            raise SecretsError(f"file: {path} holds a {_kind(data)}, not a mapping; write NAME: value "
                               "lines or a JSON object")
        out: dict[str, str] = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key:
                raise SecretsError(f"file: {path}: every key must be a name such as RELAYMD_WORKER_TOKEN "
                                   f"(found a {_kind(key)} key)")
            if value is None or value == "":
                continue  # like an empty environment variable: not set
            if not isinstance(value, str):
                raise SecretsError(f"file: {path}: the value of {key} is a {_kind(value)}; "
                                   "secrets are single strings (quote it)")
            out[key] = value
        return out


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, str):
        return "string"
    return "null" if value is None else type(value).__name__


# -- infisical ------------------------------------------------------------------------------------


class InfisicalSecrets:
    """The secrets of one Infisical project/environment/folder, read with a machine identity's
    universal-auth client id and secret (the bootstrap credentials given to a container)."""

    name = "infisical"

    LOGIN_PATH = "/api/v1/auth/universal-auth/login"
    LIST_PATH = "/api/v4/secrets"
    LIST_PATH_V3 = "/api/v3/secrets/raw"  # older self-hosted servers, where v4 is not yet a route
    RETRY_DELAYS = (0.2, 0.5)  # three attempts in all: a blip passes, a dead server fails fast

    def __init__(self, site_url: str, client_id: str, client_secret: str, project_id: str,
                 environment: str = "prod", path: str = "/", timeout: float = 15.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        site = (site_url or "").strip().rstrip("/")
        # The docs give the API base as https://app.infisical.com/api; the site is without /api.
        if site.endswith("/api"):
            site = site[: -len("/api")]
        try:
            url = httpx.URL(site)
        except Exception:  # httpx.InvalidURL and friends
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise SecretsError(f"infisical: site_url {site_url!r} is not an http(s) URL; use e.g. "
                               f"{DEFAULT_INFISICAL_SITE} or https://infisical.example.org")
        for field, value in (("client_id", client_id), ("client_secret", client_secret),
                             ("project_id", project_id), ("environment", environment)):
            if not isinstance(value, str) or not value.strip():
                raise SecretsError(f"infisical: {field} is empty; give the machine identity's "
                                   "client id and secret, the project ID and the environment slug")
        if timeout <= 0:
            raise SecretsError(f"infisical: timeout must be positive seconds, not {timeout!r}")
        self.site_url = site
        self.client_id = client_id.strip()
        self._client_secret = _Hidden(client_secret)
        self.project_id = project_id.strip()
        self.environment = environment.strip()
        self.path = "/" + path.strip().strip("/") if path and path.strip() else "/"
        self.timeout = float(timeout)
        self._transport = transport
        if url.scheme == "http" and not _is_loopback(url.host):
            log.warning("infisical: site_url %s is plain http: the client secret and the secrets "
                        "cross the network unencrypted; use https", site)

    def __repr__(self) -> str:
        return (f"InfisicalSecrets(site_url={self.site_url!r}, client_id={self.client_id!r}, "
                f"client_secret={MASK!r}, project_id={self.project_id!r}, "
                f"environment={self.environment!r}, path={self.path!r})")

    # -- public -----------------------------------------------------------------------------------

    def fetch(self) -> dict[str, str]:
        headers = {"User-Agent": f"relaymd/{__version__}", "Accept": "application/json"}
        with httpx.Client(base_url=self.site_url, timeout=self.timeout, transport=self._transport,
                          headers=headers, follow_redirects=False) as client:
            token = self._login(client)
            return self._list(client, token)

    # -- steps ------------------------------------------------------------------------------------

    def _login(self, client: httpx.Client) -> _Hidden:
        body = {"clientId": self.client_id, "clientSecret": self._client_secret.get()}
        resp = self._request(client, "POST", self.LOGIN_PATH, "login", json=body)
        if resp.status_code in (401, 403):
            raise SecretsError("infisical: login refused (check the client id/secret of the machine "
                               "identity: INFISICAL_CLIENT_ID / INFISICAL_CLIENT_SECRET, and that its "
                               f"universal auth allows this address){self._said(resp)}")
        if resp.status_code == 404:
            raise SecretsError(f"infisical: {self.site_url} has no universal-auth login "
                               f"({self.LOGIN_PATH} answered 404); check site_url{self._said(resp)}")
        self._expect_ok(resp, "login")
        data = self._json(resp, "login")
        token = data.get("accessToken") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise SecretsError("infisical: login answered JSON without an accessToken; is site_url "
                               f"({self.site_url}) an Infisical server?")
        hidden = _Hidden(token)
        log.debug("infisical: logged in as machine identity %s (token for %ss)", self.client_id,
                  data.get("expiresIn"))
        return hidden

    def _list(self, client: httpx.Client, token: _Hidden) -> dict[str, str]:
        where = f"project {self.project_id} environment {self.environment} path {self.path}"
        params = {
            "projectId": self.project_id,
            "environment": self.environment,
            "secretPath": self.path,
            "viewSecretValue": "true",
            "expandSecretReferences": "true",  # ${OTHER} resolved server-side, as the CLI does
            "include_imports": "true",  # shared secrets imported into this folder count too
            "recursive": "false",
        }
        auth = {"Authorization": f"Bearer {token.get()}"}
        resp = self._request(client, "GET", self.LIST_PATH, "listing secrets", params=params, headers=auth)
        if resp.status_code == 404 and self._server_message(resp).startswith("Route "):
            # Not this project: the route itself (a server from before /api/v4/secrets).
            log.info("infisical: %s has no %s; using %s", self.site_url, self.LIST_PATH, self.LIST_PATH_V3)
            v3 = dict(params)
            v3["workspaceId"] = v3.pop("projectId")
            resp = self._request(client, "GET", self.LIST_PATH_V3, "listing secrets", params=v3,
                                 headers=auth)
        code = resp.status_code
        said = self._said(resp, token)
        if code == 401 or (code == 403 and self._server_error(resp) == "TokenError"):
            raise SecretsError("infisical: the access token from login was refused when listing "
                               f"secrets; try again, and check the identity's access token TTL/uses{said}")
        if code == 403:
            raise SecretsError(f"infisical: access to project {self.project_id} environment "
                               f"{self.environment} denied (add the machine identity to the project with "
                               f"a role that may read secrets at {self.path}){said}")
        if code == 404:
            raise SecretsError(f"infisical: project {self.project_id} not found (project_id is the "
                               "project's ID from its settings, not its name or slug; and the identity "
                               f"must belong to the project's organization){said}")
        if code in (400, 422):
            raise SecretsError(f"infisical: the server refused the request for {where} as invalid; "
                               f"check project_id, environment and path{said}")
        self._expect_ok(resp, "listing secrets", token)
        data = self._json(resp, "listing secrets")
        secrets = self._collect(data, where)
        log.info("infisical: fetched %d secrets from %s", len(secrets), where)
        log.debug("infisical: names fetched: %s", ", ".join(sorted(secrets)))
        return secrets

    def _collect(self, data: Any, where: str) -> dict[str, str]:
        if not isinstance(data, dict) or not isinstance(data.get("secrets"), list):
            raise SecretsError("infisical: listing secrets answered JSON without a 'secrets' list; is "
                               f"site_url ({self.site_url}) an Infisical server?")
        imports = data.get("imports") or []
        if not isinstance(imports, list):
            raise SecretsError("infisical: listing secrets answered an 'imports' that is not a list")
        out: dict[str, str] = {}
        # The folder's own secrets win over imported ones; among imports the first listed wins
        # (the order the official SDKs use).
        self._take(out, data["secrets"], "secrets")
        for n, imp in enumerate(imports):
            if not isinstance(imp, dict) or not isinstance(imp.get("secrets"), list):
                raise SecretsError(f"infisical: listing secrets answered import #{n + 1} without a "
                                   "'secrets' list")
            self._take(out, imp["secrets"], f"import #{n + 1}")
        if not out:
            # Infisical answers an empty list, not an error, for an environment slug or a path
            # that does not exist: a typo would otherwise pass as "no secrets".
            raise SecretsError(f"infisical: no secrets in {where}; check the environment slug (e.g. "
                               "dev, staging, prod) and the folder path, which Infisical does not "
                               "report as unknown")
        return out

    def _take(self, out: dict[str, str], items: list[Any], what: str) -> None:
        for n, item in enumerate(items):
            key = item.get("secretKey") if isinstance(item, dict) else None
            value = item.get("secretValue") if isinstance(item, dict) else None
            if not isinstance(key, str) or not key or not isinstance(value, str):
                raise SecretsError(f"infisical: listing secrets answered {what} entry #{n + 1} without "
                                   "a secretKey and secretValue string")
            if item.get("secretValueHidden") is True:
                raise SecretsError(f"infisical: the machine identity may list {key} but not read its "
                                   "value; give its project role the Read Value permission on secrets")
            out.setdefault(key, value)

    # -- HTTP -------------------------------------------------------------------------------------

    def _request(self, client: httpx.Client, method: str, path: str, what: str,
                 **kwargs: Any) -> httpx.Response:
        """One call, retried on connection errors, timeouts, 5xx and 429."""
        attempts = len(self.RETRY_DELAYS) + 1
        cause = ""
        for attempt in range(attempts):
            try:
                resp = client.request(method, path, **kwargs)
            except httpx.TimeoutException:
                cause = f"no answer within {self.timeout:g}s"
            except httpx.TransportError as exc:
                cause = f"cannot connect ({type(exc).__name__}: {self._redact(str(exc))})"
            else:
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp
                cause = f"HTTP {resp.status_code}{self._said(resp)}"
            if attempt + 1 < attempts:
                delay = self.RETRY_DELAYS[attempt]
                log.warning("infisical: %s at %s: %s; retrying in %.1fs (attempt %d of %d)",
                            what, self.site_url, cause, delay, attempt + 1, attempts)
                time.sleep(delay)
        raise SecretsError(f"infisical: {what} at {self.site_url} failed {attempts} times, last: {cause}; "
                           "check that the Infisical site is reachable from here, or try again later")

    def _expect_ok(self, resp: httpx.Response, what: str, token: _Hidden | None = None) -> None:
        if resp.status_code == 200:
            return
        if 300 <= resp.status_code < 400:
            raise SecretsError(f"infisical: {what} was redirected (HTTP {resp.status_code}) to "
                               f"{resp.headers.get('location', '?')}; set site_url to the final address")
        raise SecretsError(f"infisical: {what} answered HTTP {resp.status_code}"
                           f"{self._said(resp, token)}; check site_url ({self.site_url})")

    def _json(self, resp: httpx.Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError:  # JSONDecodeError, UnicodeDecodeError: the body is never echoed
            ctype = resp.headers.get("content-type") or "no content type"
            raise SecretsError(f"infisical: {what} answered HTTP {resp.status_code} with a body that is "
                               f"not JSON ({ctype}, {len(resp.content)} bytes); is site_url "
                               f"({self.site_url}) an Infisical server, not a proxy's error page?") from None

    @staticmethod
    def _error_body(resp: httpx.Response) -> dict[str, Any]:
        try:
            data = resp.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _server_message(self, resp: httpx.Response) -> str:
        message = self._error_body(resp).get("message")
        if isinstance(message, list):  # validation failures: a list of issues
            message = "; ".join(str(m.get("message", "")) for m in message if isinstance(m, dict))
        return message if isinstance(message, str) else ""

    def _server_error(self, resp: httpx.Response) -> str:
        error = self._error_body(resp).get("error")
        return error if isinstance(error, str) else ""

    def _said(self, resp: httpx.Response, token: _Hidden | None = None) -> str:
        """The server's own explanation, short and with our credentials scrubbed out."""
        message = self._server_message(resp)
        if not message:
            return ""
        message = self._redact(message, token)
        if len(message) > 300:
            message = message[:300] + "…"
        return f"; Infisical said: {message}"

    def _redact(self, text: str, token: _Hidden | None = None) -> str:
        for value in (self._client_secret.get(), token.get() if token else ""):
            if value:
                text = text.replace(value, MASK)
        return text


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- choosing and using ---------------------------------------------------------------------------


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

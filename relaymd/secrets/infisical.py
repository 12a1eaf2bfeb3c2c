"""The `infisical` provider: an Infisical project's secrets, read over its REST API with a
machine identity's universal-auth credentials; connection trouble, 5xx and 429 are retried.

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
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_chain,
    wait_fixed,
    wait_none,
)

from relaymd import __version__
from relaymd.secrets.base import MASK, Hidden, SecretsError

log = logging.getLogger("relaymd.secrets")  # the name it logged under before the package split

DEFAULT_INFISICAL_SITE = "https://app.infisical.com"


class _Transient(Exception):
    """A failure another try may fix; its text is the cause, already scrubbed of credentials."""


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
        self._client_secret = Hidden(client_secret)
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

    def _login(self, client: httpx.Client) -> Hidden:
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
        hidden = Hidden(token)
        log.debug("infisical: logged in as machine identity %s (token for %ss)", self.client_id,
                  data.get("expiresIn"))
        return hidden

    def _list(self, client: httpx.Client, token: Hidden) -> dict[str, str]:
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
        """One call, retried on connection errors, timeouts, 5xx and 429 (RETRY_DELAYS apart)."""
        attempts = len(self.RETRY_DELAYS) + 1

        def once() -> httpx.Response:
            try:
                resp = client.request(method, path, **kwargs)
            except httpx.TimeoutException:
                raise _Transient(f"no answer within {self.timeout:g}s") from None
            except httpx.TransportError as exc:
                raise _Transient(f"cannot connect ({type(exc).__name__}: "
                                 f"{self._redact(str(exc))})") from None
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Transient(f"HTTP {resp.status_code}{self._said(resp)}")
            return resp

        def before_sleep(state: RetryCallState) -> None:
            cause = state.outcome.exception() if state.outcome else None
            log.warning("infisical: %s at %s: %s; retrying in %.1fs (attempt %d of %d)",
                        what, self.site_url, cause, state.upcoming_sleep, state.attempt_number,
                        attempts)

        delays = [wait_fixed(d) for d in self.RETRY_DELAYS]
        retrying = Retrying(stop=stop_after_attempt(attempts),
                            wait=wait_chain(*delays) if delays else wait_none(),
                            retry=retry_if_exception_type(_Transient), before_sleep=before_sleep,
                            reraise=True)
        try:
            return retrying(once)
        except _Transient as exc:
            raise SecretsError(f"infisical: {what} at {self.site_url} failed {attempts} times, "
                               f"last: {exc}; check that the Infisical site is reachable from "
                               "here, or try again later") from None

    def _expect_ok(self, resp: httpx.Response, what: str, token: Hidden | None = None) -> None:
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

    def _said(self, resp: httpx.Response, token: Hidden | None = None) -> str:
        """The server's own explanation, short and with our credentials scrubbed out."""
        message = self._server_message(resp)
        if not message:
            return ""
        message = self._redact(message, token)
        if len(message) > 300:
            message = message[:300] + "…"
        return f"; Infisical said: {message}"

    def _redact(self, text: str, token: Hidden | None = None) -> str:
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


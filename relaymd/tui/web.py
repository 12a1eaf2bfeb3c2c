"""`relaymd web`: the console in a browser. textual-serve (aiohttp) serves a page whose websocket
drives one `relaymd console --connect URL` process per browser tab; this module is the door in
front of it. It listens on loopback unless told otherwise: operators reach it through
`ssh -L PORT:127.0.0.1:PORT host`.

Nothing but the login form is served without a session. The form POSTs the operator token (so
it is never in a URL, an access log line or the browser's history); the token is checked with an
authenticated call to the orchestrator (a wrong or worker token is refused there), and a good one
opens a session: a random id in an HttpOnly, SameSite=Strict cookie, held in this process's
memory with the token. Each websocket starts its console with that token in the environment
(RELAYMD_TOKEN), never on the command line, which `ps` shows to every user of the machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import urlsplit

import aiohttp_jinja2
from aiohttp import web
from textual_serve.app_service import AppService
from textual_serve.server import Server, to_int

from relaymd.client import ApiError, Client

log = logging.getLogger("relaymd.web")

COOKIE = "relaymd_session_{port}"  # cookies are per host, not port: one per server
SESSION_SECONDS = 12 * 3600
REFUSAL_DELAY = 0.5  # per wrong token, one at a time: guessing is slow
MAX_TOKEN = 1024


@dataclass
class Session:
    token: str
    expires: float  # time.monotonic()


def console_command(orchestrator: str) -> str:
    """The shell command run per browser tab: this same relaymd, in connect mode."""
    relaymd = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "relaymd"]
    return shlex.join([*relaymd, "console", "--connect", orchestrator])


def listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so a taken port is a plain error (OSError) before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=False)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_origin(request: web.Request) -> bool:
    """Browsers send Origin with every POST and websocket; one from another site is refused."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


def valid_token_text(token: str) -> bool:
    return 0 < len(token) <= MAX_TOKEN and token.isascii() and token.isprintable() \
        and " " not in token


LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>RelayMD console</title>
<style>
body {{ background: #0c181f; color: #e8e8e8; font-family: menlo, monospace; display: flex;
       justify-content: center; margin-top: 15vh; }}
form {{ background: #12232d; padding: 2em 3em; }}
input {{ width: 28em; font-family: inherit; padding: .4em; margin: .6em 0 1em; display: block; }}
button {{ font-family: inherit; padding: .5em 1.5em; }}
.message {{ color: #ff8a80; }}
</style></head>
<body><form method="post" action="/login" autocomplete="off">
<h1>RelayMD console</h1>
<p class="message" id="message">{message}</p>
<label for="token">Operator token (<code>operator</code> in the orchestrator's tokens.json)</label>
<input id="token" name="token" type="password" required autofocus>
<button type="submit" id="login">Open the console</button>
</form></body></html>
"""


class ConsoleProcess(AppService):
    """One browser tab's console process; the token goes in through its environment."""

    def __init__(self, command: str, *, env: dict[str, str], **kw: Any) -> None:
        super().__init__(command, **kw)
        self._extra_env = env

    def _build_environment(self, width: int = 80, height: int = 24) -> dict[str, str]:
        return {**super()._build_environment(width, height), **self._extra_env}


class WebConsole(Server):
    """textual-serve's server behind a login: see the module docstring."""

    def __init__(self, orchestrator: str, host: str, port: int,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(console_command(orchestrator), host=host, port=port, title="RelayMD")
        self.orchestrator = orchestrator
        self.env = env or {}
        self.sessions: dict[str, Session] = {}
        self.sockets: set[web.WebSocketResponse] = set()
        self.cookie = COOKIE.format(port=port)
        self._refusing: asyncio.Lock | None = None

    # ------------------------------------------------------------------ running

    def initialize_logging(self) -> None:
        # Plain lines: textual-serve's rich handler prints tracebacks with their locals (a token).
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def run(self, sock: socket.socket) -> None:
        self.initialize_logging()
        web.run_app(self._make_app(), sock=sock, print=None, shutdown_timeout=5,
                    handle_signals=True)

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()

        @web.middleware
        async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path == "/login":
                return await handler(request)  # type: ignore[no-any-return]
            if self.session_of(request) is None:  # the page, its socket, statics, downloads
                if request.path == "/" and request.method in ("GET", "HEAD"):
                    return web.Response(status=303, headers={"Location": "/login"})
                return web.Response(status=401, text="relaymd web: log in first\n")
            return await handler(request)  # type: ignore[no-any-return]

        app.middlewares.append(guard)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/login", self.login)
        app.on_response_prepare.append(self._harden)
        app.on_shutdown.append(self._close_sockets)
        return app

    async def on_startup(self, app: web.Application) -> None:
        self._refusing = asyncio.Lock()
        where = f"[{self.host}]" if ":" in self.host else self.host
        log.info("the console of %s on http://%s:%d/", self.orchestrator, where, self.port)
        if not is_loopback(self.host):
            log.warning("listening on %s, not loopback: anyone who reaches it may try tokens; "
                        "prefer 127.0.0.1 and `ssh -L`", self.host)

    async def _close_sockets(self, app: web.Application) -> None:
        for ws in list(self.sockets):  # each handler then stops its console process
            await ws.close(message=b"server shutdown")

    async def _harden(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Frame-Options"] = "DENY"  # no clickjacking `c`, `y` from a frame
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        response.headers["Referrer-Policy"] = "same-origin"  # no-referrer makes Origin "null"
        response.headers["X-Content-Type-Options"] = "nosniff"

    # ------------------------------------------------------------------ sessions

    def session_of(self, request: web.Request) -> Session | None:
        sid = request.cookies.get(self.cookie)
        session = self.sessions.get(sid) if sid else None
        if session is None:
            return None
        if session.expires < time.monotonic():
            del self.sessions[sid]  # type: ignore[arg-type]
            return None
        return session

    async def check_token(self, token: str) -> bool | None:
        """True if the orchestrator takes it as the operator's, False if it refuses it, None if
        it cannot say (unreachable, failing)."""
        def call() -> None:
            with Client(self.orchestrator, token, timeout=10) as client:
                client.clusters()  # operator scope
        try:
            await asyncio.to_thread(call)
        except ApiError as exc:
            if exc.status in (401, 403):
                return False
            log.error("cannot check a token with the orchestrator: %s", exc.message)
            return None
        return True

    def page(self, message: str, status: int) -> web.Response:
        return web.Response(status=status, content_type="text/html",
                            text=LOGIN_PAGE.format(message=escape(message)))

    async def login_page(self, request: web.Request) -> web.Response:
        return self.page("", 200)

    async def login(self, request: web.Request) -> web.Response:
        if not same_origin(request):
            return web.Response(status=403, text="relaymd web: cross-site login refused\n")
        form = await request.post()
        token = str(form.get("token") or "").strip()
        verdict = await self.check_token(token) if valid_token_text(token) else False
        if verdict is None:
            return self.page(f"Cannot reach the orchestrator at {self.orchestrator}.", 502)
        if not verdict:
            assert self._refusing is not None
            async with self._refusing:
                await asyncio.sleep(REFUSAL_DELAY)
            log.warning("refused a login from %s: not the operator token", request.remote)
            return self.page("That is not the operator token.", 403)
        now = time.monotonic()
        self.sessions = {k: s for k, s in self.sessions.items() if s.expires >= now}
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(token, now + SESSION_SECONDS)
        log.info("opened a session for %s", request.remote)
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(self.cookie, sid, httponly=True, samesite="Strict", path="/",
                            secure=request.secure)
        return response

    # ------------------------------------------------------------------ the console

    @aiohttp_jinja2.template("app_index.html")
    async def handle_index(self, request: web.Request) -> dict[str, Any]:
        # URLs from the browser's own Host: through `ssh -L 9000:...` it is localhost:9000.
        scheme = "wss" if request.secure else "ws"
        return {"font_size": to_int(request.query.get("fontsize", "16"), 16),
                "app_websocket_url": f"{scheme}://{request.host}/ws",
                "config": {"static": {"url": "/static/"}},
                "application": {"name": self.title}}

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        session = self.session_of(request)  # the guard checked it; it may have expired since
        if session is None or not same_origin(request):
            raise web.HTTPForbidden(text="relaymd web: no session\n")
        websocket = web.WebSocketResponse(heartbeat=15)
        width = to_int(request.query.get("width", "80"), 80)
        height = to_int(request.query.get("height", "24"), 24)
        await websocket.prepare(request)
        self.sockets.add(websocket)
        service = ConsoleProcess(self.command, env={**self.env, "RELAYMD_TOKEN": session.token},
                                 write_bytes=websocket.send_bytes, write_str=websocket.send_str,
                                 close=websocket.close, download_manager=self.download_manager)
        try:
            await service.start(width, height)
            try:
                await self._process_messages(websocket, service)
            finally:
                await service.stop()
        except asyncio.CancelledError:
            await websocket.close()
            raise
        except Exception:
            log.exception("a console session failed")
        finally:
            self.sockets.discard(websocket)
        return websocket


def check_reachable(orchestrator: str) -> None:
    """ApiError if nothing answers at `orchestrator` (a plain error before serving)."""
    with Client(orchestrator, None, timeout=10) as client:
        client.health()

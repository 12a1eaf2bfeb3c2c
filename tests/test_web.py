"""`relaymd web` end to end in a real browser (Debian's headless chromium, driven by Playwright):
the page asks for the operator token before anything else, a wrong token gets nothing of the
console, the right one gets it; a job submitted through the API shows up in the page, `c` `y`
cancels it; the token is in no URL the browser visited, no access log line and no command line.

The console draws on a canvas (xterm.js), so the screen is read from what the websocket carries:
Textual's output with its escape sequences stripped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from relaymd.models import JobStatus

from .conftest import RunningOrchestrator, free_port, submit
from .test_cli import clean_env

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium is not installed (make system installs it)")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (the test extra has it)")

ESCAPES = re.compile(rb"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|.)")


def wait_for(page: Any, ok: Callable[[], bool], what: str, detail: Callable[[], str],
             timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{detail()}"
        page.wait_for_timeout(100)  # Playwright delivers its events (websocket frames) meanwhile


def start_web(tmp_path: Path, orchestrator: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`relaymd web` from a home of its own: the token it hands its consoles is the login's."""
    port = free_port()
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relaymd", "web", "--port", str(port), "--url", orchestrator],
            env=clean_env(tmp_path / "web-home"), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, f"relaymd web exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"relaymd web did not listen:\n{log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}", log
        except OSError:
            time.sleep(0.1)


def command_lines() -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return out


def test_web_console_logs_in_by_form_shows_jobs_and_cancels_one(
        server: RunningOrchestrator, tmp_path: Path) -> None:
    token = server.tokens()["operator"]
    proc, base, log = start_web(tmp_path, server.url)
    urls: list[str] = []
    frames: list[bytes] = []

    def on_websocket(ws: Any) -> None:
        urls.append(ws.url)
        ws.on("framereceived", lambda data: frames.append(
            data if isinstance(data, bytes) else data.encode()))

    def screen() -> str:
        return ESCAPES.sub(b"", b"".join(frames)).decode("utf-8", "replace")

    def detail() -> str:
        return f"web server output ends:\n{log.read_text()[-3000:]}\nscreen ends:\n{screen()[-3000:]}"

    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.set_default_timeout(20_000)
            page.on("request", lambda request: urls.append(request.url))
            page.on("websocket", on_websocket)

            # Nothing without a session: the page sends the browser to the login form.
            page.goto(base + "/")
            assert page.url == base + "/login", page.url
            assert page.locator("#token").is_visible()
            assert page.locator("#terminal").count() == 0
            with httpx.Client(base_url=base) as anon:
                assert anon.get("/").status_code == 303
                for path in ("/ws", "/static/js/textual.js"):
                    refused = anon.get(path, headers={"Connection": "Upgrade",
                                                      "Upgrade": "websocket",
                                                      "Sec-WebSocket-Version": "13",
                                                      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
                    assert refused.status_code == 401, (path, refused.status_code)

            # A wrong token: a 403 page, no cookie, no console, no websocket.
            page.fill("#token", "not-" + token)
            with page.expect_navigation() as wrong:
                page.click("#login")
            assert wrong.value is not None and wrong.value.status == 403
            assert "not the operator token" in page.inner_text("#message")
            assert page.locator("#terminal").count() == 0
            assert context.cookies() == []
            assert not any(u.startswith("ws") for u in urls), urls

            # The right token: a session cookie and the console.
            page.fill("#token", token)
            with page.expect_navigation(url=base + "/"):
                page.click("#login")
            cookie, = context.cookies()
            assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict"), cookie
            assert token not in cookie["value"]
            wait_for(page, lambda: "checkpoints/h" in screen(), "the console's header", detail)
            # The log pane says where it is connected (it stayed empty in connect mode).
            wait_for(page, lambda: "connected to the orchestrator at" in screen(),
                     "the console's own log line", detail)
            assert any(u.startswith("ws://") and "/ws?" in u for u in urls), urls
            lines = command_lines()
            assert any("console --connect" in line for line in lines), "no console process"
            assert not any(token in line for line in lines), "the token is on a command line"

            # A job submitted through the API appears; `c` `y` cancels it.
            with server.operator() as op:
                job_id = submit(op, tmp_path, title="web-e2e-job")
                wait_for(page, lambda: "web-e2e-job" in screen(), "the submitted job in the page",
                         detail)
                page.focus(".xterm-helper-textarea")
                page.keyboard.press("c")
                wait_for(page, lambda: f"Cancel job {job_id[:8]}" in screen(), "the confirmation", detail)
                page.keyboard.press("y")
                deadline = time.monotonic() + 20
                while op.get_job(job_id).status != JobStatus.cancelled:
                    assert time.monotonic() < deadline, f"still {op.get_job(job_id).status}"
                    page.wait_for_timeout(100)
            wait_for(page, lambda: f"job {job_id[:8]}: {JobStatus.cancelled}" in screen(),
                     "the console's notice of the cancel", detail)
            urls.append(page.url)
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, f"relaymd web exited {proc.returncode}:\n{output[-2000:]}"
    assert '"POST /login HTTP/1.1" 303' in output and '"GET /ws?' in output, output[-2000:]
    assert token not in output, "the token is in the web server's log"
    assert urls and not any(token in url for url in urls), "the token is in a visited URL"

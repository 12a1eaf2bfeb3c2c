"""The worker's optional tailnet step, with stand-ins for `tailscaled` and `tailscale` on PATH
(the real ones need an account and a network). The stand-in `tailscaled` is a real forward HTTP
proxy on the port the worker asks for, so the test sees the worker's API calls go through it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RunningOrchestrator, free_port, make_settings
from .test_worker import expected_result, final_result, start_worker, submit_stepper

FAKE_TAILSCALED = '''#!PYTHON
"""Stand-in tailscaled: log argv, make the socket file, serve a forward HTTP proxy."""
import http.client, http.server, os, signal, sys, urllib.parse
log = open(os.environ["TS_LOG"], "a", buffering=1)
log.write("tailscaled " + " ".join(sys.argv[1:]) + "\\n")
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
open(args["socket"], "w").close()
port = int(args["outbound-http-proxy-listen"].rsplit(":", 1)[1])

class Proxy(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def relay(self):
        url = urllib.parse.urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        log.write(f"proxied {self.command} {url.path}\\n")
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        hop = ("proxy-connection", "connection")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
        conn.request(self.command, url.path + (f"?{url.query}" if url.query else ""), body, headers)
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    do_GET = do_POST = do_PUT = do_DELETE = relay

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Proxy)
signal.signal(signal.SIGTERM, lambda *_: (log.write("tailscaled stopped\\n"), os._exit(0)))
server.serve_forever()
'''
FAKE_TAILSCALE = '''#!/bin/bash
echo "tailscale $*" >> "$TS_LOG"
for a in "$@"; do
  case "$a" in --auth-key=file:*) f=${a#--auth-key=file:}
    echo "key file mode $(stat -c %a "$f") holds $(cat "$f")" >> "$TS_LOG" ;; esac
done
if [ "${TS_FAIL_UP:-0}" = 1 ] && [ "$2" = up ]; then
  echo "backend error: invalid key: tskey-auth-SECRET" >&2; exit 1
fi
exit 0
'''


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[RunningOrchestrator]:
    settings = make_settings(tmp_path / "home", heartbeat_interval=0.3, heartbeat_timeout=2.0)
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()


def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tailscaled").write_text(FAKE_TAILSCALED.replace("PYTHON", sys.executable))
    (bin_dir / "tailscale").write_text(FAKE_TAILSCALE)
    for name in ("tailscaled", "tailscale"):
        (bin_dir / name).chmod(0o755)
    return bin_dir




def test_worker_joins_the_tailnet_and_calls_the_api_through_its_proxy(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    ts_log = tmp_path / "ts.log"
    job_id = submit_stepper(orch, tmp_path, total=20, step_s=0.01, every=5)
    key = "tskey-auth-SECRET"
    w = start_worker(orch, tmp_path, PATH=f"{fake_bin(tmp_path)}:{os.environ['PATH']}",
                     TS_LOG=str(ts_log), RELAYMD_TAILSCALE_AUTH_KEY=key,
                     RELAYMD_TAILSCALE_PROXY_PORT=str(free_port()))
    assert w.wait(60) == 0, (tmp_path / "worker-w.log").read_text()
    assert orch.operator().get_job(job_id).status == "completed"
    assert final_result(orch, job_id, tmp_path)["x"] == expected_result(20)
    text = ts_log.read_text()
    assert "--tun=userspace-networking" in text and "--state=mem:" in text, text
    assert "proxied POST /api/v1/workers/register" in text, "register did not go via the proxy"
    assert "proxied POST /api/v1/jobs/claim" in text, text
    assert f"key file mode 600 holds {key}" in text, text
    calls = [line for line in text.splitlines() if line.startswith("tailscale ")]
    assert not any(key in line for line in calls), f"the key was on a command line: {calls}"
    assert any(" logout" in line for line in calls) and "tailscaled stopped" in text, text
    assert key not in (tmp_path / "worker-w.log").read_text(), "the key reached the worker log"


def test_a_key_without_tailscale_installed_is_skipped_cleanly(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    job_id = submit_stepper(orch, tmp_path, total=10, step_s=0.01, every=5)
    w = start_worker(orch, tmp_path, PATH=str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                     RELAYMD_TAILSCALE_AUTH_KEY="tskey-auth-x")
    assert w.wait(60) == 0
    assert orch.operator().get_job(job_id).status == "completed"
    assert "tailscale is not installed" in (tmp_path / "worker-w.log").read_text()


def test_a_failing_tailscale_up_stops_the_worker_with_the_reason_and_no_key(
        orch: RunningOrchestrator, tmp_path: Path) -> None:
    ts_log = tmp_path / "ts.log"
    w = start_worker(orch, tmp_path, PATH=f"{fake_bin(tmp_path)}:{os.environ['PATH']}",
                     TS_LOG=str(ts_log), TS_FAIL_UP="1",
                     RELAYMD_TAILSCALE_AUTH_KEY="tskey-auth-SECRET",
                     RELAYMD_TAILSCALE_PROXY_PORT=str(free_port()))
    assert w.wait(60) == 1
    out = (tmp_path / "worker-w.log").read_text()
    assert "tailscale up` exited 1" in out and "invalid key" in out, out
    assert "tskey-auth-SECRET" not in out, out
    assert "tailscaled stopped" in ts_log.read_text(), "tailscaled left running"
    assert orch.operator().workers() == [], "a worker registered without its tailnet"

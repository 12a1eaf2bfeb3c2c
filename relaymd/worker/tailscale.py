"""The worker's optional first step: join a tailnet, so an orchestrator on a private network is
reachable from a cloud container or a compute node.

When a Tailscale auth key is configured (`tailscale_auth_key`, from secrets) and the image has
`tailscaled` and `tailscale`, the worker starts `tailscaled` in userspace networking mode (no
TUN device, no root), with its SOCKS5 and HTTP proxies on one loopback port and its state in
memory (`--state=mem:`: an ephemeral node, removed from the tailnet when it logs out or goes
silent), brings it up and sends its API calls
through that proxy. Storage traffic goes direct. No key: nothing happens. A key but no binaries:
one log line, and the worker carries on without a tailnet. The key is handed to `tailscale up` as
`--auth-key=file:PATH` from a 0600 file deleted right after, never on a command line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class TailscaleError(Exception):
    """Tailscale is installed and a key was given, but joining the tailnet failed."""


@dataclass
class Tailnet:
    tailscale: str
    socket_path: Path
    state_dir: Path
    daemon: subprocess.Popen[bytes]
    proxy: str  # http://127.0.0.1:PORT, for the API client

    def _cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.tailscale, f"--socket={self.socket_path}", *args],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def close(self) -> None:
        """Log out (an ephemeral node is removed at once) and stop tailscaled."""
        with contextlib.suppress(Exception):
            self._cli("logout", timeout=15)
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def join_tailnet(auth_key: str | None, port: int = 1055, hostname: str | None = None,
                 timeout: float = 60.0) -> Tailnet | None:
    if not auth_key:
        return None
    tailscaled, tailscale = shutil.which("tailscaled"), shutil.which("tailscale")
    if not tailscaled or not tailscale:
        log.info("tailscale: an auth key is set but tailscale is not installed in this image; "
                 "API calls go direct")
        return None
    state = Path(tempfile.mkdtemp(prefix="relaymd-tailscale-"))  # 0700
    sock = state / "tailscaled.sock"
    daemon_log = open(state / "tailscaled.log", "wb")  # noqa: SIM115 (the daemon keeps it)
    daemon = subprocess.Popen(
        [tailscaled, "--tun=userspace-networking", "--state=mem:", f"--statedir={state}",
         f"--socket={sock}", f"--socks5-server=localhost:{port}",
         f"--outbound-http-proxy-listen=localhost:{port}"],
        stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=subprocess.STDOUT,
        start_new_session=True)
    daemon_log.close()
    net = Tailnet(tailscale, sock, state, daemon, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise TailscaleError(f"tailscaled exited or did not start (exit {daemon.poll()}): "
                                     f"{_tail(state / 'tailscaled.log')}")
            time.sleep(0.1)
        key_file = state / "authkey"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(auth_key)
        try:
            name = hostname or f"relaymd-{socket.gethostname().split('.')[0]}"
            up = net._cli("up", f"--auth-key=file:{key_file}", f"--hostname={name}",
                          "--accept-dns=false",
                          timeout=max(1.0, deadline - time.monotonic()))
        finally:
            key_file.unlink(missing_ok=True)
        if up.returncode != 0:
            text = (up.stderr or up.stdout).replace(auth_key, "****").strip()[-300:]
            raise TailscaleError(f"`tailscale up` exited {up.returncode}: {text} (is the auth key "
                                 "valid, reusable or unused, and ephemeral?)")
        while not _port_open(port):
            if time.monotonic() > deadline:
                raise TailscaleError(f"tailscaled's proxy on port {port} did not open")
            time.sleep(0.1)
    except subprocess.TimeoutExpired:
        net.close()
        raise TailscaleError(f"`tailscale up` did not finish in {timeout:g}s") from None
    except BaseException:
        net.close()
        raise
    log.info("tailscale: joined the tailnet as %s; API calls go through %s", name, net.proxy)
    return net


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[-300:] or "no output"
    except OSError:
        return "no log"

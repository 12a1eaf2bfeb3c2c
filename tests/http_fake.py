"""What every fake of a paid HTTP service in these tests shares: a real threaded HTTP server on
a loopback port, started by the constructor and stopped by `close()` (or a `with` block), that
hands each request to the subclass's `handle(request, method)`."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


class FakeHTTPServer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._closing = threading.Event()  # set on close: wakes handlers a `hang` fault holds
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

        for method in METHODS:
            setattr(Handler, f"do_{method}",
                    lambda req, m=method: fake.handle(req, m))

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and hung up is what the hang fault is for

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        raise NotImplementedError

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def send_raw(req: BaseHTTPRequestHandler, status: int, data: bytes, ctype: str) -> None:
        req.send_response(status)
        if data:
            req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

"""The master's HTTP port: ``http.server`` threads in front of ``Api``.

Nothing a request does can stop the master: handler errors become a 500 and one log
line, connections run in daemon threads, and a port that cannot be bound is one error
line, after which the master goes on without HTTP (see ``start``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..progress import RateLimit
from .api import Api, Response

log = logging.getLogger("scheduler.web")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], api: Api) -> None:
        self.api = api
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.complaints = RateLimit(time.time, per_second=1)
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: tuple) -> None:
        # a peer that went away mid-reply, and the like: the default prints a traceback
        if self.complaints():
            log.debug("http: connection from %s:%s ended badly", *client_address[:2],
                      exc_info=True)  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection gives its thread back
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def version_string(self) -> str:
        return "scheduler"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        started = time.perf_counter()
        try:
            response = self.server.api.get(self.path, self.headers.get("Host", ""))
        except Exception:  # a bug in a view must cost one request, never the master
            if self.server.complaints():
                log.exception("http: GET %s failed", self.path[:200])
            response = Response(500, "text/plain", b"internal error; see the master's log\n")
        took_ms = (time.perf_counter() - started) * 1000
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Server-Timing", f"app;dur={took_ms:.2f}")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("http: %s %s", self.address_string(), format % args)


class WebServer:
    """The dashboard and metrics port, served from a daemon thread."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        host, port = server.server_address[:2]
        self.address: tuple[str, int] = (str(host), int(port))
        self._thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start(address: tuple[str, int], api: Api) -> WebServer | None:
    """Serve ``api`` on ``address``; None (and one error line) if the port cannot be bound.

    The master keeps scheduling without its dashboard rather than refuse to start: the
    jobs matter more than the view of them, and a second master on the same host (tests,
    a restart racing the old process) must not die over port 8889.
    """
    host, port = address
    try:
        server = _Server(address, api)
    except OSError as exc:
        log.error("dashboard and /metrics off: cannot listen on %s:%d (%s); set "
                  "SCHEDULER_HTTP to a free host:port, or to nothing to turn HTTP off",
                  host, port, exc.strerror or exc)  # fmt: skip
        return None
    return WebServer(server)


__all__ = ["WebServer", "start"]

"""What the master's HTTP port answers, as plain requests and responses (no sockets).

Read-only: ``/`` and its assets (package data), ``/metrics``, ``/api/status``,
``/api/jobs?state=&limit=``, ``/api/jobs/ID``. Nothing here reaches the authkey: the views
are built from ``Service.status``, ``jobs`` and ``get``, which never hold it.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from ..errors import SubmitError, UnknownJob
from ..metrics import ERROR_CHARS, FINAL, Metrics
from ..service import Service

JSON = "application/json"
LIST_LIMIT = 50  # /api/jobs without limit=
CHART_SECONDS = 300  # the throughput chart's reach
RATE_SECONDS = 10  # the rate shown is the mean over this many seconds
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
# The page runs only its own script and style; job output is inserted as text, never HTML.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


def _json(status: int, value: Any) -> Response:
    body = json.dumps(value, separators=(",", ":")).encode()  # ASCII: surrogates escaped
    return Response(status, JSON, body, {"Cache-Control": "no-store", **PAGE_HEADERS})


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def load_assets() -> dict[str, tuple[bytes, str]]:
    """The dashboard's files, read once from the package."""
    static = resources.files(__package__).joinpath("static")
    return {path: (static.joinpath(name).read_bytes(), kind)
            for path, (name, kind) in ASSETS.items()}  # fmt: skip


def loopback_only(bound_host: str) -> bool:
    """Whether the port listens on loopback only; then requests must name a loopback host."""
    if bound_host == "localhost":
        return True
    try:
        return ipaddress.ip_address(bound_host).is_loopback
    except ValueError:
        return False


def _loopback_name(host_header: str) -> bool:
    if host_header.startswith("["):  # [::1]:8889
        host = host_header[1:].split("]", 1)[0]
    else:
        host = host_header.rsplit(":", 1)[0] if ":" in host_header else host_header
    return loopback_only(host)


class Api:
    """Answers GET requests from the service's read-only views and the metrics."""

    def __init__(
        self,
        service: Service,
        metrics: Metrics,
        *,
        loopback: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.loopback = loopback
        self.clock = clock
        self.assets = load_assets()

    def get(self, path: str, host: str = "localhost") -> Response:
        """The response to ``GET path`` (with its query) sent with ``Host: host``."""
        if self.loopback and not _loopback_name(host):
            # a page elsewhere whose name now points here (DNS rebinding) reads nothing
            return _error(403, f"host {host!r} refused: this port serves loopback names only")
        route, _, query = path.partition("?")
        if route in self.assets:
            body, kind = self.assets[route]
            return Response(200, kind, body, PAGE_HEADERS)
        if route == "/metrics":
            return Response(200, self.metrics.content_type, self.metrics.exposition())
        if route == "/api/status":
            return _json(200, self.status())
        if route == "/api/jobs":
            return self.jobs(parse_qs(query))
        if route.startswith("/api/jobs/"):
            return self.job(route.removeprefix("/api/jobs/"))
        return _error(404, f"no page {route}; see /, /metrics, /api/status, /api/jobs")

    def status(self) -> dict[str, Any]:
        """``Service.status`` with what the dashboard draws: throughput and latest failures."""
        status = self.service.status()
        chart = self.metrics.throughput.series(CHART_SECONDS)
        done = sum(sum(chart[str(state)][-RATE_SECONDS:]) for state in FINAL)
        status.update(now=self.clock(), throughput=chart, rate=done / RATE_SECONDS,
                      failures=self.metrics.failures())  # fmt: skip
        return status

    def jobs(self, query: Mapping[str, list[str]]) -> Response:
        state = (query.get("state") or [""])[0] or None
        raw = (query.get("limit") or [str(LIST_LIMIT)])[0]
        if not raw.isdigit():
            return _error(400, f"limit must be a whole number, got {raw!r}")
        try:
            jobs = self.service.jobs(state, int(raw))
        except SubmitError as exc:
            return _error(400, str(exc))
        return _json(200, [_listed(j) for j in jobs])

    def job(self, raw: str) -> Response:
        if not raw.isdigit():
            return _error(400, f"a job id is a whole number, got {raw!r}")
        try:
            return _json(200, self.service.get(int(raw)))
        except UnknownJob as exc:
            return _error(404, str(exc))


def _listed(info: dict[str, Any]) -> dict[str, Any]:
    """A job in a list: no output tails (ask /api/jobs/ID), the end of its error."""
    error = info.get("error") or ""
    if len(error) > ERROR_CHARS:
        info["error"] = error[-ERROR_CHARS:]
    info.pop("stdout", None)
    info.pop("stderr", None)
    return info


__all__ = ["Api", "Response", "loopback_only"]

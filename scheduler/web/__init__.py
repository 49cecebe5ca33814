"""The master's HTTP port: Prometheus ``/metrics``, a live dashboard at ``/`` and its JSON."""

from __future__ import annotations

from .api import Api, Response, loopback_only
from .server import WebServer, start

__all__ = ["Api", "Response", "WebServer", "loopback_only", "start"]

"""What every long-running entrypoint does: log set-up, stop signals, errors to exit codes."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable

from .errors import AuthError, SchedulerError


def configure_logging(verbose: bool = False) -> None:
    """Timestamped, one event per line, on stderr (what `docker logs` shows)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def serve(body: Callable[[threading.Event], int], verbose: bool = False) -> int:
    """Run ``body(stop)`` until it returns; SIGTERM or SIGINT sets ``stop``.

    A user mistake is one ``error:`` line and exit 2 (3 for a refused key), no traceback.
    """
    configure_logging(verbose)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        return body(stop)
    except SchedulerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, AuthError) else 2

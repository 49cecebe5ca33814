"""The jobs every contender runs, importable by reference from every process."""

from __future__ import annotations

import time


def noop(x: object = None) -> object:
    """The no-op job: measures the scheduler, not the work."""
    return x


def sleep(seconds: float) -> float:
    """A job that takes ``seconds`` of wall time and no CPU."""
    time.sleep(seconds)
    return seconds

"""Job functions for the integration tests; shipped by value, like a user's script."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def square(x):
    return x * x


def noop():
    return None


def boom(message="boom"):
    raise ValueError(message)


def whoami():
    return os.environ.get("SCHEDULER_WORKER_NAME")


def nap(seconds, marker_dir=None, tag=""):
    """Sleep; leave one marker file per run so tests can count executions."""
    if marker_dir:
        Path(marker_dir, f"{tag}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(seconds)
    return os.environ.get("SCHEDULER_WORKER_NAME")


def kill_my_slave():
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(5)


def shout(n):
    chunk = "x" * 1023 + "\n"
    for _ in range(n):
        sys.stdout.write(chunk)
    return "done"


def crash():
    os._exit(13)


def noop_item(_):
    return None


def big(n):
    return b"x" * n


class Oops(Exception):
    """An exception class of the user's own."""


def raise_oops(detail):
    raise Oops(detail)


def divide(a, b):
    return a / b


class Unbuildable(Exception):
    def __init__(self, a, b):  # pickles, but cannot be rebuilt from its args
        super().__init__(f"{a}/{b}")


def raise_unbuildable():
    raise Unbuildable(1, 2)


def leave(code):
    sys.exit(code)


def hard_exit(code):
    os._exit(code)

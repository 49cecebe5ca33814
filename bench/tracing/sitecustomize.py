"""Per-hop timestamps for ``python -m bench.hops``; not part of the product.

``bench.hops`` puts this directory first on PYTHONPATH with BENCH_TRACE_DIR set, so every
process it starts (master, slave, and the slave's job processes) imports this module at
start-up. It wraps a few methods of the scheduler to record CLOCK_MONOTONIC (one clock
for every process on the machine) on entry and exit, and writes them at exit to
BENCH_TRACE_DIR/<pid>.txt. Without BENCH_TRACE_DIR it does nothing.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time
from typing import Any

# (module, class, method, tag): where the single-job path crosses a hop
POINTS = (
    ("scheduler.client", "Client", "_send", "C.send"),
    ("scheduler.client", "Client", "_resolve", "C.resolve"),
    ("scheduler.client", "AsyncResult", "get", "C.get"),
    ("scheduler.service", "Service", "submit", "M.submit"),
    ("scheduler.service", "Service", "_dispatch", "M.dispatch"),  # a parked lease answered
    ("scheduler.service", "Service", "report", "M.report"),
    ("scheduler.service", "Service", "_route", "M.route"),
    ("scheduler.transport", "Answer", "__call__", "M.answer"),  # ... or a parked collect
    ("scheduler.journal", "Journal", "_write_locked", "M.journal"),
    ("scheduler.runner", "PythonSlot", "run", "S.slot"),
    ("scheduler.worker", "Worker", "_finish", "S.finish"),
)
events: list[tuple[int, str]] = []
_done: list[bool] = []


def _wrap(cls: Any, name: str, tag: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def traced(*args: Any, **kwargs: Any) -> Any:
        events.append((time.monotonic_ns(), tag + ">"))
        try:
            return original(*args, **kwargs)
        finally:
            events.append((time.monotonic_ns(), tag + "<"))

    setattr(cls, name, traced)


def patch() -> None:
    """Wrap the points (once); imports the scheduler modules."""
    if _done:
        return
    _done.append(True)
    import importlib

    for module, cls, method, tag in POINTS:
        _wrap(getattr(importlib.import_module(module), cls), method, tag)


def dump(directory: str) -> None:
    with open(os.path.join(directory, f"{os.getpid()}.txt"), "a") as out:
        out.writelines(f"{t} {tag}\n" for t, tag in events)


if os.environ.get("BENCH_TRACE_DIR"):
    atexit.register(lambda: dump(os.environ["BENCH_TRACE_DIR"]))
    _start = threading.Thread.start

    def _start_patched(self: threading.Thread) -> None:  # the scheduler is imported by then
        patch()
        _start(self)

    threading.Thread.start = _start_patched  # type: ignore[method-assign]

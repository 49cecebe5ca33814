"""Measurements on anything shaped like ``multiprocessing.Pool`` (ours and the stdlib's)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

from .procs import cpu_seconds
from .workloads import noop, sleep

WAIT = 120.0  # the longest any single result may take before the run is declared hung


class Submits(Protocol):
    def apply_async(self, func: Callable, args: tuple = ...) -> Any: ...


class Maps(Protocol):
    def map(self, func: Callable, iterable: Any, chunksize: int | None = ...) -> list: ...


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, interpolated."""
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[round(q) - 1]


def burst(pool: Submits, n: int) -> float:
    """Jobs/s for ``n`` ``apply_async(noop)`` calls then ``get()`` on each."""
    started = time.perf_counter()
    handles = [pool.apply_async(noop, (i,)) for i in range(n)]
    for i, handle in enumerate(handles):
        if handle.get(WAIT) != i:
            raise AssertionError(f"job {i} returned a wrong result")
    return n / (time.perf_counter() - started)


def burst_cpu(pool: Submits, n: int, pids: list[int]) -> tuple[float, float]:
    """A burst's jobs/s, and the CPU microseconds per job spent by all of ``pids``."""
    before = cpu_seconds(pids)
    rate = burst(pool, n)
    return rate, (cpu_seconds(pids) - before) / n * 1e6


def mapped(pool: Maps, n: int, chunksize: int | None) -> float:
    """Items/s for ``map(noop, range(n), chunksize)``."""
    started = time.perf_counter()
    results = pool.map(noop, range(n), chunksize=chunksize)
    took = time.perf_counter() - started
    if results != list(range(n)):
        raise AssertionError("map returned wrong or reordered results")
    return n / took


def latency(pool: Submits, n: int) -> list[float]:
    """Seconds per sequential ``apply_async(noop).get()``, ``n`` samples."""
    samples = []
    for i in range(n):
        started = time.perf_counter()
        pool.apply_async(noop, (i,)).get(WAIT)
        samples.append(time.perf_counter() - started)
    return samples


def sleeps(pool: Submits, n: int, seconds: float) -> float:
    """Wall seconds for ``n`` jobs of ``sleep(seconds)`` submitted at once."""
    started = time.perf_counter()
    handles = [pool.apply_async(sleep, (seconds,)) for _ in range(n)]
    for handle in handles:
        handle.get(WAIT)
    return time.perf_counter() - started

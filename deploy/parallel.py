"""Run one function per host in parallel, with a cap, collecting each host's error."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .config import Host
from .errors import DeployError

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """Per-host results and per-host errors; a host is in one of the two."""

    results: dict[str, T] = field(default_factory=dict)
    errors: dict[str, DeployError] = field(default_factory=dict)

    @property
    def ok(self) -> set[str]:
        return set(self.results)


def across(
    hosts: Iterable[Host],
    work: Callable[[Host], T],
    cap: int,
    on_error: Callable[[Host, DeployError], None] | None = None,
) -> Outcome[T]:
    """``work(host)`` for every host, at most ``cap`` at once.

    A DeployError stays with its host and the others go on; anything else is a bug and
    is raised. Ctrl-C cancels what has not started and waits for what has.
    """
    hosts = list(hosts)
    outcome: Outcome[T] = Outcome()
    if not hosts:
        return outcome
    pool = ThreadPoolExecutor(max_workers=max(1, min(cap, len(hosts))), thread_name_prefix="host")
    try:
        futures = {host.name: (host, pool.submit(work, host)) for host in hosts}
        for name, (host, future) in futures.items():
            try:
                outcome.results[name] = future.result()
            except DeployError as exc:
                outcome.errors[name] = exc
                if on_error:
                    on_error(host, exc)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return outcome

"""Run one function per host (or per container of a host) in parallel, with a cap.

A DeployError stays with its item and the others go on; anything else is a bug and is raised.
Ctrl-C sets ``stop`` (so work that checks it starts nothing more), cancels what has not
started, and waits for what has.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .config import Host
from .errors import DeployError, PartialFailure

T = TypeVar("T")
ItemT = TypeVar("ItemT")


@dataclass
class Outcome(Generic[T]):
    """Per-host results and per-host errors; a host is in one of the two."""

    results: dict[str, T] = field(default_factory=dict)
    errors: dict[str, DeployError] = field(default_factory=dict)

    @property
    def ok(self) -> set[str]:
        return set(self.results)


@dataclass
class Failures:
    """A command's failed hosts, first error each, gathered from its phases' outcomes."""

    errors: dict[str, DeployError] = field(default_factory=dict)

    def add(self, outcome: Outcome[Any] | Failures | Mapping[str, DeployError]) -> None:
        errors = outcome.errors if isinstance(outcome, Outcome | Failures) else outcome
        for name, error in errors.items():
            self.errors.setdefault(name, error)

    def __contains__(self, host: object) -> bool:
        return host in self.errors

    def __bool__(self) -> bool:
        return bool(self.errors)

    def check(self, action: str, total: int) -> None:
        """Raise PartialFailure naming every failed host, if any failed."""
        if self.errors:
            raise PartialFailure(action, self.errors, total)


def echo_errors(echo: Callable[[str], None]) -> Callable[[Host, DeployError], None]:
    """An ``on_error`` for ``across`` that reports each host's error as it comes."""
    return lambda host, error: echo(f"error: {error}")


def across(
    hosts: Iterable[Host],
    work: Callable[[Host], T],
    cap: int,
    on_error: Callable[[Host, DeployError], None] | None = None,
    stop: threading.Event | None = None,
) -> Outcome[T]:
    """``work(host)`` for every host, at most ``cap`` at once; errors reported as they come."""
    hosts = list(hosts)
    outcome: Outcome[T] = Outcome()
    for host, (result, error) in zip(hosts, each(hosts, work, cap, stop, "host"), strict=True):
        if error is None:
            outcome.results[host.name] = result  # type: ignore[assignment]
        else:
            outcome.errors[host.name] = error
            if on_error:
                on_error(host, error)
    return outcome


def each(
    items: Sequence[ItemT],
    work: Callable[[ItemT], T],
    cap: int,
    stop: threading.Event | None = None,
    name: str = "work",
) -> Iterator[tuple[T | None, DeployError | None]]:
    """``(result, None)`` or ``(None, error)`` per item, in the items' order, as each is done."""
    if not items:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(cap, len(items))), thread_name_prefix=name)
    try:
        futures = [pool.submit(work, item) for item in items]
        for future in futures:
            try:
                yield future.result(), None
            except DeployError as exc:
                yield None, exc
    except BaseException:
        if stop is not None:
            stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

"""What deployctl reads back from the hosts, as plain data: containers, images, status.

The engine adapter fills these in; the planner, the shipping plan and the renderer read them.
Nothing here does I/O.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from .config import Host


@dataclass(frozen=True)
class Observed:
    """A container found on an engine by the cluster label."""

    host: str
    id: str
    name: str
    role: str
    index: int
    version: str
    digest: str
    state: str  # created | running | restarting | paused | exited | dead
    image_id: str = ""
    image: str = ""  # the reference it was created with

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True)
class Holdings:
    """The images a host holds: names to ids, and the layer chains (diff ids) it has."""

    ids: dict[str, str] = field(default_factory=dict)  # reference -> image id
    chains: tuple[tuple[str, ...], ...] = ()

    def has_id(self, image_id: str) -> bool:
        return image_id in self.ids.values()


@dataclass(frozen=True)
class ContainerRow:
    """What ``status`` shows of one container."""

    host: str
    name: str
    role: str
    index: int
    state: str
    health: str
    started_at: str
    image: str
    version: str


@dataclass(frozen=True)
class HostStatus:
    host: Host
    containers: tuple[ContainerRow, ...]
    error: str | None


@dataclass(frozen=True)
class Status:
    cluster: str
    hosts: tuple[HostStatus, ...]
    master: dict[str, Any] | None
    master_error: str | None

    @property
    def healthy(self) -> bool:
        return self.master_error is None and all(h.error is None for h in self.hosts)


def stamp_seconds(stamp: str) -> float:
    """Seconds since the epoch of an engine timestamp like ``2024-05-01T10:00:00.123456789Z``."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    when = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    return when.timestamp() + float(f"0.{frac or 0}")

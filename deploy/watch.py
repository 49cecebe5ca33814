"""Looking at a running cluster: status of every host and the master, and container logs."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import engine, master
from .cluster import Context, observe
from .config import Host
from .errors import DeployError, HostError
from .parallel import across
from .planner import Observed
from .specs import MASTER, WORKER

RETRY_SECONDS = 3.0


@dataclass(frozen=True)
class HostStatus:
    host: Host
    containers: tuple[engine.ContainerRow, ...]
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


def status(ctx: Context) -> Status:
    """Containers per host (unreachable hosts say why) and the master's own view."""
    out = across(ctx.config.hosts, lambda h: engine.rows(ctx.engines, h, ctx.config.cluster),
                 ctx.config.parallel)  # fmt: skip
    hosts = tuple(
        HostStatus(h, tuple(out.results.get(h.name, ())),
                   str(out.errors[h.name]) if h.name in out.errors else None)
        for h in ctx.config.hosts
    )  # fmt: skip
    view, error = None, None
    master_rows = [r for hs in hosts for r in hs.containers if r.role == MASTER]
    if not master_rows:
        error = "no master container; run 'deployctl up'"
    else:
        try:
            with master.client(ctx.config, ctx.pool, ctx.key(create=False)) as c:
                view = c.status()
        except DeployError as exc:
            error = str(exc)
    return Status(ctx.config.cluster, hosts, view, error)


def pick(containers: tuple[Observed, ...], target: str | None) -> list[Observed]:
    """``None``/``all``: everything; ``master``/``worker(s)``: a role; else a container name."""
    if target in (None, "all"):
        chosen = list(containers)
    elif target in (MASTER, WORKER, "workers"):
        chosen = [o for o in containers if o.role == target.rstrip("s")]
    else:
        chosen = [o for o in containers if target in (o.name, o.id[:12], o.id)]
        if not chosen:
            names = ", ".join(sorted(o.name for o in containers)) or "none"
            raise DeployError(f"logs {target}", "no such container in the cluster",
                              f"use master, worker, all or one of: {names}")  # fmt: skip
    return sorted(chosen, key=lambda o: (o.role != MASTER, o.index))


def logs(
    ctx: Context, target: str | None, follow: bool, tail: int | None, since: str | None,
    write: Callable[[str], None],
) -> None:  # fmt: skip
    """Print the chosen containers' lines prefixed ``host/name |``; with ``follow``, keep going.

    Without ``follow`` the lines of all containers are merged by time. With it, each container
    is followed by its own thread; a host that drops out is retried while the others go on.
    """
    chosen = pick(observe(ctx).containers, target)
    width = max((len(f"{o.host}/{o.name}") for o in chosen), default=0)
    lines: queue.Queue[tuple[str, str, str] | None] = queue.Queue()
    threads = [
        threading.Thread(target=_stream, args=(ctx, o, follow, tail, since, lines), daemon=True)
        for o in chosen
    ]
    for t in threads:
        t.start()
    done, merged = 0, []
    while done < len(threads):
        item = lines.get()
        if item is None:
            done += 1
        elif follow:
            write(f"{item[1]:<{width}} | {item[2]}")
        else:
            merged.append(item)
    for _, who, text in sorted(merged, key=lambda i: i[0]):
        write(f"{who:<{width}} | {text}")


def _stream(
    ctx: Context, o: Observed, follow: bool, tail: int | None, since: str | None,
    out: queue.Queue[tuple[str, str, str] | None],
) -> None:  # fmt: skip
    who = f"{o.host}/{o.name}"
    host = ctx.config.host(o.host)
    try:
        while True:
            last = ""
            try:
                for stamp, text in engine.logs(ctx.engines, host, o.id, follow, tail, since):
                    last = stamp
                    out.put((stamp, who, text))
                if not follow:
                    return
                ctx.echo(f"{who}: container stopped; waiting for it to come back")
            except HostError as exc:
                if not follow:
                    ctx.echo(f"error: {exc}")
                    return
                ctx.echo(f"warning: {who}: {exc.detail}; retrying in {RETRY_SECONDS:g}s")
            time.sleep(RETRY_SECONDS)
            # resume after the last line seen, so nothing is printed twice
            if last:
                since, tail = f"{engine.stamp_seconds(last) + 1e-6:.6f}", None
    finally:
        out.put(None)

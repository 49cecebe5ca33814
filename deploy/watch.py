"""Looking at a running cluster: status of every host and the master, and container logs."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from . import engine
from .cluster import observe
from .context import Context
from .errors import DeployError, HostError
from .observed import HostStatus, Observed, Status, stamp_seconds
from .parallel import across
from .specs import MASTER, WORKER

RETRY_SECONDS = 3.0


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
            with ctx.master.use(ctx.key(create=False)) as c:
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
    is followed by its own thread; a host that drops out is retried while the others go on,
    and its lines are picked up where they stopped once it is back.
    """
    chosen = pick(observe(ctx).containers, target)
    width = max((len(f"{o.host}/{o.name}") for o in chosen), default=0)
    lines: queue.Queue[tuple[str, str, str] | None] = queue.Queue()
    begun = time.time()

    def reader(o: Observed) -> threading.Thread:
        args = (ctx, o, follow, tail, since, begun, lines)
        return threading.Thread(target=_stream, args=args, daemon=True, name=f"logs-{o.name}")

    threads = [reader(o) for o in chosen]
    for t in threads:
        t.start()
    done, merged = 0, []
    try:
        while done < len(threads):
            item = lines.get()
            if item is None:
                done += 1
            elif follow:
                write(f"{item[1]:<{width}} | {item[2]}")
            else:
                merged.append(item)
    finally:
        ctx.stop.set()  # Ctrl-C: the streams end quietly while the connections close
    for _, who, text in sorted(merged, key=lambda i: i[0]):
        write(f"{who:<{width}} | {text}")


def _stream(
    ctx: Context, o: Observed, follow: bool, tail: int | None, since: str | None, begun: float,
    out: queue.Queue[tuple[str, str, str] | None],
) -> None:  # fmt: skip
    who = f"{o.host}/{o.name}"
    host = ctx.config.host(o.host)
    last, away = "", False  # the last line's time; whether the user was told it is away
    try:
        while not ctx.stop.is_set():
            try:
                for stamp, text in engine.logs(ctx.engines, host, o.name, follow, tail, since):
                    if away:
                        ctx.echo(f"{who}: following again")
                        away = False
                    last = stamp
                    out.put((stamp, who, text))
                if not follow or ctx.stop.is_set():
                    return
                now = engine.state(ctx.engines, host, o.name)
                if now is None:
                    ctx.echo(f"{who}: container removed; no longer followed")
                    return
                if now != "running" and not away:
                    ctx.echo(f"{who}: container {now}; waiting for it to come back")
                    away = True
            except HostError as exc:
                if ctx.stop.is_set():
                    return
                if not follow:
                    ctx.echo(f"error: {exc}")
                    return
                if not away:
                    ctx.echo(f"warning: {who}: {exc.detail}; trying again every "
                             f"{RETRY_SECONDS:g}s while the other hosts go on")  # fmt: skip
                    away = True
            if ctx.stop.wait(RETRY_SECONDS):
                return
            # Resume after the last line seen, so nothing is printed twice; with no line
            # seen yet, from when following began, so that --tail is not printed again.
            since = f"{stamp_seconds(last) + 1e-6:.6f}" if last else since or f"{begun:.6f}"
            tail = None
    finally:
        out.put(None)

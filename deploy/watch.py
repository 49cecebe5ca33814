"""Looking at a running cluster: status of every host and the master, and container logs."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from typing import cast

from scheduler.settings import Settings

from . import engine
from .cluster import observe
from .config import Config
from .context import Context
from .errors import DeployError, HostError, MasterError
from .observed import HostStatus, Observed, Status, stamp_seconds
from .parallel import across
from .specs import MASTER, WORKER

RETRY_SECONDS = 3.0
HTTP_VAR = "SCHEDULER_HTTP"
# the scheduler's own default, read from its settings rather than written again here
DEFAULT_HTTP = cast(tuple[str, int], next(
    f.default for f in dataclasses.fields(Settings) if f.name == "http"))
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def http_endpoint(config: Config) -> tuple[str, int]:
    """Where the master serves HTTP, as seen from its own host: ``SCHEDULER_HTTP`` from the
    inventory's [env], else the scheduler's default; a wildcard bind is reached on loopback."""
    given = dict(config.env).get(HTTP_VAR)
    if given is None:
        return DEFAULT_HTTP
    address, _, port = given.strip().rpartition(":")
    if not given.strip() or not port.isdigit():
        raise DeployError(f"[env] {HTTP_VAR}={given!r}", "the master serves no HTTP"
                          if not given.strip() else "expected host:port",
                          f"set {HTTP_VAR} to host:port (default 127.0.0.1:8889) and run "
                          "'deployctl up'")  # fmt: skip
    host = "127.0.0.1" if address in WILDCARDS else address.strip("[]")
    return host, int(port)


def http_get(ctx: Context, path: str) -> bytes:
    """``GET path`` from the master's HTTP port, through SSH to its host; 200 or MasterError."""
    address, port = http_endpoint(ctx.config)
    code, body = ctx.pool.http_get(ctx.config.master_host, address, port, path)
    if code != 200:
        text = body.decode(errors="replace").strip()[:200]
        raise MasterError(ctx.master.subject, f"GET {path} on {address}:{port} answered "
                          f"HTTP {code}: {text}", "see 'deployctl logs master'")  # fmt: skip
    return body


def metrics(ctx: Context) -> str:
    """The master's ``/metrics`` (Prometheus text)."""
    return http_get(ctx, "/metrics").decode()


def dashboard_url(ctx: Context, local_port: int) -> str:
    """A local URL of the master's dashboard: a tunnel on 127.0.0.1 (``local_port``, or any
    free one) to its host's HTTP port, kept until the command's connections close. Checks
    first that the master answers there, so a wrong setting is an error, not a dead page."""
    http_get(ctx, "/api/status")
    host = ctx.config.master_host
    address, port = http_endpoint(ctx.config)
    if host.local:  # this machine: the master's own port
        return f"http://{address}:{port}/"
    local, local_port = ctx.pool.tunnel(host, address, port, local_port)
    return f"http://{local}:{local_port}/"


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

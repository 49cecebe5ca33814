"""The cluster's lifecycle commands: up, scale, down.

Each runs observe (every host's containers, the images) -> plan (``planner``, pure) ->
execute (ship, then the actions, host by host in parallel) -> verify (the workers reach the
master's advertised address; the master answers and every worker registered), and returns
what it did and which hosts failed, per host.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import build, engine, identity, keyfile, link, shipping, tlsplan
from .config import Host
from .context import Context, Echo
from .errors import DeployError, MasterError
from .keyfile import Secret
from .observed import Observed
from .parallel import Failures, across, each, echo_errors
from .planner import (
    Action,
    Create,
    Mounts,
    Remove,
    RemoveVolume,
    Start,
    images_needed,
    plan_down,
    plan_up,
    state_volume,
)
from .shipplan import Ship
from .specs import MASTER, WORKER, Images, master_name, tls_volume
from .tlsplan import Issue

log = logging.getLogger(__name__)
HOST_CONCURRENCY = 4  # containers made or removed at once on one host
PROBE_SECONDS = 10.0  # how long a worker host may take to reach the master's port


@dataclass(frozen=True)
class Observation:
    containers: tuple[Observed, ...]
    reachable: frozenset[str]
    failures: dict[str, DeployError] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """What a lifecycle command did: its plan, what was shipped, the master's status after it
    (if any), and the hosts that failed with their errors."""

    actions: tuple[Action, ...]
    status: dict[str, Any] | None
    shipments: tuple[Ship, ...] = ()
    sent: tuple[shipping.Sent, ...] = ()
    failures: Failures = field(default_factory=Failures)
    certificates: tuple[Issue, ...] = ()  # issued (or, in a dry run, to issue)


def observe(ctx: Context, hosts: Sequence[Host] | None = None) -> Observation:
    """Every container of the cluster on every reachable host."""
    hosts = ctx.config.hosts if hosts is None else hosts
    out = across(hosts, lambda h: engine.observe(ctx.engines, h, ctx.config.cluster),
                 ctx.config.parallel, echo_errors(ctx.echo))  # fmt: skip
    found = tuple(o for name in out.results for o in out.results[name])
    return Observation(found, frozenset(out.ok), dict(out.errors))


class Executor(Protocol):
    def create(self, host: Host, action: Create) -> None: ...
    def start(self, host: Host, action: Start) -> None: ...
    def remove(self, host: Host, action: Remove) -> None: ...
    def remove_volume(self, host: Host, action: RemoveVolume) -> None: ...


class EngineExecutor:
    """Carries actions out on the hosts' engines."""

    def __init__(self, engines: engine.Engines, echo: Echo, ctx: Context | None = None) -> None:
        self.engines = engines
        self.echo = echo
        self.ctx = ctx  # for a container's TLS files

    def create(self, host: Host, action: Create) -> None:
        if action.spec.tls is not None:
            if self.ctx is None:
                raise DeployError(action.spec.name, "has TLS files but no CA to take them from",
                                  "this is a bug of deployctl")  # fmt: skip
            identity.stage(self.ctx, host, action.spec)
        engine.create(self.engines, host, action.spec)
        self.echo(f"{host.name}: started {action.spec.name}")

    def start(self, host: Host, action: Start) -> None:
        engine.start(self.engines, host, action.container)
        self.echo(f"{host.name}: restarted {action.container.name}")

    def remove(self, host: Host, action: Remove) -> None:
        self.echo(f"{host.name}: stopping {action.container.name} ({action.reason})")
        engine.remove(self.engines, host, action.container, action.timeout)
        # its TLS files (a private key) go with it; a replacement gets its own
        engine.remove_volume(self.engines, host, tls_volume(action.container.name))
        self.echo(f"{host.name}: removed {action.container.name}")

    def remove_volume(self, host: Host, action: RemoveVolume) -> None:
        if engine.remove_volume(self.engines, host, action.name):
            self.echo(f"{host.name}: removed volume {action.name}")


def run(ctx: Context, actions: Sequence[Action], executor: Executor, skip: Failures,
        master_first: bool = True) -> dict[str, DeployError]:  # fmt: skip
    """In phases: the master's actions, the workers' (or the reverse), then volumes.

    Within a phase hosts run in parallel, and so do the containers of one host; the actions
    on one container keep their order (an outdated worker goes before its replacement comes).
    A host in ``skip`` or failed in an earlier phase is skipped. Ctrl-C starts nothing more.
    Returns the hosts that failed here, with their errors.
    """
    masters = [a for a in actions if _is_master(a)]
    workers = [a for a in actions if not _is_master(a) and not isinstance(a, RemoveVolume)]
    volumes = [a for a in actions if isinstance(a, RemoveVolume)]
    order = (masters, workers) if master_first else (workers, masters)
    failed: dict[str, DeployError] = {}
    for phase in (*order, volumes):
        by_host: dict[str, list[Action]] = {}
        for action in phase:
            by_host.setdefault(action.host, []).append(action)
        hosts = [ctx.config.host(n) for n in by_host if n not in failed and n not in skip]
        out = across(hosts, functools.partial(_run_host, ctx, by_host, executor),
                     ctx.config.parallel, echo_errors(ctx.echo), ctx.stop)  # fmt: skip
        failed.update(out.errors)
    return failed


def _is_master(action: Action) -> bool:
    if isinstance(action, Create):
        return action.spec.role == MASTER
    if isinstance(action, Start | Remove):
        return action.container.role == MASTER
    return False


def _run_host(
    ctx: Context, by_host: dict[str, list[Action]], executor: Executor, host: Host
) -> None:
    """The host's containers in parallel; its first error is raised once all have ended."""
    chains: dict[str, list[Action]] = {}
    for action in by_host[host.name]:
        chains.setdefault(_subject(action), []).append(action)
    work = functools.partial(_run_chain, ctx.stop, executor, host)
    errors = [e for _, e in each(list(chains.values()), work, HOST_CONCURRENCY, ctx.stop,
                                 f"host-{host.name}") if e is not None]  # fmt: skip
    for other in {str(e): e for e in errors[1:]}.values():
        if str(other) != str(errors[0]):
            ctx.echo(f"error: {other}")
    if errors:
        raise errors[0]


def _subject(action: Action) -> str:
    if isinstance(action, Create):
        return action.spec.name
    if isinstance(action, Start | Remove):
        return action.container.name
    return f"volume {action.name}"


def _run_chain(stop: threading.Event, executor: Executor, host: Host, chain: list[Action]) -> None:
    for action in chain:
        if stop.is_set():
            return
        if isinstance(action, Create):
            executor.create(host, action)
        elif isinstance(action, Start):
            executor.start(host, action)
        elif isinstance(action, Remove):
            executor.remove(host, action)
        else:
            executor.remove_volume(host, action)


def up(
    ctx: Context, workers: int | None, dry_run: bool, executor: Executor | None = None,
    build_first: bool = True,
) -> Result:  # fmt: skip
    """Build as needed, start master and workers (shipping them their images), wait until the
    workers registered. A dry run plans with the images last built here."""
    key = ctx.key(create=True) if not dry_run else _key_or_placeholder(ctx)
    tls = ctx.config.master.tls
    if tls:
        identity.ensure_ca(ctx, dry_run)
        if not dry_run:
            identity.client_files(ctx, tlsplan.RENEW_WITHIN)  # deployctl's own, rotated too
    seen = observe(ctx)
    images = images_for(ctx, build_first and not dry_run)
    busy = _busy(ctx, key, seen)
    count = ctx.config.workers.count if workers is None else workers

    def make(mounts: Mounts | None) -> list[Action]:
        return plan_up(ctx.config, images, key, seen.containers, count, busy,
                       set(seen.reachable), tls=mounts)  # fmt: skip

    if not tls:
        return _carry_out(ctx, key, seen, make(None), dry_run, executor)
    actions, issued = identity.plan(ctx, make, seen.containers, dry_run, tlsplan.RENEW_WITHIN)
    return _carry_out(ctx, key, seen, actions, dry_run, executor, issued)


def images_for(ctx: Context, build_first: bool) -> Images:
    """The images to run: built here now (skipped when up to date), or the last built."""
    if not build_first:
        return shipping.local_images(ctx)
    names = {"master": ctx.config.images.master, "slave": ctx.config.images.slave}
    built = build.build_images(ctx.engines, _EchoLines(ctx.echo), names)
    for b in built:
        ctx.echo(f"image {b.repository}:{b.tags[1]} {'up to date' if b.skipped else 'built'}")
    return build.as_images(built)


class _EchoLines(io.StringIO):
    """A text stream that sends build steps, line by line, to ``echo``."""

    def __init__(self, echo: Echo) -> None:
        super().__init__()
        self.echo = echo
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith(("images:", "Step ")):  # the steps, not every layer's chatter
                self.echo(f"  {line.rstrip()}")
        return len(text)


def scale(ctx: Context, count: int, dry_run: bool, executor: Executor | None = None) -> Result:
    """Reach ``count`` workers: add on the emptiest hosts, remove idle workers first."""
    key = ctx.key(create=False)
    seen = observe(ctx)
    images = shipping.running_images(ctx, seen.containers)
    busy = _busy(ctx, key, seen)

    def make(mounts: Mounts | None) -> list[Action]:
        return plan_up(ctx.config, images, key, seen.containers, count, busy,
                       set(seen.reachable), with_master=False, tls=mounts)  # fmt: skip

    if not ctx.config.master.tls:
        return _carry_out(ctx, key, seen, make(None), dry_run, executor)
    # new workers get certificates; the others keep theirs (rotation is up's)
    actions, issued = identity.plan(ctx, make, seen.containers, dry_run, dt.timedelta(0))
    return _carry_out(ctx, key, seen, actions, dry_run, executor, issued)


def down(ctx: Context, volumes: bool, dry_run: bool, executor: Executor | None = None) -> Result:
    """Remove every container of the cluster (workers drain first); the volume only if asked."""
    seen = observe(ctx)
    vols = [state_volume(ctx.config)] if volumes else []
    vols = [(h, v) for h, v in vols if h in seen.reachable]
    failures = Failures()
    failures.add(seen.failures)
    vols += _tls_volumes(ctx, seen, failures)
    actions = plan_down(ctx.config, seen.containers, vols)
    if not dry_run:
        failures.add(run(ctx, actions, executor or EngineExecutor(ctx.engines, ctx.echo, ctx),
                         failures, master_first=False))  # fmt: skip
    return Result(tuple(actions), None, failures=failures)


def _tls_volumes(ctx: Context, seen: Observation, failures: Failures) -> list[tuple[str, str]]:
    """Every TLS volume of the cluster on the reachable hosts (a container's key each), those
    of the containers removed and any left over: down leaves no key behind."""
    hosts = [h for h in ctx.config.hosts if h.name in seen.reachable]
    out = across(hosts, lambda h: engine.tls_volumes(ctx.engines, h, ctx.config.cluster),
                 ctx.config.parallel, echo_errors(ctx.echo))  # fmt: skip
    failures.add(out)
    return [(h, v) for h, names in sorted(out.results.items()) for v in names]


def _carry_out(
    ctx: Context, key: Secret, seen: Observation, actions: list[Action], dry_run: bool,
    executor: Executor | None, issued: Sequence[Issue] = (),
) -> Result:  # fmt: skip
    """Ship the images new containers need, run the plan, then verify: the workers reach the
    master, the master answers and the workers registered."""
    failures = Failures()
    failures.add(seen.failures)
    shipments, looked = shipping.plan(ctx, images_needed(actions), skip=failures.errors)
    failures.add(looked)
    if dry_run:
        return Result(tuple(actions), None, tuple(shipments), failures=failures,
                      certificates=tuple(issued))  # fmt: skip
    sent, shipped = shipping.send(ctx, shipments)
    failures.add(shipped)
    failures.add(run(ctx, actions, executor or EngineExecutor(ctx.engines, ctx.echo, ctx),
                     failures))  # fmt: skip
    status = None
    if ctx.config.master.host not in failures:
        if any(_is_master(a) for a in actions):
            ctx.master.reset()  # a client made before talks to the master just replaced
        _check_reach(ctx, actions, failures)
        expected = _expected_workers(seen, actions, failures)
        ctx.echo(f"waiting for the master and {len(expected)} worker(s) to register")
        try:
            status = ctx.master.wait_ready(key, expected, ctx.config.master.ready_timeout)
        except MasterError as exc:
            raise MasterError(exc.subject, exc.detail + _master_log_tail(ctx), exc.hint) from exc
    return Result(tuple(actions), status, tuple(shipments), tuple(sent), failures,
                  tuple(issued))  # fmt: skip


def _check_reach(ctx: Context, actions: Sequence[Action], failures: Failures) -> None:
    """Each host that got new workers opens a connection to the advertised address; one that
    cannot fails the command now, not after ``ready_timeout``."""
    names = sorted({a.host for a in actions if isinstance(a, Create) and a.spec.role == WORKER
                    and a.host not in failures})  # fmt: skip
    address, _, port = ctx.config.master.advertise.rpartition(":")

    def probe(host: Host) -> str | None:
        deadline = time.monotonic() + PROBE_SECONDS
        while True:  # the master may still be binding its port
            why = ctx.pool.reach(host, address, int(port), PROBE_SECONDS)
            if why is None or time.monotonic() > deadline or ctx.stop.is_set():
                return why
            time.sleep(0.25)

    out = across([ctx.config.host(n) for n in names], probe, ctx.config.parallel,
                 echo_errors(ctx.echo), ctx.stop)  # fmt: skip
    failures.add(out)
    blocked = {n: why for n, why in out.results.items() if why is not None}
    if blocked:
        where = ", ".join(f"{n} ({why})" for n, why in sorted(blocked.items()))
        raise MasterError(
            f"master address {ctx.config.master.advertise}",
            f"not reachable from worker host(s) {where}",
            "set master.advertise (or the master host's hosts[].address) to an address the "
            "workers can reach; check the master's port is open between the hosts",
        )  # fmt: skip


def _expected_workers(seen: Observation, actions: Sequence[Action], failed: Failures) -> list[str]:
    names = {o.name for o in seen.containers if o.role == WORKER and o.host not in failed}
    for action in actions:
        if isinstance(action, Remove):
            names.discard(action.container.name)
    for action in actions:
        if isinstance(action, Create) and action.spec.role == WORKER and action.host not in failed:
            names.add(action.spec.name)
    return sorted(names)


def _master_log_tail(ctx: Context, lines: int = 6) -> str:
    """The master container's last log lines, to say why it does not answer."""
    name = master_name(ctx.config.cluster)
    try:
        tail = [t for _, t in engine.logs(ctx.engines, ctx.config.master_host, name, False,
                                          lines, None)]  # fmt: skip
    except DeployError:
        return ""
    return "\n  last lines of its log:\n    " + "\n    ".join(tail) if tail else ""


def _busy(ctx: Context, key: Secret, seen: Observation) -> dict[str, int]:
    """Running jobs per worker, from the master; empty when there is no master to ask."""
    if not any(o.role == MASTER and o.running for o in seen.containers):
        return {}
    try:
        with ctx.master.use(key) as c:
            return link.busy_workers(c.status())
    except DeployError as exc:
        ctx.echo(f"warning: cannot ask the master which workers are busy ({exc}); "
                 "removing the highest-numbered workers first")  # fmt: skip
        return {}


def _key_or_placeholder(ctx: Context) -> Secret:
    try:
        return ctx.key(create=False)
    except DeployError:
        ctx.echo(f"dry run: would create the authkey file {ctx.config.authkey_file}")
        return keyfile.generate()


__all__ = ["Observation", "Result", "down", "images_for", "observe", "scale", "up"]

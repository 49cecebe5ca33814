"""The cluster's lifecycle: observe every host, plan, and carry the plan out (up, scale, down)."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import engine, keyfile, master
from .config import Config, Host
from .errors import DeployError, MasterError, PartialFailure
from .keyfile import Secret
from .master import MasterLink
from .parallel import across, each
from .planner import (
    Action,
    Create,
    Observed,
    Remove,
    RemoveVolume,
    Ship,
    Start,
    images_needed,
    plan_down,
    plan_up,
    state_volume,
)
from .ship import build_here, local_images, plan_shipping, running_images, send
from .specs import MASTER, WORKER, Images
from .ssh import SSHPool

log = logging.getLogger(__name__)
Echo = Callable[[str], None]
HOST_CONCURRENCY = 4  # containers made or removed at once on one host


@dataclass
class Context:
    """What every command works with: the config, the connections, and where progress goes."""

    config: Config
    environ: Mapping[str, str]
    pool: SSHPool
    engines: engine.Engines
    echo: Echo
    failures: dict[str, DeployError] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)  # set by Ctrl-C
    master_link: MasterLink | None = None

    def master(self) -> MasterLink:
        """The command's one link to the master (opened on first use, closed by ``session``)."""
        if self.master_link is None:
            self.master_link = MasterLink(self.config, self.pool)
        return self.master_link

    def fail(self, host: Host, error: DeployError) -> None:
        self.failures.setdefault(host.name, error)
        self.echo(f"error: {error}")

    def key(self, create: bool) -> Secret:
        return keyfile.resolve(self.config.authkey_file, self.environ, create)

    def raise_failures(self, action: str) -> None:
        if self.failures:
            raise PartialFailure(action, self.failures, len(self.config.hosts))


@contextlib.contextmanager
def session(config: Config, environ: Mapping[str, str], echo: Echo,
            accept_new: bool = False) -> Iterator[Context]:  # fmt: skip
    pool = SSHPool(accept_new)
    engines = engine.Engines(pool)
    ctx = Context(config, environ, pool, engines, echo)
    try:
        yield ctx
    finally:
        if ctx.master_link is not None:
            ctx.master_link.close()
        engines.close()
        pool.close()


@dataclass(frozen=True)
class Observation:
    containers: tuple[Observed, ...]
    reachable: frozenset[str]


def observe(ctx: Context, hosts: Sequence[Host] | None = None) -> Observation:
    """Every container of the cluster on every reachable host; failures go to ``ctx``."""
    hosts = ctx.config.hosts if hosts is None else hosts
    out = across(hosts, lambda h: engine.observe(ctx.engines, h, ctx.config.cluster),
                 ctx.config.parallel, ctx.fail)  # fmt: skip
    found = tuple(o for name in out.results for o in out.results[name])
    return Observation(found, frozenset(out.ok))


class Executor(Protocol):
    def create(self, host: Host, action: Create) -> None: ...
    def start(self, host: Host, action: Start) -> None: ...
    def remove(self, host: Host, action: Remove) -> None: ...
    def remove_volume(self, host: Host, action: RemoveVolume) -> None: ...


class EngineExecutor:
    """Carries actions out on the hosts' engines."""

    def __init__(self, engines: engine.Engines, echo: Echo) -> None:
        self.engines = engines
        self.echo = echo

    def create(self, host: Host, action: Create) -> None:
        engine.create(self.engines, host, action.spec)
        self.echo(f"{host.name}: started {action.spec.name}")

    def start(self, host: Host, action: Start) -> None:
        engine.start(self.engines, host, action.container)
        self.echo(f"{host.name}: restarted {action.container.name}")

    def remove(self, host: Host, action: Remove) -> None:
        self.echo(f"{host.name}: stopping {action.container.name} ({action.reason})")
        engine.remove(self.engines, host, action.container, action.timeout)
        self.echo(f"{host.name}: removed {action.container.name}")

    def remove_volume(self, host: Host, action: RemoveVolume) -> None:
        if engine.remove_volume(self.engines, host, action.name):
            self.echo(f"{host.name}: removed volume {action.name}")


def run(
    ctx: Context, actions: Sequence[Action], executor: Executor, master_first: bool = True
) -> set[str]:
    """In phases: the master's actions, the workers' (or the reverse), then volumes.

    Within a phase hosts run in parallel, and so do the containers of one host; the actions
    on one container keep their order (an outdated worker goes before its replacement comes).
    A host that failed, in this run or earlier in the command, is skipped. Ctrl-C starts
    nothing more. Returns the hosts that failed here (errors are in ``ctx``).
    """
    masters = [a for a in actions if _is_master(a)]
    workers = [a for a in actions if not _is_master(a) and not isinstance(a, RemoveVolume)]
    volumes = [a for a in actions if isinstance(a, RemoveVolume)]
    order = (masters, workers) if master_first else (workers, masters)
    failed: set[str] = set()
    for phase in (*order, volumes):
        by_host: dict[str, list[Action]] = {}
        for action in phase:
            by_host.setdefault(action.host, []).append(action)
        hosts = [ctx.config.host(n) for n in by_host if n not in failed and n not in ctx.failures]
        out = across(hosts, functools.partial(_run_host, ctx, by_host, executor),
                     ctx.config.parallel, ctx.fail, ctx.stop)  # fmt: skip
        failed |= set(out.errors)
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


@dataclass(frozen=True)
class Result:
    """What a lifecycle command did: its plan, and the master's status after it (if any)."""

    actions: tuple[Action, ...]
    status: dict[str, Any] | None
    shipments: tuple[Ship, ...] = ()


def up(
    ctx: Context, workers: int | None, dry_run: bool, executor: Executor | None = None,
    build: bool = True,
) -> Result:  # fmt: skip
    """Build as needed, start master and workers (shipping them their images), wait until the
    workers registered. A dry run plans with the images last built here."""
    key = ctx.key(create=not dry_run) if not dry_run else _key_or_placeholder(ctx)
    seen = observe(ctx)
    images = build_here(ctx) if build and not dry_run else local_images(ctx)
    busy = _busy(ctx, key, seen)
    count = ctx.config.workers.count if workers is None else workers
    actions = plan_up(ctx.config, images, key, seen.containers, count, busy, set(seen.reachable))
    return _carry_out(ctx, key, seen, actions, dry_run, executor)


def scale(ctx: Context, count: int, dry_run: bool, executor: Executor | None = None) -> Result:
    """Reach ``count`` workers: add on the emptiest hosts, remove idle workers first."""
    key = ctx.key(create=False)
    seen = observe(ctx)
    images = running_images(ctx, seen)
    busy = _busy(ctx, key, seen)
    actions = plan_up(ctx.config, images, key, seen.containers, count, busy, set(seen.reachable),
                      with_master=False)  # fmt: skip
    return _carry_out(ctx, key, seen, actions, dry_run, executor)


def down(ctx: Context, volumes: bool, dry_run: bool, executor: Executor | None = None) -> Result:
    """Remove every container of the cluster (workers drain first); the volume only if asked."""
    seen = observe(ctx)
    vols = [state_volume(ctx.config)] if volumes else []
    vols = [(h, v) for h, v in vols if h in seen.reachable]
    actions = plan_down(ctx.config, seen.containers, vols)
    if not dry_run:
        run(ctx, actions, executor or EngineExecutor(ctx.engines, ctx.echo), master_first=False)
    return Result(tuple(actions), None)


def _carry_out(
    ctx: Context, key: Secret, seen: Observation, actions: list[Action], dry_run: bool,
    executor: Executor | None,
) -> Result:  # fmt: skip
    """Ship the images new containers need, run the plan, wait for master and workers."""
    shipments = tuple(plan_shipping(ctx, images_needed(actions)))
    if dry_run:
        return Result(tuple(actions), None, shipments)
    send(ctx, shipments)
    failed = run(ctx, actions, executor or EngineExecutor(ctx.engines, ctx.echo))
    expected = _expected_workers(seen, actions, failed | set(ctx.failures))
    status = None
    master_ok = ctx.config.master.host not in ctx.failures
    if master_ok:
        if any(_is_master(a) for a in actions):
            ctx.master().reset()  # a client made before talks to the master just replaced
        ctx.echo(f"waiting for the master and {len(expected)} worker(s) to register")
        try:
            status = ctx.master().wait_ready(key, expected, ctx.config.master.ready_timeout)
        except MasterError as exc:
            raise MasterError(exc.subject, exc.detail + _master_log_tail(ctx), exc.hint) from exc
    return Result(tuple(actions), status, shipments)


def _expected_workers(seen: Observation, actions: Sequence[Action], failed: set[str]) -> list[str]:
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
    name = f"{ctx.config.cluster}-master"
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
        with ctx.master().use(key) as c:
            return master.busy_workers(c.status())
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


__all__ = ["Context", "Images", "Result", "down", "observe", "scale", "session", "up"]

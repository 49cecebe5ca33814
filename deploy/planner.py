"""Desired state vs observed containers -> a list of actions. Pure: no engine, no clock.

``up`` run twice plans nothing the second time; ``scale`` is ``up`` with a new worker count.
Workers are spread by capacity; scale-down removes idle workers first and drains busy ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from .config import Config
from .errors import DeployError
from .keyfile import Secret
from .observed import Observed
from .specs import (
    MASTER,
    MASTER_STOP_TIMEOUT,
    WORKER,
    ContainerSpec,
    ImageRef,
    Images,
    TLSMount,
    drain_timeout,
    master_name,
    master_spec,
    volume_name,
    worker_name,
    worker_spec,
)  # fmt: skip


@dataclass(frozen=True)
class Create:
    spec: ContainerSpec

    @property
    def host(self) -> str:
        return self.spec.host


@dataclass(frozen=True)
class Start:
    container: Observed

    @property
    def host(self) -> str:
        return self.container.host


@dataclass(frozen=True)
class Remove:
    """Stop (SIGTERM, then ``timeout`` seconds for a worker to drain) and remove."""

    container: Observed
    timeout: int
    reason: str

    @property
    def host(self) -> str:
        return self.container.host


@dataclass(frozen=True)
class RemoveVolume:
    host: str
    name: str


Action = Create | Start | Remove | RemoveVolume
# With TLS: the TLS volume (and certificate) of the container NAME of ROLE; None: no TLS.
Mounts = Callable[[str, str], TLSMount]


def images_needed(actions: Sequence[Action]) -> dict[str, tuple[ImageRef, ...]]:
    """Per host, the images its new containers run (restarted ones have theirs)."""
    needed: dict[str, dict[str, ImageRef]] = {}
    for action in actions:
        if isinstance(action, Create):
            needed.setdefault(action.host, {})[action.spec.image.ref] = action.spec.image
    return {h: tuple(sorted(refs.values(), key=lambda r: r.ref)) for h, refs in needed.items()}


def place(hosts: Sequence[tuple[str, int | None]], count: int) -> dict[str, int]:
    """Spread ``count`` workers: each goes to the host with the lowest workers/capacity.

    A host without capacity has no limit and weighs as much as the largest given capacity.
    Placing one at a time makes the result for N+1 the result for N plus one worker, so
    scaling up only adds and scaling down only removes.
    """
    open_hosts = [(name, cap) for name, cap in hosts if cap != 0]
    limit = sum(cap for _, cap in open_hosts if cap is not None)
    if not open_hosts or (all(cap is not None for _, cap in open_hosts) and count > limit):
        raise DeployError(
            "workers",
            f"{count} workers do not fit: the hosts' total capacity is {limit}",
            "raise hosts[].capacity in the inventory, add hosts, or ask for fewer workers",
        )
    weight = max([cap for _, cap in open_hosts if cap] or [1])
    counts = {name: 0 for name, _ in open_hosts}
    for _ in range(count):
        best = min(
            (name for name, cap in open_hosts if cap is None or counts[name] < cap),
            key=lambda n: counts[n] / (dict(open_hosts)[n] or weight),
        )
        counts[best] += 1
    return counts


def plan_up(
    config: Config,
    images: Images,
    key: Secret,
    observed: Sequence[Observed],
    count: int,
    busy: Mapping[str, int],
    reachable: set[str] | None = None,
    with_master: bool = True,
    tls: Mounts | None = None,
) -> list[Action]:
    """Actions that turn ``observed`` into master + ``count`` workers.

    ``busy`` maps worker names to their running job count (from the master's status).
    Hosts outside ``reachable`` are left alone: their share of workers is simply missing.
    With ``tls``, each container gets its TLS volume; a container whose certificate changed
    is outdated like one whose image changed.
    """
    reachable = {h.name for h in config.hosts} if reachable is None else reachable
    actions: list[Action] = []
    if with_master:
        actions += _master_actions(config, images, key, observed, reachable, tls)
    targets = place([(h.name, h.capacity) for h in config.hosts], count)
    workers = [o for o in observed if o.role == WORKER]
    actions += [Remove(o, MASTER_STOP_TIMEOUT, f"unknown role {o.role!r}")
                for o in observed if o.role not in (MASTER, WORKER)]  # fmt: skip
    used = {o.index for o in workers} | _indexes(config.cluster, busy)
    fresh = (i for i in range(1, 1_000_000) if i not in used)
    seen: set[int] = set()
    for host in config.hosts:
        if host.name not in reachable:
            continue
        mine = sorted((o for o in workers if o.host == host.name), key=lambda o: o.index)
        unique = []
        for o in mine:
            if o.index in seen:
                actions.append(Remove(o, _drain(config), "duplicate index"))
            else:
                seen.add(o.index)
                unique.append(o)
        actions += _host_workers(config, images, key, host.name, unique, targets.get(host.name, 0),
                                 busy, fresh, tls)  # fmt: skip
    return actions


def _master_actions(
    config: Config, images: Images, key: Secret, observed: Sequence[Observed], reachable: set[str],
    tls: Mounts | None,
) -> list[Action]:  # fmt: skip
    mount = tls(master_name(config.cluster), MASTER) if tls else None
    want = master_spec(config, images, key, mount)
    masters = [o for o in observed if o.role == MASTER]
    keep = next((o for o in masters if o.host == want.host and o.digest == want.digest), None)
    actions: list[Action] = []
    for o in masters:
        if o is not keep:
            why = "master moved to another host" if o.host != want.host else "outdated"
            actions.append(Remove(o, MASTER_STOP_TIMEOUT, why))
    if want.host not in reachable:
        return actions
    if keep is None:
        actions.append(Create(want))
    elif not keep.running:
        actions.append(Start(keep))
    return actions


def _host_workers(
    config: Config, images: Images, key: Secret, host: str, mine: list[Observed], target: int,
    busy: Mapping[str, int], fresh: Iterator[int], tls: Mounts | None,
) -> list[Action]:  # fmt: skip
    def spec(index: int) -> ContainerSpec:
        name = worker_name(config.cluster, index)
        return worker_spec(config, images, key, host, index, tls(name, WORKER) if tls else None)

    def load(o: Observed) -> int:
        return busy.get(o.name, 0)

    # Keep current, running, busy workers first; what falls off the end is removed,
    # so the idle ones go before the busy ones.
    ranked = sorted(mine, key=lambda o: (o.digest != spec(o.index).digest, not o.running,
                                         -load(o), o.index))  # fmt: skip
    keep, drop = ranked[:target], ranked[target:]
    removes: list[Action] = []
    for o in sorted(drop, key=lambda o: (load(o), -o.index)):
        why = f"scale down, draining {load(o)} running job(s)" if load(o) else "scale down, idle"
        removes.append(Remove(o, _drain(config), why))
    creates: list[Action] = []
    for o in keep:
        if o.digest != spec(o.index).digest:
            removes.append(Remove(o, _drain(config), "outdated, replaced"))
            creates.append(Create(spec(o.index)))
        elif not o.running:
            creates.append(Start(o))
    creates += [Create(spec(next(fresh))) for _ in range(target - len(keep))]
    return removes + creates


def plan_down(
    config: Config, observed: Sequence[Observed], volumes: Sequence[tuple[str, str]] = ()
) -> list[Action]:
    """Remove workers (draining) then the master; ``volumes`` (host, name) only when asked."""
    order = sorted(observed, key=lambda o: (o.role == MASTER, o.host, o.index))
    actions: list[Action] = [
        Remove(o, MASTER_STOP_TIMEOUT if o.role == MASTER else _drain(config), "down")
        for o in order
    ]
    return actions + [RemoveVolume(host, name) for host, name in volumes]


def state_volume(config: Config) -> tuple[str, str]:
    return config.master.host, volume_name(config.cluster)


def _drain(config: Config) -> int:
    return drain_timeout(config)


def _indexes(cluster: str, busy: Mapping[str, int]) -> set[int]:
    prefix = worker_name(cluster, 0)[:-1]
    return {
        int(n[len(prefix) :]) for n in busy if n.startswith(prefix) and n[len(prefix) :].isdigit()
    }

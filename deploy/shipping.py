"""Make the role images present on the hosts that run them, sending only what each lacks.

Observe (each host's images and layer chains), plan (``shipplan``: which images, and how many
of their layers each host already has), execute (one ``docker save`` here per set of images,
then per host a delta archive: held layers as empty files, gzipped over SSH), verify (the
host now holds the image under the content tag). With ``images.registry`` set, push and pull.
"""

from __future__ import annotations

import functools
import os
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from . import engine
from .config import Host
from .context import Context
from .errors import DeployError, HostError
from .observed import Observed
from .parallel import Failures, Outcome, across, each, echo_errors
from .shipplan import Ship, delta_stream, empty_paths, gzipped, plan_ship, read_manifest
from .specs import MASTER, UNBUILT, WORKER, ImageRef, Images

HERE = engine.LOCAL_HOST  # images are built and saved on this machine's engine


@dataclass(frozen=True)
class Sent:
    """What one host was sent: bytes on the wire and seconds."""

    host: str
    wire_bytes: int
    seconds: float


def local_images(ctx: Context) -> Images:
    """The images last built here, by their content tag, without building (placeholders if
    none): the same names ``up`` uses after a build."""
    refs = []
    for name in (ctx.config.images.master, ctx.config.images.slave):
        found = engine.image_info(ctx.engines, HERE, f"{name}:latest")
        if found is None:
            refs.append(ImageRef(f"{name}:latest", UNBUILT))
            continue
        image_id, tags, _ = found
        content = sorted(t for t in tags if t.startswith(f"{name}:hash-"))
        refs.append(ImageRef(content[0] if content else f"{name}:latest", image_id))
    return Images(*refs)


def running_images(ctx: Context, seen: Sequence[Observed]) -> Images:
    """The images the cluster runs now (so ``scale`` adds workers like the others), else the
    ones last built here."""
    local = local_images(ctx)
    refs = {MASTER: local.master, WORKER: local.slave}
    for o in sorted(seen, key=lambda o: o.index):
        if o.image_id and o.image and o.role in refs and o.image_id != refs[o.role].id:
            refs[o.role] = ImageRef(o.image, o.image_id)
    return Images(refs[MASTER], refs[WORKER])


def plan(ctx: Context, needed: Mapping[str, Sequence[ImageRef]], skip: Iterable[str] = ()
         ) -> tuple[list[Ship], Outcome[object]]:  # fmt: skip
    """What each host of ``needed`` lacks, from what it holds (nothing is sent)."""
    refs = {r.ref for refs in needed.values() for r in refs if r.id != UNBUILT}
    chains = {ref: engine.chain(ctx.engines, HERE, ref) for ref in sorted(refs)}
    targets = [h for h in ctx.config.hosts if h.name in needed and h.name not in set(skip)]
    found = across(targets, lambda h: engine.holdings(ctx.engines, h), ctx.config.parallel,
                   echo_errors(ctx.echo))  # fmt: skip
    return plan_ship(needed, found.results, chains), found  # type: ignore[return-value]


def send(ctx: Context, shipments: Sequence[Ship]) -> tuple[list[Sent], Failures]:
    """Carry ``shipments`` out; returns what each host was sent, and the hosts that failed."""
    unbuilt = sorted({r.ref for s in shipments for r in s.images if r.id == UNBUILT})
    if unbuilt:
        raise DeployError("images", f"{' and '.join(unbuilt)} not found here",
                          "run 'deployctl build' first")  # fmt: skip
    failures = Failures()
    failures.add(_name(ctx, [s for s in shipments if s.names]))
    todo = [s for s in shipments if s.images and s.host not in failures]
    if not todo:
        return [], failures
    if ctx.config.images.registry:
        failures.add(_via_registry(ctx, {s.host: [r.ref for r in s.images] for s in todo}))
        return [], failures
    sent, errors = _via_ssh(ctx, todo)
    failures.add(errors)
    return sent, failures


def ensure(ctx: Context, needed: Mapping[str, Sequence[ImageRef]]
           ) -> tuple[list[Ship], list[Sent], Failures]:  # fmt: skip
    """Make the images present on each host of ``needed``: plan, then send."""
    shipments, seen = plan(ctx, needed)
    sent, failures = send(ctx, shipments)
    failures.add(seen)
    return shipments, sent, failures


def _name(ctx: Context, shipments: Sequence[Ship]) -> Outcome[None]:
    """Tag images that hosts hold under another name: nothing to send."""
    names = {s.host: s.names for s in shipments}

    def tag(host: Host) -> None:
        for ref in names[host.name]:
            engine.tag(ctx.engines, host, ref.id, ref.ref)
            ctx.echo(f"{host.name}: named {ref.ref} (image {ref.version} was there)")

    hosts = [ctx.config.host(n) for n in names]
    return across(hosts, tag, ctx.config.parallel, echo_errors(ctx.echo), ctx.stop)


def _via_ssh(ctx: Context, todo: Sequence[Ship]) -> tuple[list[Sent], dict[str, DeployError]]:
    """Save each distinct set of images once here, then send each host its own delta."""
    groups: dict[tuple[str, ...], list[Ship]] = {}
    for ship in todo:
        groups.setdefault(tuple(sorted(r.ref for r in ship.images)), []).append(ship)
    work = functools.partial(_save_and_send, ctx)
    sent: list[Sent] = []
    errors: dict[str, DeployError] = {}
    for result, error in each(list(groups.items()), work, len(groups), ctx.stop, "ship"):
        if error is not None:
            raise error  # saving here failed: no host can get these images
        assert result is not None
        sent += result.results.values()
        errors.update(result.errors)
    return sent, errors


def _save_and_send(ctx: Context, group: tuple[tuple[str, ...], list[Ship]]) -> Outcome[Sent]:
    refs, ships = group
    with tempfile.TemporaryDirectory(prefix="deployctl-ship-", dir=_tmp_dir()) as tmp:
        path = os.path.join(tmp, "images.tar")
        started = time.monotonic()
        with open(path, "wb") as out:
            size = engine.save(ctx.engines, HERE, list(refs), out)
        ctx.echo(f"saved {' '.join(refs)} ({size / 1e6:.0f} MB) in "
                 f"{time.monotonic() - started:.1f}s")  # fmt: skip
        by_host = {s.host: s for s in ships}
        load = functools.partial(_send_one, ctx, path=path, by_host=by_host)
        return across([ctx.config.host(s.host) for s in ships], load, ctx.config.parallel,
                      echo_errors(ctx.echo), ctx.stop)  # fmt: skip


def _send_one(ctx: Context, host: Host, path: str, by_host: Mapping[str, Ship]) -> Sent:
    ship = by_host[host.name]
    held = {r.ref: n for r, n in zip(ship.images, ship.held, strict=False)}
    started = time.monotonic()
    counted = [0]
    with tarfile.open(path, "r:") as archive:
        empty = empty_paths(read_manifest(archive), held)
        stream: Iterator[bytes] = delta_stream(archive, empty)
        # Over SSH the link (paramiko, ~10-15 MB/s) is slower than gzip -1 (~60 MB/s a core);
        # to this machine's own engine it is not.
        if not host.local:
            stream = gzipped(stream)
        ctx.echo(f"{host.name}: shipping {_what(ship)}")
        engine.load(ctx.engines, host, _counting(stream, counted))
    took = time.monotonic() - started
    for ref in ship.images:
        if engine.image_id(ctx.engines, host, ref.ref) != ref.id:
            raise HostError(host.name, host.address, f"{ref.ref} is not there after loading it",
                            "see the engine's log on that host")  # fmt: skip
    ctx.echo(f"{host.name}: images loaded in {took:.1f}s ({counted[0] / 1e6:.1f} MB sent)")
    return Sent(host.name, counted[0], took)


def _what(ship: Ship) -> str:
    parts = [f"{r.ref} ({n} of {total} layers there)" if total else r.ref
             for r, n, total in zip(ship.images, ship.held, ship.layers, strict=False)]
    return ", ".join(parts)


def _counting(chunks: Iterable[bytes], counted: list[int]) -> Iterator[bytes]:
    for chunk in chunks:
        counted[0] += len(chunk)
        yield chunk


def _via_registry(ctx: Context, todo: dict[str, list[str]]) -> Outcome[None]:
    registry = ctx.config.images.registry
    assert registry
    refs = sorted({ref for refs in todo.values() for ref in refs})
    remote = {ref: f"{registry.rstrip('/')}/{ref}" for ref in refs}
    for ref, target in remote.items():
        engine.push(ctx.engines, HERE, ref, target)
        ctx.echo(f"pushed {target}")

    def pull(host: Host) -> None:
        for ref in todo[host.name]:
            engine.pull(ctx.engines, host, remote[ref], ref)
            ctx.echo(f"{host.name}: pulled {remote[ref]}")

    hosts = [ctx.config.host(n) for n in todo]
    return across(hosts, pull, ctx.config.parallel, echo_errors(ctx.echo))


def _tmp_dir() -> str:
    for candidate in ("/var/tmp", tempfile.gettempdir()):
        if os.access(candidate, os.W_OK):
            return candidate
    raise DeployError("ship", "no writable temporary directory", "set TMPDIR")

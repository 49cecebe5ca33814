"""Make the role images present on every host that runs them: build here, then ship.

Each host gets the images it lacks, by id: through a registry when ``images.registry`` is set,
else ``docker save`` of those images (shared layers once) streamed over the host's SSH connection
into ``docker load``. What would be sent is planned first (``plan_shipping``), so a dry run shows
it without sending anything.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from . import engine
from .config import Host
from .errors import DeployError
from .parallel import across, each
from .planner import Ship, plan_ship
from .specs import MASTER, UNBUILT, ImageRef, Images

if TYPE_CHECKING:
    from .cluster import Context, Observation


class _EchoWriter(io.StringIO):
    """A text stream that sends complete lines to ``echo`` (build output goes to stderr)."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith(("images:", "Step ")):  # the steps, not every layer's chatter
                self.echo(f"  {line.rstrip()}")
        return len(text)


def build_here(ctx: Context) -> Images:
    """Build both role images on this machine's engine (skipped when their inputs are unchanged)."""
    from . import images as builder  # the image build module (Docker SDK, debootstrap)

    names = {"master": ctx.config.images.master, "slave": ctx.config.images.slave}
    here = ctx.engines.client(engine.LOCAL_HOST)
    made = builder.build_images(here, names=names, out=_EchoWriter(ctx.echo))
    built = {b.role: b for b in made}
    for b in built.values():
        ctx.echo(f"image {b.repository}:{b.tags[1]} {'up to date' if b.skipped else 'built'}")
    return Images(*(ImageRef(f"{b.repository}:{b.tags[1]}", b.image_id)
                    for b in (built["master"], built["slave"])))  # fmt: skip


def local_images(ctx: Context) -> Images:
    """The images last built here (``latest``), without building; placeholders if there are none."""
    refs = []
    for name in (ctx.config.images.master, ctx.config.images.slave):
        ref = f"{name}:latest"
        found = engine.image_id(ctx.engines, engine.LOCAL_HOST, ref)
        refs.append(ImageRef(ref, found or UNBUILT))
    return Images(*refs)


def running_images(ctx: Context, seen: Observation) -> Images:
    """The images the cluster runs now (so ``scale`` adds workers like the others), else local."""
    local = local_images(ctx)
    refs = {MASTER: local.master, "worker": local.slave}
    for o in seen.containers:
        if o.image_id and o.role in refs and o.image_id != refs[o.role].id:
            refs[o.role] = ImageRef(o.image_id, o.image_id)
    return Images(refs[MASTER], refs["worker"])


def plan_shipping(ctx: Context, needed: Mapping[str, Sequence[ImageRef]]) -> list[Ship]:
    """What each host of ``needed`` lacks, from the image ids found there (nothing is sent)."""

    def found(host: Host) -> dict[str, tuple[str | None, bool]]:
        have = {}
        for ref in needed[host.name]:
            named = engine.image_id(ctx.engines, host, ref.ref)
            by_id = named == ref.id or (
                ref.id != UNBUILT and engine.image_id(ctx.engines, host, ref.id) is not None
            )
            have[ref.ref] = (named, by_id)
        return have

    targets = [h for h in ctx.config.hosts if h.name in needed and h.name not in ctx.failures]
    return plan_ship(needed, across(targets, found, ctx.config.parallel, ctx.fail).results)


def send(ctx: Context, shipments: Sequence[Ship]) -> None:
    """Carry ``shipments`` out; hosts that fail are recorded in ``ctx``."""
    unbuilt = sorted({r.ref for s in shipments for r in s.images if r.id == UNBUILT})
    if unbuilt:
        raise DeployError("images", f"{' and '.join(unbuilt)} not found here",
                          "run 'deployctl build' first")  # fmt: skip
    _name(ctx, [s for s in shipments if s.names])
    todo = {s.host: [r.ref for r in s.images] for s in shipments if s.images}
    if not todo:
        return
    if ctx.config.images.registry:
        _via_registry(ctx, todo)
    else:
        _via_ssh(ctx, todo)


def _name(ctx: Context, shipments: Sequence[Ship]) -> None:
    """Tag images that hosts hold under another name: nothing to send."""
    names = {s.host: s.names for s in shipments}

    def tag(host: Host) -> None:
        for ref in names[host.name]:
            engine.tag(ctx.engines, host, ref.id, ref.ref)
            ctx.echo(f"{host.name}: named {ref.ref} (image {ref.version} was there)")

    across([ctx.config.host(n) for n in names], tag, ctx.config.parallel, ctx.fail, ctx.stop)


def ensure_images(ctx: Context, needed: Mapping[str, Sequence[ImageRef]]) -> list[Ship]:
    """Make the images present on each host of ``needed``: plan by id, then send."""
    shipments = plan_shipping(ctx, needed)
    send(ctx, shipments)
    return shipments


def _via_ssh(ctx: Context, todo: dict[str, list[str]]) -> None:
    """Save each distinct set of missing images once and stream it to its hosts, sets at once."""
    groups: dict[tuple[str, ...], list[Host]] = {}
    for name, refs in todo.items():
        groups.setdefault(tuple(sorted(refs)), []).append(ctx.config.host(name))
    work = functools.partial(_save_and_load, ctx)
    errors = [e for _, e in each(list(groups.items()), work, len(groups), ctx.stop, "ship") if e]
    if errors:
        raise errors[0]  # saving here failed: no host can get these images


def _save_and_load(ctx: Context, group: tuple[tuple[str, ...], list[Host]]) -> None:
    refs, hosts = group
    with tempfile.TemporaryDirectory(prefix="deployctl-ship-", dir=_tmp_dir()) as tmp:
        path = os.path.join(tmp, "images.tar")
        started = time.monotonic()
        with open(path, "wb") as out:
            size = engine.save(ctx.engines, engine.LOCAL_HOST, list(refs), out)
        ctx.echo(f"saved {' '.join(refs)} ({size / 1e6:.0f} MB) in "
                 f"{time.monotonic() - started:.1f}s")  # fmt: skip
        load = functools.partial(_load, ctx, path=path, size=size)
        across(hosts, load, ctx.config.parallel, ctx.fail, ctx.stop)


def _load(ctx: Context, host: Host, path: str, size: int) -> None:
    started = time.monotonic()
    sent = [0, 0]  # bytes sent, last quarter reported
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            sent[0] += n
            quarter = sent[0] * 4 // max(size, 1)
            if quarter > sent[1] and quarter < 4:
                sent[1] = quarter
                ctx.echo(f"{host.name}: shipping images {quarter * 25}%")

    ctx.echo(f"{host.name}: shipping images ({size / 1e6:.0f} MB)")
    with open(path, "rb") as data:
        engine.load(ctx.engines, host, data, progress)
    took = time.monotonic() - started
    ctx.echo(f"{host.name}: images loaded in {took:.1f}s ({size / 1e6 / max(took, 1e-3):.0f} MB/s)")


def _via_registry(ctx: Context, todo: dict[str, list[str]]) -> None:
    registry = ctx.config.images.registry
    assert registry
    refs = sorted({ref for refs in todo.values() for ref in refs})
    remote = {ref: f"{registry.rstrip('/')}/{ref}" for ref in refs}
    for ref, target in remote.items():
        engine.push(ctx.engines, engine.LOCAL_HOST, ref, target)
        ctx.echo(f"pushed {target}")

    def pull(host: Host) -> None:
        for ref in todo[host.name]:
            engine.pull(ctx.engines, host, remote[ref], ref)
            ctx.echo(f"{host.name}: pulled {remote[ref]}")

    across([ctx.config.host(n) for n in todo], pull, ctx.config.parallel, ctx.fail)


def _tmp_dir() -> str:
    for candidate in ("/var/tmp", tempfile.gettempdir()):
        if os.access(candidate, os.W_OK):
            return candidate
    raise DeployError("ship", "no writable temporary directory", "set TMPDIR")

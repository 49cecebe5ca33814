"""Make the role images present on every host that runs them: build here, then ship.

Shipping goes through a registry when ``images.registry`` is set, else ``docker save`` of the
missing images (shared layers once) streamed over each host's SSH connection into ``docker load``.
Hosts that already hold the same image id are skipped.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import engine
from .config import Host
from .errors import DeployError
from .parallel import across
from .specs import MASTER, ImageRef, Images

if TYPE_CHECKING:
    from .cluster import Context, Observation

UNBUILT = "unbuilt"


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


def ensure_images(
    ctx: Context, hosts: frozenset[str], build: bool, ship: bool, images: Images | None = None
) -> Images:
    """Build (when asked) and ship to ``hosts``; hosts that fail are recorded in ``ctx``."""
    if images is None:
        images = build_here(ctx) if build else local_images(ctx)
    if not ship:
        return images
    if UNBUILT in (images.master.id, images.slave.id):
        raise DeployError("images", f"{images.master.ref} or {images.slave.ref} not found here",
                          "run 'deployctl build' first")  # fmt: skip
    targets = [h for h in ctx.config.hosts if h.name in hosts and h.name not in ctx.failures]
    missing = across(targets, lambda h: _missing(ctx, h, images), ctx.config.parallel, ctx.fail)
    todo = {name: refs for name, refs in missing.results.items() if refs}
    if not todo:
        return images
    if ctx.config.images.registry:
        _via_registry(ctx, images, todo)
    else:
        _via_ssh(ctx, todo)
    return images


def _missing(ctx: Context, host: Host, images: Images) -> list[str]:
    have = [engine.image_id(ctx.engines, host, ref.ref) for ref in (images.master, images.slave)]
    return [ref.ref for ref, found in zip((images.master, images.slave), have, strict=True)
            if found != ref.id]  # fmt: skip


def _via_ssh(ctx: Context, todo: dict[str, list[str]]) -> None:
    """Save each distinct set of missing images once, then stream it to its hosts in parallel."""
    groups: dict[tuple[str, ...], list[Host]] = {}
    for name, refs in todo.items():
        groups.setdefault(tuple(sorted(refs)), []).append(ctx.config.host(name))
    for group, hosts in groups.items():
        with tempfile.TemporaryDirectory(prefix="deployctl-ship-", dir=_tmp_dir()) as tmp:
            path = os.path.join(tmp, "images.tar")
            started = time.monotonic()
            with open(path, "wb") as out:
                size = engine.save(ctx.engines, engine.LOCAL_HOST, list(group), out)
            ctx.echo(f"saved {' '.join(group)} ({size / 1e6:.0f} MB) in "
                     f"{time.monotonic() - started:.1f}s")  # fmt: skip
            load = functools.partial(_load, ctx, path=path, size=size)
            across(hosts, load, ctx.config.parallel, ctx.fail)


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


def _via_registry(ctx: Context, images: Images, todo: dict[str, list[str]]) -> None:
    registry = ctx.config.images.registry
    assert registry
    remote = {ref.ref: f"{registry.rstrip('/')}/{ref.ref}" for ref in (images.master, images.slave)}
    for ref, target in remote.items():
        if any(ref in refs for refs in todo.values()):
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

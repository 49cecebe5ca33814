"""Building here: the role images (skipped when their inputs are unchanged) and the offline base.

Observe (which base and which hash-tagged images this engine holds), plan (``imagekit``: the
contexts and their hashes), execute (the engine builds), verify (the tags point at the result).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO

from . import engine, rootfs
from .config import Host
from .imagekit import (
    DEFAULT_BASE,
    OFFLINE_BASE,
    ROLES,
    BuildPlan,
    BuiltImage,
    ImageError,
    context_tar,
    project_version,
    role_context,
)
from .specs import ImageRef, Images

HERE = engine.LOCAL_HOST  # this machine's engine (DOCKER_HOST or the default socket)


def ensure_base(engines: engine.Engines, requested: str | None, out: IO[str],
                host: Host = HERE) -> str:  # fmt: skip
    """The base to build on: ``requested`` or the default, pulled if needed; else the offline one.

    Only the default falls back: a base named by the user that cannot be had is an error.
    """
    name = requested or DEFAULT_BASE
    if engine.image_id(engines, host, name):
        return name
    why = engine.pull_quietly(engines, host, name)
    if why is None:
        return name
    if name != DEFAULT_BASE:
        raise ImageError(f"base image {name}", f"cannot be pulled ({why})",
                         "pull or load it first, or leave --base unset")  # fmt: skip
    print(f"images: cannot pull {name} (no registry?); using the offline base {OFFLINE_BASE}",
          file=out)  # fmt: skip
    if not engine.image_id(engines, host, OFFLINE_BASE):
        base_image(engines, out)
    return OFFLINE_BASE


def has_image(engines: engine.Engines, ref: str, host: Host = HERE) -> bool:
    return engine.image_id(engines, host, ref) is not None


def base_image(engines: engine.Engines, out: IO[str], tag: str = OFFLINE_BASE,
               suite: str = "bookworm", mirror: str | None = None, host: Host = HERE) -> str:
    """Make the offline base with debootstrap and import it as ``tag``; return its id."""
    print(f"images: making {tag} with debootstrap ({suite}, about a minute)", file=out)
    with rootfs.tarball(f"base image {tag}", suite, mirror, out) as stream:
        made = engine.import_image(engines, host, stream, tag, rootfs.BASE_CHANGES)
    if not made:
        raise ImageError(f"base image {tag}", "import failed", "run 'deployctl base-image' again")
    return made


def plan(engines: engine.Engines, names: Mapping[str, str] | None, base: str | None,
         out: IO[str], host: Host = HERE) -> list[BuildPlan]:  # fmt: skip
    """One build plan per role; resolves (and if needed pulls or makes) the base image."""
    base_ref = ensure_base(engines, base, out, host)
    base_id = engine.image_id(engines, host, base_ref) or base_ref
    version = project_version()
    names = {**{role: f"scheduler-{role}" for role in ROLES}, **(names or {})}
    return [BuildPlan(role, names[role], version, base_ref, base_id,
                      role_context(role, version)) for role in ROLES]  # fmt: skip


def build_role(engines: engine.Engines, plan: BuildPlan, out: IO[str], no_cache: bool = False,
               host: Host = HERE) -> BuiltImage:  # fmt: skip
    """Build one role image unless an image with the same inputs' hash exists; tag it."""
    hash_ref = f"{plan.repository}:{plan.tags[1]}"
    image_id = None if no_cache else engine.image_id(engines, host, hash_ref)
    skipped = image_id is not None
    if image_id is None:
        print(f"images: building {hash_ref} on {plan.base_image}", file=out)
        image_id = engine.build(engines, host, context_tar(plan.files), plan.repository,
                                plan.buildargs, plan.labels, out, no_cache)  # fmt: skip
    for tag in plan.tags:
        engine.tag(engines, host, image_id, f"{plan.repository}:{tag}")
    engine.untag(engines, host, plan.repository, keep=hash_ref, prefix="hash-")
    found = engine.image_info(engines, host, image_id)
    if found is None:
        raise ImageError(f"image {hash_ref}", "vanished right after its build", "build again")
    return BuiltImage(plan.role, plan.repository, found[0], plan.tags, found[2], skipped)


def build_images(engines: engine.Engines, out: IO[str], names: Mapping[str, str] | None = None,
                 base: str | None = None, no_cache: bool = False) -> list[BuiltImage]:
    """Build (or find up to date) the master and slave images; return what each is now."""
    return [build_role(engines, p, out, no_cache) for p in plan(engines, names, base, out)]


def as_images(built: list[BuiltImage]) -> Images:
    """The content-hash references of a build: the one name up, scale and status use."""
    by_role = {b.role: ImageRef(f"{b.repository}:{b.tags[1]}", b.image_id) for b in built}
    return Images(by_role["master"], by_role["slave"])

"""The role images' build inputs, as data: contexts, hashes, tags. Pure apart from reading files.

Each role image is built from ``deploy/images/<role>/Dockerfile`` (package data, so an
installed deployctl builds from any directory) with a context made here: the scheduler package
and its run-time dependencies (cloudpickle, prometheus_client) as plain files (no pip, no
network inside the build) plus the shared helpers in
``deploy/images/common``. Images are tagged with the project version, ``latest`` and a hash of
every build input, so a build whose inputs did not change is skipped.

The engine adapter (``deploy.engine``) runs the build; ``deploy.build`` decides what to build.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import re
import tarfile
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import scheduler
from scheduler.settings import DEFAULT_GRACE_SECONDS, DEFAULT_PORT

from .errors import DeployError
from .specs import STOP_MARGIN

__all__ = [
    "DEFAULT_BASE",
    "OFFLINE_BASE",
    "ROLES",
    "BuildPlan",
    "BuiltImage",
    "ContextFile",
    "ImageError",
    "content_hash",
    "image_tags",
    "role_context",
]

ROLES = ("master", "slave")
DEFAULT_BASE = "python:3.11-slim"
OFFLINE_BASE = "scheduler-base:bookworm"
LABEL = "org.scheduler-kit"
KIT = Path(__file__).resolve().parent / "images"  # package data: Dockerfiles and the kit
SCHEDULER_SOURCE = Path(scheduler.__file__).resolve().parent
CHECKOUT = Path(__file__).resolve().parent.parent  # holds pyproject.toml in a checkout

# Defaults baked into the images come from the scheduler's settings, never written twice.
BUILD_DEFAULTS = {
    "SCHEDULER_PORT": str(DEFAULT_PORT),
    "STOP_TIMEOUT": str(int(DEFAULT_GRACE_SECONDS) + STOP_MARGIN),
}


class ImageError(DeployError):
    """An image could not be built, pulled or found."""


@dataclass(frozen=True)
class ContextFile:
    """One file of a build context: its path in the context, its bytes and its mode."""

    path: str
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class BuildPlan:
    """Everything one role's build depends on, and the names it will carry."""

    role: str
    repository: str
    version: str
    base_image: str
    base_id: str
    files: tuple[ContextFile, ...]

    @property
    def content_hash(self) -> str:
        return content_hash(self.files, self.version, self.base_id)

    @property
    def tags(self) -> tuple[str, ...]:
        return image_tags(self.version, self.content_hash)

    @property
    def buildargs(self) -> dict[str, str]:
        return {"BASE_IMAGE": self.base_image, "VERSION": self.version, **BUILD_DEFAULTS}

    @property
    def labels(self) -> dict[str, str]:
        return {f"{LABEL}.content-hash": self.content_hash, f"{LABEL}.version": self.version}


@dataclass(frozen=True)
class BuiltImage:
    """The outcome of one role's build: the image id, its names, its size, and whether skipped."""

    role: str
    repository: str
    image_id: str
    tags: tuple[str, ...]
    size: int
    skipped: bool


# ---- pure: hashing, tags, context --------------------------------------------------------


def content_hash(files: Iterable[ContextFile], version: str, base_id: str) -> str:
    """A short hex digest of the build inputs: every context file, the version, the base image."""
    digest = hashlib.sha256(f"version={version}\nbase={base_id}\n".encode())
    for name, value in sorted(BUILD_DEFAULTS.items()):
        digest.update(f"{name}={value}\n".encode())
    for item in sorted(files, key=lambda f: f.path):
        file_hash = hashlib.sha256(item.data).hexdigest()
        digest.update(f"{item.path}\0{item.mode:o}\0{file_hash}\n".encode())
    return digest.hexdigest()[:12]


def image_tags(version: str, digest: str) -> tuple[str, ...]:
    """The tags a role image carries: the project version, the inputs' hash, and ``latest``."""
    return (version, f"hash-{digest}", "latest")


def context_tar(files: Iterable[ContextFile]) -> bytes:
    """A build context as a tar archive whose bytes depend only on the files (no mtimes, owners)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in sorted(files, key=lambda f: f.path):
            info = tarfile.TarInfo(item.path)
            info.size, info.mode, info.mtime = len(item.data), item.mode, 0
            tar.addfile(info, io.BytesIO(item.data))
    return buffer.getvalue()


def follow_build(chunks: Iterable[Mapping[str, Any]], repository: str, out: IO[str]) -> str:
    """Echo a build's output to ``out`` and return the image id; raise naming the failing step."""
    step, image_id = "the first step", ""
    for chunk in chunks:
        if "error" in chunk:
            raise ImageError(
                f"image {repository}",
                f"build failed at {step}: {str(chunk['error']).strip()}",
                "see the build output above",
            )
        text = str(chunk.get("stream", ""))
        out.write(text)
        if text.startswith("Step "):
            step = text.strip()
        image_id = (chunk.get("aux") or {}).get("ID", image_id)
        if match := re.match(r"Successfully built ([0-9a-f]+)", text):
            image_id = image_id or match.group(1)
    if not image_id:
        raise ImageError(f"image {repository}", "the engine reported no image id", "build again")
    return image_id


# ---- reading the build inputs -------------------------------------------------------------


def project_version(checkout: Path = CHECKOUT) -> str:
    """The version in pyproject.toml (a checkout being built), else the installed one's."""
    pyproject = checkout / "pyproject.toml"
    if pyproject.is_file():
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    try:
        return importlib.metadata.version("scheduler-kit")
    except importlib.metadata.PackageNotFoundError:
        return scheduler.__version__


def role_context(role: str, version: str, kit: Path = KIT,
                 source: Path = SCHEDULER_SOURCE) -> tuple[ContextFile, ...]:  # fmt: skip
    """The build context of one role: its Dockerfile and the kit/ directory the image installs.

    ``kit`` holds the Dockerfiles and helpers, ``source`` the scheduler package to install.
    """
    files = [_read(kit / role / "Dockerfile", "Dockerfile")]
    files += _tree(kit / "common", "kit")
    files += _tree(source, "kit/site/scheduler")
    for dist in runtime_dists():
        files += _dist_files(dist, "kit/site")
    files.append(ContextFile(f"kit/site/scheduler_kit-{version}.dist-info/METADATA", (
        f"Metadata-Version: 2.1\nName: scheduler-kit\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {d}\n" for d in runtime_dists())).encode()))
    return tuple(files)


def runtime_dists() -> tuple[str, ...]:
    """What the scheduler needs at run time besides the standard library: the kit's own
    dependencies as installed (pyproject's list, not written again here)."""
    wanted = importlib.metadata.requires("scheduler-kit") or []
    names = {re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0] for req in wanted
             if "extra ==" not in req}  # fmt: skip
    return tuple(sorted(n.lower().replace("-", "_") for n in names))


def _read(path: Path, arcname: str) -> ContextFile:
    # helpers under bin/ are commands whatever mode the installer gave them
    executable = path.stat().st_mode & 0o111 or "/bin/" in arcname
    mode = 0o755 if executable else 0o644
    return ContextFile(arcname, path.read_bytes(), mode)


def _tree(root: Path, prefix: str) -> list[ContextFile]:
    if not root.is_dir():
        raise ImageError(f"build input {root}", "is missing", "reinstall scheduler-kit[deploy]")
    return [_read(path, f"{prefix}/{path.relative_to(root).as_posix()}")
            for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"]


def _dist_files(name: str, prefix: str) -> list[ContextFile]:
    """A pure-Python distribution as installed here, so the build never reaches PyPI."""
    dist = importlib.metadata.distribution(name)
    keep = [f for f in dist.files or ()
            if "__pycache__" not in f.parts
            and (f.parts[0] == name or f.name == "METADATA" or "licenses" in f.parts)]
    return [_read(Path(str(dist.locate_file(f))), f"{prefix}/{f.as_posix()}") for f in keep]



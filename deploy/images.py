"""Build the role images (master, slave) and the offline base image through the Docker SDK.

Each role image is built from ``images/<role>/Dockerfile`` with a context made here: the
scheduler package and cloudpickle as plain files (no pip, no network inside the build) plus the
shared helpers in ``images/common``. Images are tagged with the project version, ``latest`` and
a hash of every build input, so a build whose inputs did not change is skipped.

Where the default base (``python:3.11-slim``) cannot be pulled, the build falls back to a base
made with debootstrap from the distribution's mirror and imported as ``scheduler-base:bookworm``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors

from deploy.errors import DeployError

__all__ = [
    "DEFAULT_BASE",
    "OFFLINE_BASE",
    "ROLES",
    "BuildPlan",
    "BuiltImage",
    "ContextFile",
    "ImageError",
    "build_base_image",
    "build_images",
    "content_hash",
    "ensure_base",
]

ROLES = ("master", "slave")
DEFAULT_BASE = "python:3.11-slim"
OFFLINE_BASE = "scheduler-base:bookworm"
LABEL = "org.scheduler-kit"
SOURCE_ROOT = Path(__file__).resolve().parent.parent
# What debootstrap leaves that an image does not need (package cache, docs, translations).
_SLIM_PATHS = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
               "usr/share/info", "usr/share/locale", "var/log")
_BASE_CHANGES = ("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "ENV LANG=C.UTF-8", 'CMD ["python3"]')


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
        return {"BASE_IMAGE": self.base_image, "VERSION": self.version}

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


def project_version(source: Path = SOURCE_ROOT) -> str:
    """The version in pyproject.toml (the checkout being built), else the installed one."""
    pyproject = source / "pyproject.toml"
    if pyproject.is_file():
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    return importlib.metadata.version("scheduler-kit")


def role_context(role: str, version: str, source: Path = SOURCE_ROOT) -> tuple[ContextFile, ...]:
    """The build context of one role: its Dockerfile and the kit/ directory the image installs."""
    files = [_read(source / "images" / role / "Dockerfile", "Dockerfile")]
    files += _tree(source / "images" / "common", "kit")
    files += _tree(source / "scheduler", "kit/site/scheduler")
    files += _cloudpickle_files("kit/site")
    files.append(ContextFile(f"kit/site/scheduler_kit-{version}.dist-info/METADATA", (
        f"Metadata-Version: 2.1\nName: scheduler-kit\nVersion: {version}\n"
        "Requires-Dist: cloudpickle>=3.0\n").encode()))
    return tuple(files)


def _read(path: Path, arcname: str) -> ContextFile:
    mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
    return ContextFile(arcname, path.read_bytes(), mode)


def _tree(root: Path, prefix: str) -> list[ContextFile]:
    if not root.is_dir():
        raise ImageError(f"build input {root}", "is missing", "build from a checkout of the kit")
    return [_read(path, f"{prefix}/{path.relative_to(root).as_posix()}")
            for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"]


def _cloudpickle_files(prefix: str) -> list[ContextFile]:
    """cloudpickle as installed here (pure Python), so the build never reaches PyPI."""
    dist = importlib.metadata.distribution("cloudpickle")
    keep = [f for f in dist.files or ()
            if "__pycache__" not in f.parts
            and (f.parts[0] == "cloudpickle" or f.name == "METADATA" or "licenses" in f.parts)]
    return [_read(Path(str(dist.locate_file(f))), f"{prefix}/{f.as_posix()}") for f in keep]


# ---- side effects: the engine ---------------------------------------------------------------


def connect(base_url: str | None = None) -> docker.DockerClient:
    """A Docker client for ``base_url`` (default: the environment's engine)."""
    try:
        client = (docker.DockerClient(base_url=base_url, timeout=300) if base_url
                  else docker.from_env(timeout=300))
        client.ping()
    except docker.errors.DockerException as exc:
        raise ImageError("docker engine", f"does not answer ({exc})",
                         "start one: scripts/engine.sh start (or make deps)") from exc
    return client


def _image_id(client: docker.DockerClient, name: str) -> str | None:
    try:
        return str(client.images.get(name).id)
    except docker.errors.ImageNotFound:
        return None


def ensure_base(client: docker.DockerClient, requested: str | None = None,
                out: IO[str] = sys.stderr) -> str:
    """The base to build on: ``requested`` or the default, pulled if needed; else the offline one.

    Only the default falls back: a base named by the user that cannot be had is an error.
    """
    name = requested or DEFAULT_BASE
    if _image_id(client, name):
        return name
    try:
        client.images.pull(name)
        return name
    except docker.errors.APIError as exc:
        if requested and requested != DEFAULT_BASE:
            raise ImageError(f"base image {name}", f"cannot be pulled ({exc.explanation})",
                             "pull or load it first, or leave --base unset") from exc
    print(f"images: cannot pull {name} (no registry?); using the offline base {OFFLINE_BASE}",
          file=out)
    if not _image_id(client, OFFLINE_BASE):
        build_base_image(client, out=out)
    return OFFLINE_BASE


def plan_builds(client: docker.DockerClient, names: Mapping[str, str] | None = None,
                base: str | None = None, source: Path = SOURCE_ROOT,
                out: IO[str] = sys.stderr) -> list[BuildPlan]:
    """One build plan per role; resolves (and if needed pulls or makes) the base image."""
    base_image = ensure_base(client, base, out)
    base_id = _image_id(client, base_image) or base_image
    version = project_version(source)
    names = {**{role: f"scheduler-{role}" for role in ROLES}, **(names or {})}
    return [BuildPlan(role, names[role], version, base_image, base_id,
                      role_context(role, version, source)) for role in ROLES]


def build_role(client: docker.DockerClient, plan: BuildPlan, out: IO[str] = sys.stderr,
               no_cache: bool = False) -> BuiltImage:
    """Build one role image unless an image with the same inputs' hash exists; tag it."""
    hash_ref = f"{plan.repository}:{plan.tags[1]}"
    image_id = None if no_cache else _image_id(client, hash_ref)
    skipped = image_id is not None
    if image_id is None:
        print(f"images: building {hash_ref} on {plan.base_image}", file=out)
        try:
            chunks = client.api.build(
                fileobj=io.BytesIO(context_tar(plan.files)), custom_context=True,
                buildargs=plan.buildargs, labels=plan.labels, decode=True, rm=True,
                forcerm=True, nocache=no_cache, network_mode="none", pull=False)
            image_id = follow_build(chunks, plan.repository, out)
        except docker.errors.APIError as exc:
            raise ImageError(f"image {plan.repository}", f"build refused ({exc.explanation})",
                             "check the engine's log") from exc
    for tag in plan.tags:
        client.api.tag(image_id, plan.repository, tag)
    _untag_older(client, plan)
    image = client.images.get(image_id)
    return BuiltImage(plan.role, plan.repository, str(image.id), plan.tags,
                      int(image.attrs.get("Size", 0)), skipped)


def _untag_older(client: docker.DockerClient, plan: BuildPlan) -> None:
    """Drop this repository's other hash tags, so superseded builds do not pile up; an image
    that a container still uses stays."""
    current = f"{plan.repository}:{plan.tags[1]}"
    for image in client.images.list(name=plan.repository):
        for ref in image.tags:
            if ref.startswith(f"{plan.repository}:hash-") and ref != current:
                try:
                    client.images.remove(ref)
                except docker.errors.APIError:
                    pass


def build_images(client: docker.DockerClient | None = None, *,
                 names: Mapping[str, str] | None = None, base: str | None = None,
                 source: Path = SOURCE_ROOT, out: IO[str] = sys.stderr,
                 no_cache: bool = False) -> list[BuiltImage]:
    """Build (or find up to date) the master and slave images; return what each is now."""
    client = client or connect()
    return [build_role(client, plan, out, no_cache)
            for plan in plan_builds(client, names, base, source, out)]


# ---- the offline base -----------------------------------------------------------------------


def build_base_image(client: docker.DockerClient, tag: str = OFFLINE_BASE, *,
                     suite: str = "bookworm", mirror: str | None = None,
                     out: IO[str] = sys.stderr) -> str:
    """Make a Debian minbase with python3 by debootstrap and import it as ``tag``; return its id."""
    repository, _, version = tag.partition(":")
    with tempfile.TemporaryDirectory(prefix="scheduler-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        try:
            print(f"images: making {tag} with debootstrap ({suite}, about a minute)", file=out)
            _run(["debootstrap", "--variant=minbase", "--include=python3", suite, str(rootfs),
                  *([mirror] if mirror else [])], tag, out)
            _slim(rootfs)
            with subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                                  stdout=subprocess.PIPE) as tar:
                result = client.api.import_image_from_stream(
                    tar.stdout, repository=repository, tag=version or "latest",
                    changes=list(_BASE_CHANGES))
        finally:
            _unmount_below(rootfs)
    image_id = _image_id(client, tag)
    if not image_id:
        raise ImageError(f"base image {tag}", f"import failed ({result})", "run make base-image")
    return image_id


def _run(argv: list[str], subject: str, out: IO[str]) -> None:
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError as exc:
        raise ImageError(f"base image {subject}", f"{argv[0]} is not installed",
                         f"apt-get install {argv[0]} (make deps does)") from exc
    if proc.returncode:
        out.write(proc.stdout[-4000:])
        raise ImageError(f"base image {subject}", f"{argv[0]} exited with {proc.returncode}",
                         "see its output above; check the mirror, or pass --mirror")


def _slim(rootfs: Path) -> None:
    for rel in _SLIM_PATHS:
        subprocess.run(["find", str(rootfs / rel), "-mindepth", "1", "-not", "-name", "lock",
                        "-delete"], stderr=subprocess.DEVNULL, check=False)


def _unmount_below(rootfs: Path) -> None:
    """Lazily unmount whatever a failed debootstrap left mounted inside the root file system."""
    prefix = f"{rootfs}/"
    with open("/proc/self/mounts") as mounts:
        targets = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for target in sorted(targets, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)


# ---- command line (make images, make base-image) --------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        client = connect()
        if args.command == "base":
            return _base_command(client, args)
        names = {"master": args.master_name, "slave": args.slave_name}
        built = build_images(client, names=names, base=args.base, no_cache=args.no_cache)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for image in built:
        state = "up to date" if image.skipped else "built"
        print(f"{image.repository}:{image.tags[0]}\t{image.tags[1]}\t"
              f"{image.size / 1e6:.1f} MB\t{state}")
    return 0


def _base_command(client: docker.DockerClient, args: argparse.Namespace) -> int:
    if args.if_needed:
        ensure_base(client)
    elif args.force or not _image_id(client, args.tag):
        print(build_base_image(client, args.tag, mirror=args.mirror))
    else:
        print(f"{args.tag} exists; --force rebuilds it", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    build = sub.add_parser("build", help="build the role images (the default command)")
    base = sub.add_parser("base", help=f"make the offline base image ({OFFLINE_BASE})")
    for p in (parser, build):
        p.add_argument("--base", help=f"base image (default {DEFAULT_BASE}, else offline)")
        p.add_argument("--master-name", default="scheduler-master")
        p.add_argument("--slave-name", default="scheduler-slave")
        p.add_argument("--no-cache", action="store_true", help="rebuild even if up to date")
    base.add_argument("--tag", default=OFFLINE_BASE)
    base.add_argument("--mirror", help="Debian mirror URL (default: debootstrap's)")
    base.add_argument("--force", action="store_true", help="rebuild even if the tag exists")
    base.add_argument("--if-needed", action="store_true",
                      help="only when the default base cannot be pulled (bootstrap)")
    return parser


if __name__ == "__main__":
    sys.exit(main())

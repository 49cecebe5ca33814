"""The offline base's root file system, made by debootstrap: the one module that runs it.

``tarball()`` yields the root file system as a tar stream for the engine to import; errors
of debootstrap and tar become ImageError here.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .imagekit import ImageError

# What debootstrap leaves that an image does not need (package cache, docs, translations).
_SLIM_PATHS = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
               "usr/share/info", "usr/share/locale", "var/log")  # fmt: skip
# The image settings `docker import` adds to the root file system.
BASE_CHANGES = ("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8", 'CMD ["python3"]')  # fmt: skip


@contextlib.contextmanager
def tarball(subject: str, suite: str, mirror: str | None, out: IO[str]) -> Iterator[IO[bytes]]:
    """Debian ``suite`` minbase with python3, as a tar stream (numeric owners)."""
    with tempfile.TemporaryDirectory(prefix="scheduler-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        try:
            _run(["debootstrap", "--variant=minbase", "--include=python3", suite, str(rootfs),
                  *([mirror] if mirror else [])], subject, out)  # fmt: skip
            _slim(rootfs)
            with subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                                  stdout=subprocess.PIPE) as tar:  # fmt: skip
                assert tar.stdout is not None
                yield tar.stdout
        finally:
            _unmount_below(rootfs)


def _run(argv: list[str], subject: str, out: IO[str]) -> None:
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError as exc:
        raise ImageError(subject, f"{argv[0]} is not installed",
                         f"apt-get install {argv[0]} (make deps does)") from exc  # fmt: skip
    if proc.returncode:
        out.write(proc.stdout[-4000:])
        raise ImageError(subject, f"{argv[0]} exited with {proc.returncode}",
                         "see its output above; check the mirror, or pass --mirror")  # fmt: skip


def _slim(rootfs: Path) -> None:
    for rel in _SLIM_PATHS:
        subprocess.run(["find", str(rootfs / rel), "-mindepth", "1", "-not", "-name", "lock",
                        "-delete"], stderr=subprocess.DEVNULL, check=False)  # fmt: skip


def _unmount_below(rootfs: Path) -> None:
    """Lazily unmount whatever a failed debootstrap left mounted inside the root file system."""
    prefix = f"{rootfs}/"
    with open("/proc/self/mounts") as mounts:
        targets = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for target in sorted(targets, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)

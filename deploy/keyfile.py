"""The cluster's authkey: a redacted wrapper, and the 0600 key file beside the inventory."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

# the one redacted wrapper and the one length rule, shared with the scheduler
from scheduler.errors import ConfigError as SchedulerConfigError
from scheduler.settings import MIN_AUTHKEY, Secret, authkey_from

from .errors import DeployError

MIN_LENGTH = MIN_AUTHKEY  # the scheduler refuses shorter keys
ENV_VAR = "SCHEDULER_AUTHKEY"

__all__ = ["Secret", "generate", "read", "resolve", "write"]


def generate() -> Secret:
    return Secret(secrets.token_urlsafe(32))


def resolve(path: Path, environ: Mapping[str, str], create: bool) -> Secret:
    """The key from ``SCHEDULER_AUTHKEY``, else ``path``; made (0600) if absent and ``create``."""
    if environ.get(ENV_VAR, "").strip():
        return _checked(environ[ENV_VAR].strip(), ENV_VAR)
    if path.exists():
        return read(path)
    if not create:
        raise DeployError(
            f"authkey file {path}",
            "does not exist",
            f"run 'deployctl init' (or 'deployctl up') to create it, or set {ENV_VAR}",
        )
    key = generate()
    write(path, key)
    return key


def read(path: Path) -> Secret:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DeployError(
            f"authkey file {path}",
            f"is readable by others (mode {mode:o})",
            f"run 'chmod 600 {path}'",
        )
    return _checked(path.read_text(encoding="utf-8").strip(), f"authkey file {path}")


def write(path: Path, key: Secret) -> None:
    """Create ``path`` with mode 0600 from the start (no window where it is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key.reveal() + "\n")


def _checked(value: str, source: str) -> Secret:
    """The key, if the scheduler's own rule accepts it (the one rule, in scheduler.settings)."""
    try:
        authkey_from(value, source)
    except SchedulerConfigError as exc:
        raise DeployError("authkey", str(exc),
                          "use a long random key, e.g. the one 'deployctl init' makes") from exc
    return Secret(value)

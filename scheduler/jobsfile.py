"""The jobs file: one shell command per line, the one rule both CLIs read it by."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import SchedulerError


def parse(lines: Iterable[str]) -> list[str]:
    """Commands from a jobs file: each non-blank line that is not a ``#`` comment.

    A line is given whole to ``/bin/sh`` on the slave, so quoting, pipes and ``&&``
    mean what they mean in a shell.
    """
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def read(path: str) -> list[str]:
    """``parse`` the file at ``path``; a SchedulerError that says why it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return parse(fh)
    except OSError as exc:
        raise SchedulerError(f"cannot read jobs file {path}: {exc.strerror}") from exc

"""Submitting shell jobs to the master and listing jobs, through the master link."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler import jobsfile
from scheduler.errors import SchedulerError, UnknownJob
from scheduler.job import parse_array, parse_labels

from .context import Context
from .errors import DeployError, JobsFailed, MasterError

Progress = Callable[[int, int], None]  # (finished, total)
Command = str | list[str]  # a line for /bin/sh, or an argv


def read_commands(path: Path) -> list[str]:
    """The jobs file's commands, by the scheduler's one rule (``scheduler.jobsfile``): each
    non-blank, non-comment line, run whole by ``/bin/sh``."""
    try:
        commands = jobsfile.read(str(path))
    except SchedulerError as exc:
        raise DeployError(f"--file {path}", str(exc), "check the path") from exc
    if not commands:
        raise DeployError(f"--file {path}", "holds no command", "write one command a line")
    return commands


def parse_ids(text: str) -> list[int]:
    """``12,13`` -> [12, 13]; a DeployError saying what to write otherwise."""
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        ids = []
    if not ids or min(ids) < 1:
        raise DeployError("submit", f"--after takes job ids like 12,13, got {text!r}",
                          "see 'deployctl jobs' for ids")  # fmt: skip
    return ids


def parse_requires(text: str) -> dict[str, str]:
    """``gpu=1,zone=a`` -> the labels a worker must carry, by the scheduler's rule."""
    try:
        labels = parse_labels(text)
    except ValueError as exc:
        raise DeployError("submit", f"--requires: {exc}", "e.g. --requires gpu=1") from None
    if not labels:
        raise DeployError("submit", f"--requires names no label: {text!r}",
                          "e.g. --requires gpu=1,zone=a")  # fmt: skip
    return labels


@dataclass(frozen=True)
class Array:
    """``--array 1-1000%50``: one task per index, at most ``cap`` running at once."""

    indices: list[int]
    cap: int | None

    @classmethod
    def parse(cls, text: str) -> Array:
        try:
            return cls(*parse_array(text))
        except ValueError as exc:
            raise DeployError("submit", f"--array: {exc}", "e.g. --array 1-100%10") from None


@dataclass(frozen=True)
class JobOptions:
    """What every submitted job carries, as the scheduler's ``submit_shell`` takes it:
    ``retries`` and ``retry_backoff`` (a failed job runs again after a doubling wait),
    ``after`` (ids that must succeed first), ``priority`` (higher runs first) and
    ``requires`` (labels a worker must carry)."""

    retries: int | None = None
    retry_backoff: float | None = None
    after: Sequence[int] | None = None
    priority: int | None = None
    requires: dict[str, str] | None = None


def submit(
    ctx: Context, commands: Sequence[Command], wait: bool, progress: Progress | None = None,
    timeout: float | None = None, options: JobOptions | None = None, array: Array | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Submit ``commands`` (a string runs in /bin/sh, a list as argv), or with ``array`` the
    one command once per index (``{}`` in it replaced by the index); with ``wait``, follow
    them to the end and raise if any failed."""
    options = options or JobOptions()
    given: dict[str, Any] = {"retries": options.retries, "retry_backoff": options.retry_backoff,
                             "after": options.after, "priority": options.priority,
                             "requires": options.requires}  # fmt: skip
    with ctx.master.use(ctx.key(create=False)) as c:
        if array is not None:
            (cmd,) = commands
            handles = c.submit_array(cmd if isinstance(cmd, str) else list(cmd), array.indices,
                                     max_running=array.cap, shell=isinstance(cmd, str),
                                     **given)  # fmt: skip
        else:
            handles = [c.submit_shell(cmd if isinstance(cmd, str) else list(cmd),
                                      shell=isinstance(cmd, str), **given)
                       for cmd in commands]  # fmt: skip
        c.flush()
        ids = [h.id for h in handles]
        if not wait:
            return [{"id": i, "state": "queued"} for i in ids]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            finished = sum(1 for h in handles if h.ready())
            if progress:
                progress(finished, len(handles))
            if finished == len(handles):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise DeployError("submit", f"{len(handles) - finished} job(s) still running "
                                  f"after {timeout:g}s", "see 'deployctl jobs'")  # fmt: skip
            handles[next(i for i, h in enumerate(handles) if not h.ready())].wait(0.2)
        done = [c.job(i) for i in ids]
    failed = [j for j in done if j["state"] != "succeeded"]
    if failed:
        lines = "; ".join(f"job {j['id']} {j['state']}: {j.get('error') or ''}".rstrip(": ")
                          for j in failed[:10])  # fmt: skip
        raise JobsFailed("submit", f"{len(failed)} of {len(done)} job(s) did not succeed: {lines}",
                         "see 'deployctl jobs' and 'deployctl logs worker'")  # fmt: skip
    return done


def jobs(ctx: Context, state: str | None, array: int | None = None) -> list[dict[str, Any]]:
    """The newest jobs (an array as one entry), or with ``array`` that array's tasks."""
    with ctx.master.use(ctx.key(create=False)) as c:
        if array is None:
            return list(c.jobs(state=state))
        return list(c.jobs(state=state, limit=None, array=array))


def job(ctx: Context, job_id: int) -> dict[str, Any]:
    """One job as the master (or its journal) knows it."""
    try:
        with ctx.master.use(ctx.key(create=False)) as c:
            return dict(c.job(job_id))
    except MasterError as exc:
        if isinstance(exc.__cause__, UnknownJob):
            raise DeployError(f"job {job_id}", "no such job on the master",
                              "see 'deployctl jobs' for the ids") from exc  # fmt: skip
        raise

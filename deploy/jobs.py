"""Submitting shell jobs to the master and listing jobs, through the master link."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scheduler import jobsfile
from scheduler.errors import SchedulerError, UnknownJob

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


def submit(
    ctx: Context, commands: Sequence[Command], wait: bool, progress: Progress | None = None,
    timeout: float | None = None, retries: int | None = None,
    retry_backoff: float | None = None, after: Sequence[int] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Submit ``commands`` (a string runs in /bin/sh, a list as argv); with ``wait``, follow
    them to the end and raise if any failed. ``retries``, ``retry_backoff``: as the
    scheduler's (a failed job runs again, after a doubling wait)."""
    with ctx.master.use(ctx.key(create=False)) as c:
        handles = [c.submit_shell(cmd if isinstance(cmd, str) else list(cmd),
                                  shell=isinstance(cmd, str), retries=retries,
                                  retry_backoff=retry_backoff, after=after)
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


def jobs(ctx: Context, state: str | None) -> list[dict[str, Any]]:
    with ctx.master.use(ctx.key(create=False)) as c:
        return list(c.jobs(state=state))


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

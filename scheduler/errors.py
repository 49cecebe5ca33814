"""Errors raised by the scheduler; every one says what went wrong and what to do next."""

from __future__ import annotations


class SchedulerError(Exception):
    """Base class of every error the scheduler raises on purpose."""


class ConfigError(SchedulerError):
    """A setting is missing or malformed."""


class ConnectError(SchedulerError):
    """The master cannot be reached, or refused our key."""


class AuthError(ConnectError):
    """The master answered but the authkey does not match."""


class SubmitError(SchedulerError):
    """The master refused a job (bad kind, empty command, unpicklable callable...)."""


class UnknownJob(SchedulerError):
    """No job with that id."""


class UnknownWorker(SchedulerError):
    """A slave the master does not know (yet, or any more) asked for work; it must register."""


class JournalError(SchedulerError):
    """The journal cannot be used as it is (another format, unreadable)."""


class ShuttingDown(SchedulerError):
    """The master is stopping and takes no new work."""


class JobFailed(SchedulerError):
    """Raised by ``AsyncResult.get()`` when the job ended failed or cancelled."""

    def __init__(self, job_id: int, state: str, error: str | None, exit_code: int | None = None):
        self.job_id = job_id
        self.state = state
        self.error = error
        self.exit_code = exit_code
        super().__init__(job_id, state, error, exit_code)

    def __str__(self) -> str:
        detail = f": {self.error.strip()}" if self.error else ""
        return f"job {self.job_id} {self.state}{detail}"

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


class Forbidden(SchedulerError):
    """The caller's certificate does not allow this call (see scheduler.tls, roles)."""


class ShuttingDown(SchedulerError):
    """The master is stopping and takes no new work."""


class JobFailed(SchedulerError):
    """Raised by ``AsyncResult.get()`` when the job ended failed or cancelled without an
    exception of its own to raise: a non-zero exit, a timeout, a cancel, a lost slave, or
    an exception the client cannot rebuild (``exc_type`` names its type)."""

    def __init__(
        self,
        job_id: int,
        state: str,
        error: str | None,
        exit_code: int | None = None,
        exc_type: str | None = None,
    ):
        self.job_id = job_id
        self.state = state
        self.error = error
        self.exit_code = exit_code
        self.exc_type = exc_type
        super().__init__(job_id, state, error, exit_code, exc_type)

    def __str__(self) -> str:
        detail = f": {self.error.strip()}" if self.error else ""
        return f"job {self.job_id} {self.state}{detail}"


class RemoteTraceback(Exception):
    """The job's traceback on the slave, attached as the cause of its re-raised exception
    (as ``multiprocessing.pool`` does)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.text.rstrip()}\n\"\"\""

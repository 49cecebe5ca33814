"""The messages slaves and the master exchange, named in one place.

Calls are ``multiprocessing.managers`` method calls (see transport.EXPOSED); what they
carry beyond plain ints and strings is defined here. ``VERSION`` goes up whenever a
message changes shape, and a slave of another version is refused at ``register``.
"""

from __future__ import annotations

from typing import NamedTuple

VERSION = 2


class Lease(NamedTuple):
    """A job as handed to a slave. ``lease`` is unique across master restarts."""

    job_id: int
    lease: int
    kind: str
    payload: tuple
    timeout: float | None


class Outcome(NamedTuple):
    """What a slave reports for one lease."""

    job_id: int
    lease: int
    ok: bool
    result: bytes | None = None
    error: str | None = None
    exit_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    duration: float = 0.0


class Holding(NamedTuple):
    """What a slave has (its claims), sent with ``register`` and every ``heartbeat``.

    ``held``: every (job id, lease) it queues, runs, or has finished but not yet had
    acknowledged. ``waiting``: the job ids among them not started. ``fetched``: the
    sequence number of the last ``lease`` reply it took in, so the master can tell a
    reply still on its way from one that was lost.
    """

    held: tuple[tuple[int, int], ...] = ()
    waiting: tuple[int, ...] = ()
    fetched: int = 0
    draining: bool = False


class Reply(NamedTuple):
    """The master's answer to ``register`` and ``heartbeat``.

    ``drop``: (job id, lease) the slave must stop and never report (cancelled, or the
    lease went elsewhere). ``known``: False when the master does not know the slave
    (it restarted, or declared the slave dead): register again with what you hold.
    """

    known: bool = True
    drop: tuple[tuple[int, int], ...] = ()
    cancelled: tuple[int, ...] = ()
    give_back: int = 0
    exit: bool = False  # `scheduler verify` asked this slave to die as if killed


class Reported(NamedTuple):
    """The master's answer to ``report``: the outcomes are saved.

    ``give_back``: unstarted jobs to hand back for idle slaves. When the report also asked
    for work (a slot with nothing else to do), ``leases`` and ``funcs`` are that work, as
    ``lease`` returns it, and ``known`` is False if the master does not know the slave.
    """

    accepted: int
    rejected: int
    give_back: int = 0
    leases: tuple[Lease, ...] = ()
    funcs: dict[str, bytes] = {}  # never mutated
    known: bool = True


"""The messages between clients, the master and slaves, named in one place.

Calls are ``multiprocessing.managers`` method calls (see transport.EXPOSED); what they
carry beyond plain ints and strings is defined here, as named tuples: a field added is a
change here that mypy checks at both ends, and a field added with a default still reads
an older message. ``VERSION`` goes up whenever a message changes shape: the master
refuses a slave of another version at ``register``, and a client refuses a master of
another version at connect (``ping`` says it), each with one line.

Slaves import this module, never the master's board or job records.

The four messages that travel once per job (JobSpec, Lease, Outcome, Done) go over the
wire as plain tuples of their fields and are named again on arrival (``Lease._make(t)``):
pickle spends ten times longer on a named tuple than on a plain one, which was about 2.5 us
of the master's CPU per job. The master reads a plain Python call's spec by position
(``job.validate``), without naming it.
"""

from __future__ import annotations

import pickle
from multiprocessing import connection
from typing import Any, NamedTuple

VERSION = 5


# -- client <-> master ---------------------------------------------------------------


class JobSpec(NamedTuple):
    """A job as a client submits it. ``payload`` depends on ``kind``.

    shell:  ``(command, use_shell)`` or ``(command, use_shell, cwd, env)``: command is an argv
            list, or a string when use_shell; cwd a directory or None; env a dict of
            variables added to the slave's environment, or None.
    python: ``(func_digest, args_blob)``; the function bytes travel once per batch, by digest.

    ``retries``: how many times a failed run is tried again (None: the master's default),
    after ``retry_backoff`` seconds doubled each time, with jitter; apart from
    ``max_attempts``, which counts hand-outs whose slave died or went silent.
    ``after``: ids of jobs that must succeed first (if one fails or is cancelled, so is this).
    ``priority``: higher runs first (None: 0); FIFO within one priority.
    ``requires``: labels a slave must carry to run it (``{"gpu": "1"}``).
    ``array``: ``(index, cap)`` for a task of an array: every spec of one ``submit`` call
    with an ``array`` belongs to the same array (its id: the first such job's id); at
    most ``cap`` of its tasks run at once (0: no cap).
    """

    kind: str
    payload: tuple
    name: str = ""
    labels: dict[str, str] | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    retries: int | None = None
    retry_backoff: float | None = None
    after: tuple[int, ...] | None = None
    priority: int | None = None
    requires: dict[str, str] | None = None
    array: tuple[int, int] | None = None


class Submitted(NamedTuple):
    """The answer to ``submit``: ``number`` jobs are saved, with ids from ``first`` on."""

    first: int
    number: int


class Done(NamedTuple):
    """A finished job as ``collect`` returns it: ``result`` is the pickled return value
    (python), the stdout tail (shell), or the pickled exception (a failed python job)."""

    job_id: int
    state: str
    result: bytes | str | None
    error: str | None
    exit_code: int | None


# -- slave <-> master ------------------------------------------------------------------


class Lease(NamedTuple):
    """A job as handed to a slave. ``lease`` is unique across master restarts.
    ``priority``: the slave runs what it holds highest first."""

    job_id: int
    lease: int
    kind: str
    payload: tuple
    timeout: float | None
    priority: int = 0


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


class Leased(NamedTuple):
    """The answer to ``lease``: the work (Lease fields as plain tuples), and the bodies of
    the functions it calls."""

    leases: list[tuple]
    funcs: dict[str, bytes]


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
    yield_to: int | None = None  # hand back unstarted jobs of lower priority than this


class Reported(NamedTuple):
    """The master's answer to ``report``: the outcomes are saved.

    ``give_back``: unstarted jobs to hand back for idle slaves. When the report also asked
    for work (a slot with nothing else to do), ``leases`` and ``funcs`` are that work, as
    ``lease`` returns it, and ``known`` is False if the master does not know the slave.
    """

    accepted: int
    rejected: int
    give_back: int = 0
    leases: tuple[tuple, ...] = ()  # Lease fields as plain tuples
    funcs: dict[str, bytes] = {}  # never mutated
    known: bool = True
    yield_to: int | None = None  # as in Reply


class Registered(NamedTuple):
    """The answer to ``register``: the master's timing, and what to drop (a Reply)."""

    lease_seconds: float
    heartbeat_seconds: float
    reply: tuple  # a Reply, as a plain tuple


# -- the connections they travel on ---------------------------------------------------


class PlainConnection(connection.Connection):
    """``multiprocessing``'s connection, but ``send`` pickles with plain ``pickle``.

    The stdlib's builds a ForkingPickler (a pickler with a dispatch table of its own) for
    every message: 1.5 us for a small one against 0.3 us, on each of the ten or so messages
    of a job's path. Its extra reducers (sockets, connections, file descriptors) serve
    nothing these messages carry. Both unpickle with ``pickle.loads``, so either end may be
    either kind."""

    def send(self, obj: Any) -> None:
        self._check_closed()  # type: ignore[attr-defined]
        self._check_writable()  # type: ignore[attr-defined]
        self._send_bytes(pickle.dumps(obj))  # type: ignore[attr-defined]


def plain(conn: connection.Connection) -> PlainConnection:
    """``conn`` (a stdlib connection: a socket or a pipe), sending with plain pickle."""
    if type(conn) is not connection.Connection:  # a TLS one would write past its TLS
        raise TypeError(f"plain() takes a multiprocessing Connection, not {type(conn)!r}")
    conn.__class__ = PlainConnection  # the same object: only ``send`` differs
    return conn  # type: ignore[return-value]

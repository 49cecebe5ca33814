"""The master's service: the board behind a lock, published over the manager.

Every public method here is callable by clients and slaves (see transport.EXPOSED).
Slaves and clients long-poll: ``lease`` waits for work, ``collect`` waits for outcomes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import __version__
from .board import Board, Lease, Outcome
from .errors import SchedulerError, ShuttingDown, SubmitError
from .job import Job, State, validate
from .journal import Journal
from .progress import Progress

log = logging.getLogger(__name__)

MAX_WAIT = 30.0  # longest a long-poll may block, so dead peers' threads come back
SESSION_IDLE = 600.0  # outboxes nobody collected from for this long are dropped


def _outcome(job: Job) -> tuple:
    result = (job.stdout or "") if job.kind == "shell" else job.result
    return (job.id, str(job.state), result, job.error, job.exit_code)


class Service:
    def __init__(
        self,
        board: Board,
        journal: Journal,
        funcs: dict[str, bytes],
        progress: Progress,
        clock: Callable[[], float] = time.time,
        keep_finished: int = 100_000,
    ) -> None:
        self._keep = keep_finished
        self._board = board
        self._journal = journal
        self._funcs = funcs
        self._progress = progress
        self._clock = clock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._done = threading.Condition(self._lock)
        self._outboxes: dict[str, list[tuple]] = {}  # session -> outcomes not yet collected
        self._session_seen: dict[str, float] = {}
        self._closing = False
        self._started = clock()
        progress.baseline(board.counts)

    # -- clients -------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return {"version": __version__, "time": self._clock()}

    def submit(
        self, specs: list, funcs: dict[str, bytes] | None = None, session: str | None = None
    ) -> tuple[int, int]:
        """Queue jobs; returns (first id, count) once they are in the journal."""
        funcs = funcs or {}
        try:
            if not isinstance(specs, list) or not isinstance(funcs, dict):
                raise SubmitError("submit takes a list of job specs; use scheduler.Client")
            known = {**self._funcs, **funcs}
            checked = [validate(spec, known) for spec in specs]
        except SubmitError as exc:
            log.warning("submit refused: %s", exc)
            raise
        with self._lock:
            if self._closing:
                raise ShuttingDown("the master is shutting down; submit again once it is back")
            jobs = self._board.submit(checked)
            new_funcs = {d: b for d, b in funcs.items() if d not in self._funcs}
            self._funcs.update(new_funcs)
            if session is not None:
                self._touch_session(session)
                for job in jobs:
                    job.session = session
            ticket = self._journal.append(self._board.take_dirty(), new_funcs)
            self._work.notify_all()
        self._journal.wait(ticket)
        if not jobs:
            return (0, 0)
        log.debug("submitted %d jobs (%d..%d)", len(jobs), jobs[0].id, jobs[-1].id)
        return (jobs[0].id, len(jobs))

    def watch(self, session: str, ids: list[int]) -> int:
        """Route outcomes of ``ids`` to ``session``; already finished ones are ready at once."""
        with self._lock:
            box = self._touch_session(session)
            found = 0
            for job_id in ids:
                job = self._board.jobs.get(job_id) or self._journal.fetch(job_id)
                if job is None:
                    continue
                found += 1
                if job.state.terminal:
                    box.append(_outcome(job))
                elif job.session is None or job.session == session:
                    job.session = session
                else:  # several clients wait on it
                    others = job.session if isinstance(job.session, tuple) else (job.session,)
                    job.session = tuple({*others, session})
            if box:
                self._done.notify_all()
            return found

    def collect(self, session: str, timeout: float = 1.0) -> list[tuple] | None:
        """Outcomes finished for ``session`` since the last call; None if the session is unknown."""
        deadline = self._clock() + min(max(timeout, 0.0), MAX_WAIT)
        with self._lock:
            while True:
                box = self._outboxes.get(session)
                if box is None:
                    return None
                self._session_seen[session] = self._clock()
                if box:
                    self._outboxes[session] = []
                    return box
                remaining = deadline - self._clock()
                if remaining <= 0 or self._closing:
                    return []
                self._done.wait(remaining)

    def get(self, job_id: int, with_result: bool = False) -> dict[str, Any]:
        with self._lock:
            job = self._board.jobs.get(job_id)
            if job is not None:
                return job.info(with_result=with_result)
        old = self._journal.fetch(job_id)  # finished long ago: only on disk
        if old is None:
            self._board.get(job_id)  # raises UnknownJob with its message
        return old.info(with_result=with_result)  # type: ignore[union-attr]

    def jobs(self, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        try:
            wanted = State(state) if state else None
        except ValueError:
            raise SubmitError(f"unknown state {state!r}; use one of {', '.join(State)}") from None
        with self._lock:
            return [j.info() for j in self._board.select(wanted, limit)]

    def cancel(self, job_id: int) -> dict[str, Any]:
        if job_id not in self._board.jobs:
            return self.get(job_id)  # finished long ago, or unknown (raises)
        with self._lock:
            before = self._board.get(job_id).state
            job = self._board.cancel(job_id)
            if job.state is State.CANCELLED and before is not State.CANCELLED:
                self._route([job])
        if before is not job.state:
            log.info("job %s cancelled (was %s)", job.label, before)
        return job.info()

    def status(self) -> dict[str, Any]:
        with self._lock:
            status = self._board.status()
        status.update(version=__version__, uptime=self._clock() - self._started)
        return status

    # -- slaves --------------------------------------------------------------

    def register(self, worker: str, host: str = "", pid: int = 0, concurrency: int = 0) -> dict:
        with self._lock:
            record = self._board.register(worker)
            self._work.notify_all()
            record.host, record.pid, record.concurrency = host, pid, concurrency
            record.draining = False
        log.info("slave %s registered from %s (pid %s, %s processes)", worker, host, pid,
                 concurrency)  # fmt: skip
        lease = self._board.lease_seconds
        return {"lease_seconds": lease, "heartbeat_seconds": max(0.2, lease / 4)}

    def lease(self, worker: str, n: int, wait: float = 0.0) -> tuple[list[Lease], dict[str, bytes]]:
        """Hand out up to ``n`` jobs, waiting up to ``wait`` seconds for the first one."""
        deadline = self._clock() + min(max(wait, 0.0), MAX_WAIT)
        with self._lock:
            while True:
                jobs = [] if self._closing else self._board.lease(worker, max(0, int(n)))
                remaining = deadline - self._clock()
                draining = self._board.workers[worker].draining
                if jobs or remaining <= 0 or self._closing or draining:
                    break
                self._work.wait(remaining)
        self._progress.dispatched(jobs, worker)
        leases = [Lease(j.id, j.lease, j.kind, j.payload, j.timeout) for j in jobs]
        digests = {j.payload[0] for j in jobs if j.kind == "python"}
        return leases, {d: self._funcs[d] for d in digests}

    def report(self, worker: str, outcomes: Iterable[tuple]) -> tuple[int, int, int]:
        """Apply finished jobs; return (accepted, rejected, jobs to hand back for idle slaves)."""
        outs = [o if type(o) is Outcome else Outcome(*o) for o in outcomes]
        with self._lock:
            finished, rejected = self._board.complete(worker, outs)
            self._route(finished)
            give_back = self._board.give_back(worker)
        if rejected:
            log.warning("slave %s: %d outcome(s) rejected (lease given up or job cancelled)",
                        worker, rejected)  # fmt: skip
        self._progress.finished(finished, worker)
        return len(finished), rejected, give_back

    def release(self, worker: str, leases: list[tuple[int, int]]) -> int:
        with self._lock:
            back = self._board.release(worker, leases)
            if back:
                self._work.notify_all()
        if back:
            log.info("slave %s handed back %d job(s)", worker, len(back))
        return len(back)

    def heartbeat(
        self,
        worker: str,
        draining: bool = False,
        running: list[int] | None = None,
        waiting: list[int] | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            cancels = self._board.heartbeat(
                worker, draining=draining, running=running, waiting=waiting or ()
            )
            give_back = self._board.give_back(worker)
            self._work.notify_all()
        return {"cancel": cancels or [], "known": cancels is not None, "give_back": give_back}

    def goodbye(self, worker: str) -> None:
        with self._lock:
            self._board.forget(worker)
            self._work.notify_all()
        log.info("slave %s left", worker)

    # -- housekeeping (called by the master, not over the wire) ----------------

    def tick(self) -> None:
        """Expire lapsed leases, journal what changed, log progress, drop stale sessions."""
        with self._lock:
            changed = self._board.expire()
            if changed:
                self._route([j for j in changed if j.state.terminal])
                self._work.notify_all()
            self._journal.append(self._board.take_dirty())
            self._board.evict(self._keep)
            counts, total = dict(self._board.counts), self._board.total
            stale = self._clock() - SESSION_IDLE
            for session in [s for s, t in self._session_seen.items() if t < stale]:
                del self._session_seen[session], self._outboxes[session]
        if changed:
            self._progress.requeued(changed, "its slave stopped answering")
        self._progress.tick(counts, total)

    def close(self) -> None:
        """Refuse new work, wake every long-poll, write the last changes."""
        with self._lock:
            self._closing = True
            self._work.notify_all()
            self._done.notify_all()
            ticket = self._journal.append(self._board.take_dirty())
            counts, total = dict(self._board.counts), self._board.total
        self._journal.wait(ticket)
        self._progress.tick(counts, total, force=True)

    # -- internals -----------------------------------------------------------

    def _touch_session(self, session: str) -> list[tuple]:
        self._session_seen[session] = self._clock()
        return self._outboxes.setdefault(session, [])

    def _route(self, jobs: Iterable[Job]) -> None:
        woke = False
        outboxes = self._outboxes
        for job in jobs:
            session = job.session
            if session is None:
                continue
            job.session = None
            for one in session if isinstance(session, tuple) else (session,):
                box = outboxes.get(one)
                if box is not None:
                    box.append(_outcome(job))
                    woke = True
        if woke:
            self._done.notify_all()


__all__ = ["Service", "SchedulerError"]

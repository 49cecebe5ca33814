"""The master's service: the board behind a lock, published over the manager.

Every public method here is callable by clients and slaves (see transport.EXPOSED).
Slaves and clients long-poll: ``lease`` waits for work, ``collect`` waits for outcomes.
A waiting poll holds no thread: it is parked here, and the call that brings its work or
outcome answers it (transport.answer_later), so a job crosses no thread of the master.

Durability: ``submit`` returns once its jobs are in the journal (no slave sees them
before); an outcome is acknowledged to its slave, and passed on to clients, once it is
in the journal; a cancel returns once it is saved.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from . import __version__, protocol
from .board import Board, Holding, Outcome, Reply
from .errors import (
    Forbidden,
    JournalError,
    SchedulerError,
    ShuttingDown,
    SubmitError,
    UnknownWorker,
)
from .job import AFTER, ARRAY, MAX_ARRAY, Job, State, validate
from .journal import LEASE_BLOCK, Journal, Pruned, safe_text
from .metrics import NoMetrics
from .progress import Progress
from .settings import format_duration
from .transport import DEFERRED, answer_later

log = logging.getLogger(__name__)

MAX_WAIT = 30.0  # longest a long-poll may wait (the tick ends those whose time is up)
SESSION_IDLE = 600.0  # outboxes nobody collected from for this long are dropped
PAGE = 1000  # most jobs one `jobs` call returns
REFILL = 20_000  # cold queued jobs read back from the journal at a time (see Board.refill)
RETAIN_EVERY = 300.0  # most seconds between background pruning passes (less for a short RETAIN)
RETAIN_AFTER = 1_000  # with RETAIN_COUNT: a pass once max(this, half of it) more jobs finished
RETAIN_GAP = 1.0  # ... but at most one a second


def _outcome(job: Job) -> tuple:
    """protocol.Done's fields, as a plain tuple (see protocol: per-job messages)."""
    result = (job.stdout or "") if job.kind == "shell" else job.result
    return (job.id, str(job.state), result, job.error, job.exit_code)


_OUTCOME_FIELDS = len(Outcome._fields)


def _named(out: tuple) -> Outcome:
    """An outcome as it came (a plain tuple, see protocol), named; a short one (of a
    slave that leaves trailing defaults out) too."""
    if type(out) is Outcome:
        return out
    return Outcome._make(out) if len(out) == _OUTCOME_FIELDS else Outcome(*out)


def _clean(out: Outcome) -> Outcome:
    """An outcome whose texts the journal can store (non-UTF-8 output, file names)."""
    error, stdout, stderr = out.error, out.stdout, out.stderr
    if (error is None or error.isascii()) and (stdout is None or stdout.isascii()) and (
        stderr is None or stderr.isascii()
    ):
        return out
    return out._replace(error=safe_text(out.error), stdout=safe_text(out.stdout),
                        stderr=safe_text(out.stderr))  # fmt: skip


class _Inline:
    """The answer to a long-poll made in-process (tests, the master itself): the caller
    waits for it, as a remote caller waits for its reply."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self.value: Any = None
        self.error: Exception | None = None

    def __call__(self, value: Any) -> None:
        self.value = value
        self._ready.set()

    def fail(self, exc: Exception) -> None:
        self.error = exc
        self._ready.set()

    def wait(self, timeout: float | None) -> bool:
        return self._ready.wait(timeout)

    def result(self) -> Any:
        self._ready.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _Poll:
    """A long-poll parked in the master: a slave's ``lease`` (``key``: its name, ``n`` and
    ``seq`` as it asked) or a client's ``collect`` (``key``: its session). ``finish`` sends
    what settles it (leases, or None for a slave the master forgot; outcomes)."""

    __slots__ = ("key", "n", "seq", "deadline", "finish")

    def __init__(self, key: str, deadline: float, finish: Callable[[Any], None],
                 n: int = 0, seq: int | None = None) -> None:  # fmt: skip
        self.key, self.deadline, self.finish, self.n, self.seq = key, deadline, finish, n, seq


class Service:
    def __init__(
        self,
        board: Board,
        journal: Journal,
        funcs: dict[str, bytes],
        progress: Progress,
        clock: Callable[[], float] = time.time,
        keep_finished: int = 100_000,
        heartbeat_seconds: float | None = None,
        crash: Callable[[], None] | None = None,
        metrics: NoMetrics | None = None,
    ) -> None:
        self._metrics = metrics or NoMetrics()  # counted where things happen; see metrics.py
        self._crash = crash  # what `verify` calls to crash and restart this master
        self._keep = keep_finished
        self._board = board
        self._journal = journal
        self._funcs = funcs  # bodies of the functions that unfinished jobs call
        self._progress = progress
        self._clock = clock
        self._heartbeat = heartbeat_seconds or max(0.2, board.lease_seconds / 3)
        self._lock = threading.Lock()
        # Long-polls wait here, not in threads: whoever brings work (submit, a requeue, a
        # tick) or an outcome (report) settles them under the lock, and sends the answers
        # once it let go of the lock (_flush): the job crosses no thread of the master.
        self._leasing: dict[str, _Poll] = {}  # slave -> its lease (one at a time), oldest first
        self._collecting: dict[str, _Poll] = {}  # session -> its collect
        self._outgoing: deque[Callable[[], None]] = deque()  # answers to send, in order
        self._outboxes: dict[str, list[tuple]] = {}  # session -> not yet collected
        self._session_seen: dict[str, float] = {}
        self._closing = False
        self._started = clock()
        self._saved_marks: list[tuple[int, int]] = []  # (ticket, board.finished_total)
        self._doomed: set[str] = set()  # slaves `verify` asked to die
        self._reserving: tuple[int, int] | None = None  # (journal ticket, lease ceiling)
        self._retain: tuple[float | None, int | None] = (None, None)  # (age, count) rules
        self._pruning = threading.Lock()  # one pass at a time, background or asked for
        self._prune_due = threading.Event()
        self._retainer: threading.Thread | None = None
        self._next_prune = 0.0  # clock time of the next background pass
        self._last_prune = 0.0  # clock time the last one was started
        self._pruned_at = 0  # board.finished_total when the last one started
        progress.baseline(board.counts)

    # -- clients -------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return {"version": __version__, "protocol": protocol.VERSION, "time": self._clock()}

    def refuse(self, why: str) -> None:
        """What the transport calls instead of a call the caller's role may not make."""
        raise Forbidden(why)

    def submit(
        self, specs: list, funcs: dict[str, bytes] | None = None, session: str | None = None
    ) -> protocol.Submitted:
        """Queue jobs; returns (first id, count) once they are in the journal."""
        funcs = funcs or {}
        try:
            if not isinstance(specs, list) or not isinstance(funcs, dict):
                raise SubmitError("submit takes a list of job specs; use scheduler.Client")
            checked = [validate(spec, self._funcs, funcs) for spec in specs]
            _check_array(checked)
            deps = {d for spec in checked if spec[AFTER] for d in spec[AFTER]}
            saved = {i: State(s) for i, s in self._journal.states(deps).items()} if deps else {}
        except SubmitError as exc:
            log.warning("submit refused: %s", exc)
            raise
        with self._lock:
            if self._closing:
                raise ShuttingDown("the master is shutting down; submit again once it is back")
            self._refuse_if_journal_fails()
            if deps:
                known = {**saved, **{d: self._board.jobs[d].state for d in deps
                                     if d in self._board.jobs}}  # fmt: skip
                unknown = sorted(deps - set(known))
                if unknown:
                    log.warning("submit refused: after names unknown job(s) %s", unknown[:5])
                    raise SubmitError(f"no job {unknown[0]} (in after); list jobs with "
                                      "'scheduler jobs', or leave it out")  # fmt: skip
            jobs = self._board.submit(checked, publish=False)
            new_funcs = {d: b for d, b in funcs.items() if d not in self._funcs}
            self._funcs.update(new_funcs)
            if session is not None:
                self._touch_session(session)
                for job in jobs:
                    job.session = session
            if deps:
                for job, spec in zip(jobs, checked, strict=True):
                    if spec[AFTER]:
                        self._board.depend(job, spec[AFTER], known)
            ticket = self._journal.append(self._board.take_dirty(), new_funcs, wake=False)
        try:
            self._journal.wait(ticket, give_up=True)
        except JournalError as exc:
            if self._journal.abandon(ticket):
                with self._lock:
                    self._board.unsubmit(jobs)
                    self._purge_funcs()
                log.error("submit of %d job(s) refused: %s", len(jobs), exc)
                raise SubmitError(
                    f"{exc}; nothing was queued: free space in the master's state directory "
                    "(SCHEDULER_STATE_DIR) and submit again"
                ) from None
        with self._lock:
            self._board.publish(jobs)
            self._serve_leases()
            gone = self._cascaded()
        self._flush()
        self._metrics.submitted(len(jobs))
        self._metrics.finished(gone, ran=False)
        if not jobs:
            return protocol.Submitted(0, 0)
        log.debug("submitted %d jobs (%d..%d)", len(jobs), jobs[0].id, jobs[-1].id)
        return protocol.Submitted(jobs[0].id, len(jobs))

    def _refuse_if_journal_fails(self) -> None:
        why = self._journal.failing
        if why is not None:
            raise SubmitError(
                f"the journal cannot write ({why}); nothing was queued: free space in the "
                "master's state directory (SCHEDULER_STATE_DIR) and submit again"
            )

    def watch(self, session: str, ids: list[int]) -> int:
        """Route outcomes of ``ids`` to ``session``; already finished ones are ready at once."""
        with self._lock:
            box = self._touch_session(session)
            found = 0
            for job_id in ids:
                self._warm((job_id,))  # waiting in the journal: keep its record to route
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
                self._serve_collect(session)
        self._flush()
        return found

    def collect(self, session: str, timeout: float = 1.0) -> list[tuple] | None:
        """Outcomes finished for ``session`` since the last call; None if the session is unknown."""
        wait = _bounded(timeout)
        answer = answer_later() or _Inline()
        with self._lock:
            box = self._outboxes.get(session)
            if box is None:
                return None
            now = self._clock()
            self._session_seen[session] = now
            if box or wait <= 0 or self._closing:
                self._outboxes[session] = []
                return box
            old = self._collecting.pop(session, None)  # a client asks once at a time
            if old is not None:
                self._answer(old, [])
            poll = self._collecting[session] = _Poll(session, now + wait, answer)
        self._flush()
        return self._answered(answer, poll, wait)

    def get(self, job_id: int, with_result: bool = False) -> dict[str, Any]:
        with self._lock:
            job = self._board.jobs.get(job_id)
            if job is not None:
                return self._explained(job.info(with_result=with_result))
        old = self._journal.fetch(job_id)  # finished long ago, or queued cold: only on disk
        if old is None:
            self._board.get(job_id)  # raises UnknownJob with its message
        info = old.info(with_result=with_result)  # type: ignore[union-attr]
        with self._lock:
            return self._explained(info)

    def _explained(self, info: dict[str, Any]) -> dict[str, Any]:
        """A queued job's view says why it waits (``reason``); under the lock."""
        if info["state"] == State.QUEUED:
            info["reason"] = self._board.why_pending(info["id"])
        return info

    def jobs(
        self, state: str | None = None, limit: int | None = None, before: int | None = None,
        array: int | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs newest first, ids below ``before``, at most ``limit`` (and PAGE); finished
        jobs that left memory come from the journal. An array's tasks are one entry (its
        id the array's, ``tasks`` and ``counts`` by state), unless ``array`` asks for that
        array's tasks."""
        try:
            wanted = State(state) if state else None
        except ValueError:
            raise SubmitError(f"unknown state {state!r}; use one of {', '.join(State)}") from None
        page = PAGE if limit is None else max(0, min(int(limit), PAGE))
        if array is not None:  # every task is in the journal; memory has the latest state
            listed: list[dict[str, Any]] = []
            while len(listed) < page and (rows := self._journal.select(None, page, before, array)):
                with self._lock:
                    infos = [(self._board.jobs.get(r.id) or r).info() for r in rows]
                    listed += [self._explained(i) for i in infos
                               if wanted is None or i["state"] == wanted]  # fmt: skip
                before = rows[-1].id
            return listed[:page]
        with self._lock:
            found = {j.id: j.info() for j in self._board.select(wanted, page, before)}
        if wanted is None or wanted.terminal or (wanted is State.QUEUED and self._board.cold):
            older = self._journal.select(state, 2 * page, before)
            with self._lock:
                found.update((j.id, j.info()) for j in older
                             if j.id not in found and j.id not in self._board.jobs)  # fmt: skip
        listed = [found[i] for i in sorted(found, reverse=True)[:page]]
        if array is None and any(info["array"] is not None for info in listed):
            listed = self._arrays_collapsed(listed)
        if any(info["state"] == State.QUEUED for info in listed):
            with self._lock:
                for info in listed:
                    self._explained(info)
        return listed

    def _arrays_collapsed(self, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``listed`` with each array's tasks replaced by one entry: the first task's view
        with the array's id, ``tasks``, ``counts`` by state, and an overall state."""
        out: list[dict[str, Any]] = []
        first: dict[int, dict[str, Any]] = {}  # array -> its earliest task listed
        for info in reversed(listed):
            first.setdefault(info["array"], info)
        for info in listed:
            array = info["array"]
            if array is None:
                out.append(info)
                continue
            if array not in first:
                continue
            info = first.pop(array)
            states = self._journal.array_states(array)
            with self._lock:
                for task_id in states:
                    if (job := self._board.jobs.get(task_id)) is not None:
                        states[task_id] = str(job.state)
            counts = Counter(states.values())
            order = (State.RUNNING, State.QUEUED, State.FAILED, State.CANCELLED)
            overall = next((s for s in order if counts[s]), State.SUCCEEDED)
            out.append({
                **info, "id": array, "state": str(overall),
                "array_index": None, "tasks": len(states), "counts": dict(counts),
                "worker": None, "result": None, "error": None, "exit_code": None,
                "reason": None,
            })  # fmt: skip
        return out

    def cancel(self, job_id: int) -> dict[str, Any]:
        with self._lock:
            self._warm((job_id,))
            if job_id not in self._board.jobs:
                job = None
            else:
                before = self._board.get(job_id).state
                job = self._board.cancel(job_id)
                if job.array is not None:
                    self._serve_leases()  # a task set aside at the array's cap may go
                followers, self._board.cascaded = self._board.cascaded, []
                ticket = self._journal.append(self._board.take_dirty(), wake=False)
        self._flush()
        if job is None:
            return self.get(job_id)  # finished long ago, or unknown (raises)
        self._journal.wait(ticket)
        if job.state is State.CANCELLED and before is not State.CANCELLED:
            with self._lock:
                self._route([job, *followers])
            self._flush()
            self._metrics.finished([job, *followers], ran=False)
            after = f"; so were {len(followers)} job(s) after it" if followers else ""
            log.info("job %s cancelled (was %s)%s", job.label, before, after)
        return job.info()

    def status(self) -> dict[str, Any]:
        with self._lock:
            status = self._board.status()
        status.update(
            version=__version__, uptime=self._clock() - self._started,
            lease_seconds=self._board.lease_seconds, heartbeat_seconds=self._heartbeat,
            journal_error=self._journal.failing,
        )  # fmt: skip
        return status

    def recent(self, state: State, limit: int) -> list[dict[str, Any]]:
        """The newest jobs in ``state`` that memory holds (the journal is not read)."""
        with self._lock:
            return [j.info() for j in self._board.select(state, limit)]

    def snapshot(self) -> dict[str, Any]:
        """The numbers behind the gauges, read under the lock without walking any job."""
        connected = draining = slots = busy = held = 0
        with self._lock:
            counts = {str(k): v for k, v in self._board.counts.items()}
            in_memory = len(self._board.jobs)
            for w in self._board.workers.values():
                held += len(w.held)
                if w.registered:
                    connected += 1
                    draining += w.draining
                    slots += w.concurrency
                    busy += len(w.held) - len(w.waiting.intersection(w.held))
        return {
            "counts": counts, "queued": counts["queued"], "in_memory": in_memory,
            "connected": connected, "draining": draining, "slots": slots, "busy": busy,
            "held": held, "journal_failing": int(self._journal.failing is not None),
        }  # fmt: skip

    # -- slaves --------------------------------------------------------------

    def register(
        self,
        worker: str,
        host: str = "",
        pid: int = 0,
        concurrency: int = 0,
        holding: tuple = (),
        version: int = 1,
        labels: dict[str, str] | None = None,
    ) -> protocol.Registered:
        """A slave joins, or comes back with the jobs it holds (after a master restart)."""
        if version != protocol.VERSION:
            raise SchedulerError(
                f"slave {worker} speaks protocol {version}, this master {protocol.VERSION}; "
                "run the same scheduler version on master and slaves"
            )
        holding = Holding(*holding)
        with self._lock:
            self._warm(j for j, _ in holding.held)
            held = self._held(worker)
            record, reply = self._board.register(worker, holding, labels)
            lost = self._requeued(held)
            record.host, record.pid, record.concurrency = host, pid, concurrency
            # the roster is saved before the slave gets work: after a crash, a restarted
            # master must know every slave that may run a job the journal never saw
            roster, self._board.roster = self._board.roster, []
            ticket = self._journal.append(self._board.take_dirty(), roster=roster, wake=False)
            self._end_lease_of(worker)  # of a process of this name that is gone
            self._serve_leases()
            kept = len(record.held)
        self._flush()
        self._journal.wait(ticket)
        log.info("slave %s registered from %s (pid %s, %s processes%s)", worker, host, pid,
                 concurrency, f"; kept its {kept} running job(s)" if kept else "")  # fmt: skip
        self._metrics.requeued(lost, "lost_in_transit")
        self._log_drops(worker, reply)
        return protocol.Registered(self._board.lease_seconds, self._heartbeat, tuple(reply))

    def lease(
        self, worker: str, n: int, wait: float = 0.0, seq: int | None = None
    ) -> protocol.Leased:
        """Hand out up to ``n`` jobs, waiting up to ``wait`` seconds for the first one."""
        answer = answer_later() or _Inline()

        def finish(leased: protocol.Leased | None) -> None:
            if leased is None:
                answer.fail(UnknownWorker(worker))
            else:
                answer(leased)

        return self._lease(worker, n, wait, seq, answer, finish)

    def _lease(
        self, worker: str, n: int, wait: float, seq: int | None, answer: Any,
        finish: Callable[[protocol.Leased | None], None],
    ) -> Any:
        """``lease``, answered through ``finish``: now, or once work comes or ``wait`` ends
        (parked: returns DEFERRED over the wire; in-process the caller waits here)."""
        n, wait = max(0, int(n)), _bounded(wait)
        with self._lock:
            now = self._clock()
            self._end_lease_of(worker)  # a slave asks once at a time: that connection is lost
            poll = _Poll(worker, now + wait, finish, n, seq)
            if not self._settle_lease(poll, now):
                self._leasing[worker] = poll
        self._flush()
        return self._answered(answer, poll, wait)

    def _settle_lease(self, poll: _Poll, now: float) -> bool:
        """Give a parked (or new) lease what it may have now; True if that settles it (jobs,
        its time is up, the slave drains or is unknown, the master stops). Under the lock;
        the answer goes out with _flush."""
        worker = poll.key
        record = self._board.workers.get(worker)
        if record is None or not record.registered:  # gone, or expected back: unknown now
            self._answer(poll, None)
            return True
        if (room := self._board.lease_room()) is not None and room < LEASE_BLOCK // 2:
            self._reserve_leases()
        jobs = [] if self._closing else self._board.lease(worker, poll.n, poll.seq)
        if not (jobs or now >= poll.deadline or self._closing or record.draining):
            return False
        digests = {j.payload[0] for j in jobs if j.kind == "python"}
        funcs = {d: self._funcs.get(d) or self._journal.func(d) or b"" for d in digests}
        # protocol.Lease's fields, as plain tuples (see protocol: per-job messages)
        leases = [(j.id, j.lease, j.kind, j.payload, j.timeout, j.priority) for j in jobs]
        self._outgoing.append(functools.partial(self._dispatch, jobs, worker, poll.finish,
                                                protocol.Leased(leases, funcs)))  # fmt: skip
        return True

    def _dispatch(self, jobs: list[Job], worker: str, finish: Callable[[Any], None],
                  leased: protocol.Leased) -> None:  # fmt: skip
        try:
            self._progress.dispatched(jobs, worker)
        finally:
            finish(leased)

    def _serve_leases(self) -> None:
        """Hand what is in line to the parked leases, oldest first, while anything is in
        line (a submit costs one poll, not one per idle slave). Under the lock (then _flush)."""
        if not self._leasing:
            return
        now = self._clock()
        for key, poll in list(self._leasing.items()):
            if not self._board.in_line():
                return
            if self._settled(poll, now):
                del self._leasing[key]

    def _serve_lease_of(self, worker: str) -> None:
        """Settle ``worker``'s parked lease if its own state says so now (it drains, or the
        board forgot it), besides any work. Under the lock (then _flush)."""
        poll = self._leasing.get(worker)
        if poll is not None and self._settled(poll, self._clock()):
            del self._leasing[worker]

    def _settled(self, poll: _Poll, now: float) -> bool:
        """_settle_lease for a poll parked by another call: a failure there (the journal
        unreadable for a function body) ends that poll empty, never the call serving it."""
        try:
            return self._settle_lease(poll, now)
        except Exception:
            log.exception("handing work to slave %s failed; it will ask again", poll.key)
            self._answer(poll, protocol.Leased([], {}))
            return True

    def _serve_collect(self, session: str) -> None:
        """Answer ``session``'s parked collect with its outbox, if it has one parked."""
        poll = self._collecting.pop(session, None)
        if poll is not None:
            box = self._outboxes.get(session)  # None: the session was dropped (as collect)
            if box:
                self._outboxes[session] = []
            self._answer(poll, box)

    def _expire_polls(self) -> None:
        """Answer the long-polls whose time is up (empty), or all when closing, and the
        leases of slaves that drain or were forgotten (a silent one, at expiry). Under the
        lock; from the tick."""
        now = self._clock()
        for session, poll in list(self._collecting.items()):
            if now >= poll.deadline or self._closing:
                del self._collecting[session]
                self._answer(poll, [])
        workers = self._board.workers
        for key, poll in list(self._leasing.items()):
            record = workers.get(key)
            due = (now >= poll.deadline or self._closing or record is None
                   or not record.registered or record.draining)  # fmt: skip
            if due and self._settled(poll, now):
                del self._leasing[key]

    def _answer(self, poll: _Poll, value: Any) -> None:
        """Settle ``poll`` with ``value``: sent by the next _flush. Under the lock."""
        self._outgoing.append(functools.partial(poll.finish, value))

    def _end_lease_of(self, worker: str) -> None:
        """End ``worker``'s parked lease, if any, empty: a slave asks once at a time, so a
        new call (or a new process of that name) means its connection is gone."""
        old = self._leasing.pop(worker, None)
        if old is not None:
            self._answer(old, protocol.Leased([], {}))

    def _flush(self) -> None:
        """Send the answers settled under the lock; never under it (a peer that does not
        read must not stall the master)."""
        out = self._outgoing
        while out:
            try:
                send = out.popleft()
            except IndexError:
                return
            try:
                send()
            except Exception:  # a bug in one answer must not keep the others
                log.exception("answering a long-poll failed")

    def _answered(self, answer: Any, poll: _Poll, wait: float) -> Any:
        """What a long-poll call returns: DEFERRED over the wire; in-process, its answer,
        after waiting for it here (at most ``wait``, then it is settled as it stands)."""
        if not isinstance(answer, _Inline):
            return DEFERRED
        if not answer.wait(wait):
            with self._lock:
                now = max(self._clock(), poll.deadline)
                if self._collecting.get(poll.key) is poll:
                    self._serve_collect(poll.key)
                elif self._leasing.get(poll.key) is poll:
                    del self._leasing[poll.key]
                    poll.deadline = now
                    self._settle_lease(poll, now)
            self._flush()
        return answer.result()

    def _reserve_leases(self) -> None:
        """Reserve the next block of lease numbers in the journal, half a block ahead.

        Never waits under the lock: the board hands out numbers only up to the ceiling
        the journal has saved (``tick`` raises it once the write is in).
        """
        if self._reserving is None:
            ceiling = (self._board.lease_ceiling or 0) + LEASE_BLOCK
            self._reserving = (self._journal.append([], meta={"lease_ceiling": ceiling}), ceiling)

    def report(
        self, worker: str, outcomes: Iterable[tuple], lease: tuple | None = None
    ) -> protocol.Reported:
        """Apply finished jobs; the reply (protocol.Reported) says they are saved.

        Clients hear of them at once; the slave's reply waits until they are in the
        journal, and the slave keeps them until then: if the master dies before saving,
        the slave reports them again to the next one, so what a client saw is what stays.

        ``lease``: (n, wait, seq) as ``lease`` takes them: a slot with nothing else to do
        asks for its next work in the same call (one round trip, and the long-poll starts
        while the journal writes).
        """
        outs = [_clean(_named(o)) for o in outcomes]
        with self._lock:
            self._warm(o.job_id for o in outs)
            finished, rejected = self._board.complete(worker, outs)
            retried, self._board.retried = self._board.retried, []
            released, self._board.released = self._board.released, []
            followers = self._cascaded()  # cancelled: a job they come after failed
            ticket = self._journal.append(self._board.take_dirty(), wake=False)
            give_back = self._board.give_back(worker)
            yield_to = self._board.yield_to(worker)
            if finished:
                self._route(finished)
            if any(j.array is not None for j in (*finished, *retried)):
                self._serve_leases()  # a task set aside at its array's cap may go now
            retries = [(j.label, j.failures, j.retries, j.not_before) for j in retried]
        for label, n, of, at in retries:
            log.warning("job %s failed on %s; retry %d of %d in %.1fs", label, worker, n, of,
                        (at or 0) - self._clock())  # fmt: skip
        self._metrics.requeued(len(retries), "retry")
        if rejected:
            log.warning("slave %s: %d outcome(s) rejected (lease given up or job cancelled)",
                        worker, rejected)  # fmt: skip
            self._metrics.rejected(rejected)
        self._progress.finished(finished, worker)
        self._metrics.finished(finished)
        self._metrics.finished(followers, ran=False)
        self._flush()  # the clients' outcomes, before the journal is waited for
        self._journal.wait(ticket)  # before a long-poll: the journal is free for the next submit
        if retried or released or (finished and self._leasing):
            with self._lock:
                if retried or released:  # their failures are saved: the retries may go in line
                    self._board.schedule([*retried, *released])
                if finished:  # their dependents, now that their ends are saved
                    self._serve_leases()
            self._flush()
        done = len(finished)
        if lease is None:
            return protocol.Reported(done, rejected, give_back, yield_to=yield_to)
        answer = answer_later() or _Inline()

        def finish(leased: protocol.Leased | None) -> None:
            leases, funcs = leased if leased is not None else ([], {})
            answer(protocol.Reported(done, rejected, give_back, tuple(leases), funcs,
                                     leased is not None, yield_to))  # fmt: skip

        n, wait, seq = (*lease, None)[:3]  # (n, wait) from a slave that leaves seq out
        return self._lease(worker, n, wait, seq, answer, finish)

    def release(self, worker: str, leases: list[tuple[int, int]]) -> int:
        with self._lock:
            back = self._board.release(worker, leases)
            if back:
                self._serve_leases()
            record = self._board.workers.get(worker)
            why = "drain" if record is not None and record.draining else "handed_back"
        self._flush()
        if back:
            log.info("slave %s handed back %d job(s)", worker, len(back))
            self._metrics.requeued(len(back), why)
        return len(back)

    def heartbeat(self, worker: str, holding: tuple = ()) -> tuple:
        """Keep the slave's leases; reconcile its claims; see protocol.Reply."""
        holding = Holding(*holding)
        with self._lock:
            self._warm(j for j, _ in holding.held)
            held = self._held(worker)
            reply = self._board.heartbeat(worker, holding)
            lost = self._requeued(held)
            if reply.known:
                reply = reply._replace(
                    give_back=self._board.give_back(worker), exit=worker in self._doomed,
                    yield_to=self._board.yield_to(worker),
                )
            self._serve_leases()  # jobs it no longer holds are back in line
            self._serve_lease_of(worker)  # it drains, or is unknown
        self._flush()
        self._metrics.requeued(lost, "lost_in_transit")
        self._log_drops(worker, reply)
        return tuple(reply)

    def goodbye(self, worker: str) -> None:
        with self._lock:
            back = self._board.forget(worker)
            self._serve_leases()
            self._serve_lease_of(worker)  # unknown now
        self._flush()
        self._metrics.requeued(len(back), "slave_left")
        log.info("slave %s left%s", worker, f"; {len(back)} job(s) back in the queue" if back
                 else "")  # fmt: skip

    # -- `scheduler verify` ----------------------------------------------------

    def mark(self, run: str, item: int, worker: str) -> None:
        """A verify job records that it runs; returns once saved."""
        with self._lock:
            ticket = self._journal.append([], marks=[(str(run), int(item), str(worker),
                                                      self._clock())], wake=False)  # fmt: skip
        self._journal.wait(ticket)

    def marks(self, run: str) -> list[tuple[int, str, float]]:
        return self._journal.marks(str(run))

    def chaos(self, action: str, target: str = "") -> None:
        """``verify``'s faults: ``kill-slave NAME`` (it exits as if killed at its next
        heartbeat), ``crash-master`` (this process replaces itself without a clean stop,
        as after kill -9 and an immediate restart)."""
        if action == "kill-slave":
            log.warning("verify: telling slave %s to die as if killed", target)
            with self._lock:
                self._doomed.add(target)
        elif action == "crash-master" and self._crash is not None:
            log.warning("verify: crashing the master and starting it again")
            threading.Thread(target=self._crash, name="crash", daemon=True).start()
        else:
            raise SchedulerError(f"unknown chaos action {action!r}")

    # -- housekeeping (called by the master, not over the wire) ----------------

    def tick(self) -> None:
        """Expire silent slaves, journal what changed, log progress, drop stale sessions."""
        with self._lock:
            self._board.release_due()  # backoffs that ended: the jobs go first in line
            changed = self._board.expire()
            back = [j.label for j in changed if j.state is State.QUEUED]
            gone = [j for j in changed if j.state.terminal]
            gone += self._board.cascaded  # cancelled: a job they come after failed
            self._board.cascaded = []
            roster, self._board.roster = self._board.roster, []
            ticket = self._journal.append(self._board.take_dirty(started=True), roster=roster)
            self._saved_marks.append((ticket, self._board.finished_total))
            if self._reserving and self._journal.saved(self._reserving[0]):
                self._board.lease_ceiling, self._reserving = self._reserving[1], None
            # whatever came in line since (released backoffs, expired slaves' jobs, a
            # restart's hold ended, room under a raised lease ceiling, retries whose
            # backoff passed while they were saved): to the parked slaves
            self._serve_leases()
            self._expire_polls()
            self._evict()
            counts, total = dict(self._board.counts), self._board.total
            finished = self._board.finished_total
            stale = self._clock() - SESSION_IDLE
            for session in [s for s, t in self._session_seen.items() if t < stale]:
                del self._session_seen[session], self._outboxes[session]
            if len(self._funcs) > 64:
                self._purge_funcs()
        self._flush()
        if back:
            self._progress.requeued(back, "its slave stopped answering")
            self._metrics.requeued(len(back), "slave_death")
        if gone:
            self._journal.wait(ticket)
            with self._lock:
                self._route(gone)
            self._flush()
            self._progress.finished(gone)
            self._metrics.finished(gone, ran=False)
        self._refill()
        self._progress.tick(counts, total)
        self._retention_due(finished)

    def _evict(self) -> None:
        """Drop finished jobs beyond the window from memory once the journal has them."""
        saved = 0
        while self._saved_marks and self._journal.saved(self._saved_marks[0][0]):
            saved = self._saved_marks.pop(0)[1]
        if saved:
            self._board.evict(self._keep, saved)

    def _purge_funcs(self) -> None:
        """Forget function bodies no unfinished job calls (the journal keeps them)."""
        refs = self._board.func_refs
        gone = [d for d in self._funcs if refs.get(d, 0) <= 0]
        for digest in gone:
            del self._funcs[digest]
            refs.pop(digest, None)

    def close(self) -> None:
        """Refuse new work, wake every long-poll, stop pruning, write the last changes."""
        with self._lock:
            self._closing = True
            self._expire_polls()
            ticket = self._journal.append(self._board.take_dirty(started=True))
            counts, total = dict(self._board.counts), self._board.total
        self._flush()
        self._prune_due.set()
        if self._retainer is not None:
            self._retainer.join(timeout=10.0)  # a pass stops at its next chunk
        self._journal.wait(ticket, timeout=10.0)
        self._progress.tick(counts, total, force=True)

    # -- retention -------------------------------------------------------------

    def prune(self, older_than: float | None = None, keep: int | None = None) -> dict[str, Any]:
        """Delete finished jobs from the journal now: those that ended more than
        ``older_than`` seconds ago, and those beyond the newest ``keep`` finished ones
        (both None: the master's SCHEDULER_RETAIN and SCHEDULER_RETAIN_COUNT); then the
        function bodies and verify marks they leave unused (see Journal.prune)."""
        if older_than is not None and not (
            type(older_than) in (int, float) and 0 <= older_than < float("inf")
        ):
            raise SchedulerError(f"older_than must be a number of seconds >= 0, got {older_than!r}")
        if keep is not None and not (type(keep) is int and keep >= 0):
            raise SchedulerError(f"keep must be a whole number >= 0, got {keep!r}")
        if older_than is None and keep is None:
            older_than, keep = self._retain
        pruned = self._prune(older_than, keep)
        return {
            "jobs": pruned.jobs, "funcs": pruned.funcs, "marks": pruned.marks,
            "freed_bytes": pruned.freed, "journal_bytes": pruned.size,
            "older_than": older_than, "keep": keep, "rules": _rules(older_than, keep),
        }  # fmt: skip

    def start_retention(self, older_than: float | None, keep: int | None) -> None:
        """Prune in a thread of its own with these rules (SCHEDULER_RETAIN, _COUNT): every
        RETAIN_EVERY seconds (a tenth of ``older_than`` if less, at least RETAIN_GAP), and
        once ``max(RETAIN_AFTER, keep // 2)`` jobs finished since the last pass."""
        self._retain = (older_than, keep)
        if (older_than is None and keep is None) or self._retainer is not None:
            return
        self._next_prune = self._clock()  # a first pass at once: the journal may be old
        self._retainer = threading.Thread(target=self._retain_loop, name="retention",
                                          daemon=True)  # fmt: skip
        self._retainer.start()

    def _retention_due(self, finished: int) -> None:
        """From ``tick``: wake the retention thread if a pass is due (never prunes here)."""
        if self._retainer is None or self._prune_due.is_set() or self._pruning.locked():
            return
        older_than, keep = self._retain
        now = self._clock()
        many = keep is not None and finished - self._pruned_at >= max(RETAIN_AFTER, keep // 2)
        if now >= self._next_prune or (many and now >= self._last_prune + RETAIN_GAP):
            every = RETAIN_EVERY if older_than is None else min(RETAIN_EVERY, older_than / 10)
            self._next_prune = now + max(RETAIN_GAP, every)
            self._last_prune, self._pruned_at = now, finished
            self._prune_due.set()

    def _retain_loop(self) -> None:
        while True:
            self._prune_due.wait()
            self._prune_due.clear()
            if self._closing:
                return
            try:
                self._prune(*self._retain)
            except JournalError as exc:
                if not self._closing:
                    log.warning("retention: pass stopped, next one later: %s", exc)
            except Exception:  # a bug must not end retention for the master's lifetime
                log.exception("retention: pass failed; next one later")

    def _prune(self, older_than: float | None, keep: int | None) -> Pruned:
        """One pass; never under the service lock (the disk is touched)."""
        with self._pruning:
            started = time.monotonic()
            pruned = self._journal.prune(self._clock(), older_than, keep,
                                         held_funcs=self._held_funcs,
                                         stop=lambda: self._closing)  # fmt: skip
            took = time.monotonic() - started
        if pruned.jobs or pruned.funcs or pruned.marks:
            log.info(
                "retention: %d job(s) left the journal (%s), %d function body(ies), "
                "%d verify mark(s); %.1f MB of it free for reuse, journal %.1f MB; "
                "%.1fs, each deletion held the writer at most %.0f ms",
                pruned.jobs, _rules(older_than, keep), pruned.funcs, pruned.marks,
                pruned.freed / 1e6, pruned.size / 1e6, took, pruned.held * 1e3,
            )  # fmt: skip
        return pruned

    def _held_funcs(self, digests: list[str]) -> set[str]:
        """Of these bodies, those the master holds: a job calling one may be accepted
        without it, so the journal must keep it (it re-saves any it does not hold)."""
        with self._lock:
            return {d for d in digests if d in self._funcs}

    # -- internals -----------------------------------------------------------

    def _touch_session(self, session: str) -> list[tuple]:
        self._session_seen[session] = self._clock()
        return self._outboxes.setdefault(session, [])

    def _warm(self, job_ids: Iterable[int]) -> None:
        """Read back the records of jobs waiting cold in the journal, to watch or cancel
        one, or because a slave claims or reports one (handed out just before a crash, see
        Board.owns: it must be in memory to be adopted). Under the lock."""
        if not self._board.cold:
            return
        for job_id in job_ids:
            if job_id not in self._board.jobs and self._board.is_cold(job_id):
                job = self._journal.fetch(job_id)
                if job is not None:
                    self._board.warm(job)

    def _refill(self) -> None:
        """Read the next cold queued jobs back from the journal, outside the lock."""
        with self._lock:
            span = self._board.cold_span()
        if span is None:
            return
        first, last, priority = span
        rows = self._journal.queued_between(first, last, REFILL, priority)
        complete_to = rows[-1].id if len(rows) == REFILL else last
        with self._lock:
            if self._board.refill(first, complete_to, rows, priority):
                self._serve_leases()
        self._flush()

    def _cascaded(self) -> list[Job]:
        """Jobs cancelled since the board was last asked because a job they come after
        failed or was cancelled; routed to their clients. Under the lock."""
        gone, self._board.cascaded = self._board.cascaded, []
        if gone:
            self._route(gone)
            for job in gone[:5]:
                log.info("job %s cancelled: %s", job.label, job.error)
        return gone

    def _held(self, worker: str) -> list[int]:
        record = self._board.workers.get(worker)
        return list(record.held) if record is not None else []

    def _requeued(self, held: list[int]) -> int:
        """How many of the jobs a slave held are back in the queue (lost in transit)."""
        jobs = self._board.jobs
        return sum(1 for i in held if (j := jobs.get(i)) is not None and j.state is State.QUEUED)

    def _log_drops(self, worker: str, reply: Reply) -> None:
        stale = len(reply.drop) - len(reply.cancelled)
        if stale:
            log.info("slave %s told to drop %d run(s) whose lease went elsewhere", worker, stale)

    def _route(self, jobs: Iterable[Job]) -> None:
        """Outcomes to the outboxes of the clients waiting for them; a parked collect of
        one is answered (by _flush). Under the lock."""
        ready = set()
        outboxes, collecting = self._outboxes, self._collecting
        for job in jobs:
            session = job.session
            if session is None:
                continue
            job.session = None
            for one in session if isinstance(session, tuple) else (session,):
                box = outboxes.get(one)
                if box is not None:
                    box.append(_outcome(job))
                    if one in collecting:
                        ready.add(one)
        for one in ready:
            self._serve_collect(one)


def _bounded(wait: float) -> float:
    """A long-poll's wait in seconds, from 0 to MAX_WAIT (NaN, from a broken peer: MAX_WAIT)."""
    return min(max(float(wait), 0.0), MAX_WAIT) if wait == wait else MAX_WAIT


def _check_array(specs: list[tuple[Any, ...]]) -> None:
    """The tasks of one submit call's array agree on their cap, and are not too many."""
    tasks = [spec[ARRAY] for spec in specs if spec[ARRAY] is not None]
    if not tasks:
        return
    if len(tasks) > MAX_ARRAY:
        raise SubmitError(f"an array has at most {MAX_ARRAY:,} tasks, got {len(tasks):,}; "
                          "split it into several arrays")  # fmt: skip
    if len({cap for _, cap in tasks}) > 1:
        raise SubmitError("the tasks of one array must share one cap (max_running); "
                          "submit with scheduler.Client.submit_array")  # fmt: skip


def _rules(older_than: float | None, keep: int | None) -> str:
    rules = [] if older_than is None else [f"ended over {format_duration(older_than)} ago"]
    rules += [] if keep is None else [f"beyond the newest {keep} finished"]
    return " or ".join(rules)


__all__ = ["Service", "SchedulerError"]

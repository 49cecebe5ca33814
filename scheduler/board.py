"""The master's board: the pure state machine of queue, leases, liveness and cancels.

No I/O, no threads, no sleeping: the clock is injected, callers hold the lock.

The rules it enforces:

* A job is handed out under a *lease*, a number never used twice, even across master
  restarts (the master reserves ranges in the journal before using them; leases below
  ``first_lease`` were handed out by an earlier master).
* A lease ends only when its job finishes, when its slave hands it back, or when its
  slave is declared dead: silent for ``lease_seconds``. Never because of the job's age:
  a slave that is heard from keeps every job it holds, however long they run.
* A slave says what it holds (its *claims*) when it registers and with every heartbeat.
  The master keeps a claim it can verify (the current lease; or a job still queued whose
  lease the claimant got from an earlier master, or before it was declared dead: the run
  is adopted, not repeated) and tells the slave to drop any other. A job the master
  thinks a slave holds, handed out in a reply the slave says it took in, but that the
  slave does not claim, was lost in transit and goes back to the queue.
* An outcome is applied only from the slave that holds the job's lease, once.
* At most ``queue_window`` queued jobs are kept in memory as records; the others wait
  *cold*, in the journal only, as id ranges in submission order (one range per priority
  and client session), and are read back in chunks (``cold_span``/``refill``) as the
  queue in memory drains. A million queued jobs cost the master a few ranges, not a
  million records. Jobs of a higher priority than those in memory are read back at once,
  up to a window of them (memory then holds up to two windows); array tasks waiting at
  their array's cap are kept too.
* Jobs go out highest priority first, first come first served within one, each only to a
  slave with the labels it requires, and never more of an array at once than its cap.
* After a master restart, running jobs stay running: their slaves get ``lease_seconds``
  (and a reconnect allowance) to come back and claim them. And no job is handed out
  until the slaves the journal knew have registered again (or, for one that does not,
  RECONNECT_SECONDS plus ``lease_seconds`` passed: it counts as dead then):
  a job the journal still has as queued may be running on one of them under a lease
  handed out in the last moments before the crash, and must be adopted, not repeated.
"""

from __future__ import annotations

import functools
import heapq
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import UnknownJob, UnknownWorker
from .job import DEFAULT_BACKOFF, Job, State
from .protocol import Holding, Lease, Outcome, Reply

QUEUE_WINDOW = 100_000  # queued job records kept in memory; the rest wait in the journal
STEAL_SECONDS = 0.2  # less queued work than this is not worth a round trip to move
RETRY_CAP = 3600.0  # the longest wait before a retry, whatever the doubling says
HISTORY_ERROR = 2000  # characters of a retried run's error kept in the job's history
RECONNECT_SECONDS = 5.0  # after a master restart, how long slaves get to come back

NOTHING = Holding()  # a slave that holds no job
MAIN = (0, None)  # the line of jobs with priority 0 that require no label

__all__ = ["Board", "Holding", "Journaled", "Lease", "Outcome", "Reply", "Worker"]


class Journaled(NamedTuple):
    """What the journal holds beyond the jobs loaded into memory."""

    total: int
    counts: dict[str, int]
    max_id: int
    max_lease: int
    slaves: tuple[str, ...] = ()  # registered when the journal was last written
    # queued jobs left in the journal: (first id, last id, priority), highest priority first
    cold: tuple[tuple[int, int, int], ...] = ()
    dep_states: dict[int, str] = {}  # states of the jobs that loaded ones come after


@dataclass(slots=True)
class Worker:
    """A slave as the master sees it."""

    name: str
    last_seen: float
    host: str = ""
    pid: int = 0
    concurrency: int = 0
    draining: bool = False
    registered: bool = True  # False: ran jobs before a master restart, not back yet
    avg_seconds: float = 0.0  # moving average of its jobs' run times
    held: dict[int, int] = field(default_factory=dict)  # job id -> lease
    batch: dict[int, int] = field(default_factory=dict)  # job id -> the lease call's seq
    waiting: set[int] = field(default_factory=set)  # held but not started, at the last heartbeat
    last_seq: int = -1  # the last lease call, to answer a retried one with the same jobs
    last_handed: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # SCHEDULER_WORKER_LABELS

    def can_run(self, requires: dict[str, str] | None) -> bool:
        """Whether this slave carries every label the job requires."""
        return not requires or all(self.labels.get(k) == v for k, v in requires.items())

    def let_go(self, job_id: int) -> None:
        """The job is no longer this worker's (finished, handed back, moved, lost)."""
        self.held.pop(job_id, None)
        self.batch.pop(job_id, None)

    def view(self) -> dict:
        return {
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "concurrency": self.concurrency,
            "draining": self.draining,
            "connected": self.registered,
            "running": sorted(j for j in self.held if j not in self.waiting),
            "waiting": sorted(j for j in self.held if j in self.waiting),  # prefetched
            "last_heartbeat": self.last_seen,
            "labels": dict(self.labels),
        }


def _reported(job: Job, name: str, lease: int) -> bool:
    """The job finished on this very run (not cancelled: a cancelled run must stop), or
    this run failed and is being tried again: its outcome is in, and the slave keeps it
    until told it is saved (dropped before, a crash would lose the failure)."""
    if job.state in (State.SUCCEEDED, State.FAILED) and job.lease == lease:
        return job.worker == name
    last = job.history[-1] if job.history else None
    return last is not None and last["lease"] == lease and last["worker"] == name


class Board:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = 6.0,
        max_attempts: int = 3,
        first_lease: int = 1,
        lease_ceiling: int | None = None,
        queue_window: int = QUEUE_WINDOW,
        retries: int = 0,
        retry_backoff: float = DEFAULT_BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.jobs: dict[int, Job] = {}
        self.workers: dict[str, Worker] = {}
        self.counts: Counter[str] = Counter({s: 0 for s in State})
        self.dirty: set[int] = set()  # jobs changed since the journal last saw them
        # jobs handed out since the last periodic write: saved then if still running (a
        # short job's finished row says all). A crash before that looks, in the journal,
        # like a lease handed out just before it: the job is adopted from its slave.
        self.started: set[int] = set()
        self.hungry: set[str] = set()  # workers that asked for work and found none
        self.total = 0  # jobs ever submitted, in memory or only in the journal
        self.first_lease = first_lease  # leases below were handed out by an earlier master
        self.lease_ceiling = lease_ceiling  # the highest lease reserved in the journal
        self.finished_total = 0  # jobs that ever reached a final state here (a position)
        self.func_refs: Counter[str] = Counter()  # function digest -> unfinished jobs calling it
        self._finished: deque[int] = deque()  # finished job ids, oldest first
        self._evicted_total = 0  # how many of finished_total left memory
        # queued jobs in line, one line per (priority, required labels); most jobs are in
        # the first, ``_queue`` (priority 0, no requirement), the one the fast path reads
        self._queue: deque[int] = deque()
        self._lines: dict[tuple[int, tuple | None], deque[int]] = {MAIN: self._queue}
        self._running_in: Counter[int] = Counter()  # array id -> its tasks running
        # array id -> tasks set aside at its cap: a heap of ids (the earliest goes on first)
        self._capped: dict[int, list[int]] = {}
        self._set_aside = 0  # how many jobs _capped holds (stale ones included)
        self.queue_window = queue_window
        self.retries = retries  # the default of jobs that do not say
        self.retry_backoff = retry_backoff
        self._rng = rng or random.Random()  # the jitter of retry delays
        self._delayed: list[tuple[float, int]] = []  # (not before, job id): backing off
        self.retried: list[Job] = []  # failed runs put back since the service last looked
        # retries that also waited for other jobs, done meanwhile: for schedule() once saved
        self.released: list[Job] = []
        # dependencies: a job waits, queued but not in line, until every job it comes
        # after succeeded; if one fails or is cancelled, it is cancelled too (and so on)
        self._waiting_on: dict[int, set[int]] = {}  # job -> the jobs it still waits for
        self._dependents: dict[int, list[int]] = {}  # job -> the jobs waiting for it
        self.cascaded: list[Job] = []  # cancelled by a dependency since the service looked
        # cold queued jobs: [first id, last id, session, counted in func_refs, priority],
        # in submission order within a priority
        self.cold: deque[list] = deque()
        self._ranked = False  # a job with a priority other than 0 was seen
        self._cold_tail: dict[int, list] = {}  # priority -> its last cold range (if any)
        self._warmed: set[int] = set()  # cold jobs loaded early (watched, cancelled)
        self.awaited: set[str] = set()  # slaves to come back before anything is handed out
        self.hold_until = 0.0
        self.roster: list[tuple[str, bool]] = []  # (slave, registered) for the journal
        self._next_id = 1
        self._next_lease = first_lease

    # -- loading -------------------------------------------------------------

    def restore(self, jobs: Iterable[Job], stored: Journaled | None = None) -> int:
        """Load jobs from the journal; return how many are running on slaves to come back.

        Running jobs stay running: the master went away, not the slaves. Each slave that
        ran some gets a placeholder that expires like a silent slave, after
        ``lease_seconds`` plus RECONNECT_SECONDS, unless it registers and claims them.
        ``stored`` describes the whole journal when only part of it was loaded.
        """
        jobs = sorted(jobs, key=lambda j: j.id)
        if stored is None:
            last = jobs[-1].id if jobs else 0
            stored = Journaled(len(jobs), dict(Counter(str(j.state) for j in jobs)), last,
                               max((j.lease for j in jobs), default=0))  # fmt: skip
        self._next_id = stored.max_id + 1
        self.first_lease = self._next_lease = max(self.first_lease, stored.max_lease + 1)
        self.total = stored.total
        for state, n in stored.counts.items():
            self.counts[State(state)] += n
        running, back_by, waiting = 0, self.clock() + RECONNECT_SECONDS, []
        self.awaited = set(stored.slaves)
        self.hold_until = back_by + self.lease_seconds
        ready = []  # queued jobs that go in line (or cold) once all are in
        for job in jobs:
            self.jobs[job.id] = job
            if job.kind == "python" and not job.state.terminal:
                self.func_refs[job.payload[0]] += 1
            if job.state is State.RUNNING and job.array is not None:
                self._running_in[job.array] += 1
            if job.state is State.RUNNING and job.worker:
                worker = self.workers.get(job.worker)
                if worker is None:
                    worker = self.workers[job.worker] = Worker(
                        job.worker, last_seen=back_by, registered=False
                    )
                    self.awaited.add(job.worker)
                worker.held[job.id] = job.lease
                worker.batch[job.id] = 0
                running += 1
                if job.after:  # what it comes after may be unfinished here: see _requeue
                    waiting.append(job)
            elif job.state is State.RUNNING:  # no slave on record: nobody can claim it
                self._requeue(job, counted=False)
            elif job.state is State.QUEUED and job.after:
                waiting.append(job)  # in line once what it comes after succeeded
            elif job.state is State.QUEUED and job.not_before is not None:
                heapq.heappush(self._delayed, (job.not_before, job.id))  # backing off
            elif job.state is State.QUEUED:
                ready.append(job)
            elif job.state.terminal:
                self._finished.append(job.id)
                self.finished_total += 1
        ready.sort(key=lambda j: (-j.priority, j.id))  # the order they go in line
        chilled = set()
        for job in ready:
            if job.priority in self._cold_tail or self.in_line() >= self.queue_window:
                chilled.add(job.id)
                del self.jobs[job.id]
                if job.kind == "python":
                    self.func_refs[job.payload[0]] -= 1
                self._chill(job.id, None, counted=False, priority=job.priority)
            else:
                self._line(job).append(job.id)
        for first, last, priority in stored.cold:
            self._chill(first, None, counted=False, last=last, priority=priority)
        # what they come after: here, or in the journal (gone from it: it had succeeded,
        # since a failure would have cancelled them then)
        known = {i: State(s) for i, s in stored.dep_states.items()}
        for job in waiting:
            after = job.after or ()
            self.depend(job, after, {
                d: State.QUEUED if d in chilled else known.get(d, State.SUCCEEDED)
                for d in after
            })  # fmt: skip
            if job.state is State.QUEUED and job.id not in self._waiting_on:
                self._enter_line(job)
        return running

    # -- the lines -------------------------------------------------------------

    def _line(self, job: Job) -> deque[int]:
        """The line a queued job waits in: one per (priority, labels it requires)."""
        if not job.priority and job.requires is None:
            return self._queue
        self._ranked = self._ranked or job.priority != 0
        key = (job.priority, tuple(sorted(job.requires.items())) if job.requires else None)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = deque()
        return line

    def _enter_line(self, job: Job) -> None:
        """A job that waited for others goes in line (or, backing off after a failed run,
        in line when its wait ends)."""
        if job.not_before is not None:
            heapq.heappush(self._delayed, (job.not_before, job.id))
        else:
            self._line(job).append(job.id)

    def in_line(self) -> int:
        """Queued jobs kept in memory and not waiting for others (some may be stale)."""
        if len(self._lines) == 1:
            return len(self._queue) + self._set_aside
        return sum(map(len, self._lines.values())) + self._set_aside

    def _order_for(self, worker: Worker) -> list[tuple[int, list[deque[int]]]]:
        """The lines ``worker`` may take from, grouped by priority, highest first."""
        groups: dict[int, list[deque[int]]] = {}
        for (priority, requires), line in self._lines.items():
            if line and (requires is None or worker.can_run(dict(requires))):
                groups.setdefault(priority, []).append(line)
        return [(p, groups[p]) for p in sorted(groups, reverse=True)]

    @staticmethod
    def _pop(order: list[tuple[int, list[deque[int]]]]) -> int:
        """The next job id from the first group with one (earliest submitted within a
        group: by id); IndexError when there is none."""
        for _, group in order:
            best = None
            for line in group:
                if line and (best is None or line[0] < best[0]):
                    best = line
            if best is not None:
                return best.popleft()
        raise IndexError("no job in line")

    def _in_line_from(self, priority: int) -> int:
        """Queued jobs in line in memory that go before cold ones of ``priority`` (array
        tasks set aside at their cap do not: others may run meanwhile)."""
        return sum(len(line) for (p, _), line in self._lines.items() if p >= priority)

    def _at_cap(self, job: Job) -> bool:
        return job.array is not None and 0 < job.array_cap <= self._running_in[job.array]

    def _capped_out(self, job: Job) -> bool:
        """Whether ``job``'s array has its cap of tasks running: then it is set aside
        (in order) until one of them ends."""
        if not self._at_cap(job):
            return False
        heapq.heappush(self._capped.setdefault(job.array, []), job.id)  # type: ignore[arg-type]
        self._set_aside += 1
        return True

    def _left_running(self, job: Job) -> None:
        """An array task stopped running: the next task set aside at the cap goes in line."""
        array = job.array
        if array is None:
            return
        self._running_in[array] -= 1
        if self._running_in[array] <= 0:
            del self._running_in[array]
        self._let_next(array)

    def _let_next(self, array: int) -> None:
        """The earliest task of ``array`` set aside at its cap goes back in line (the next
        lease sets it aside again if the cap is still reached)."""
        aside = self._capped.get(array)
        while aside:
            job_id = heapq.heappop(aside)
            self._set_aside -= 1
            task = self.jobs.get(job_id)
            if task is not None and task.state is State.QUEUED:
                self._line(task).appendleft(job_id)
                break
        if aside is not None and not aside:
            del self._capped[array]

    # -- the cold queue --------------------------------------------------------

    def _chill(
        self, first: int, session: object, counted: bool, last: int | None = None,
        priority: int = 0,
    ) -> None:
        # the last range of this priority grows, though other priorities' ids lie between
        # (they are read back by priority); a new session starts a new range
        last = first if last is None else last
        tail = self._cold_tail.get(priority)
        if tail is not None and tail[2] == session and tail[3] == counted:
            tail[1] = last
        else:
            tail = self._cold_tail[priority] = [first, last, session, counted, priority]
            self.cold.append(tail)

    def cold_span(self) -> tuple[int, int, int] | None:
        """(first id, last id, priority) of the next cold range to read back: the earliest
        of the highest priority, once fewer than half a window of jobs in memory go before
        it (lower priorities in memory do not count: the refill may then take memory up
        to two windows)."""
        if not self.cold:
            return None
        head = max(self.cold, key=lambda c: c[4])  # the first of the highest
        if self._in_line_from(head[4]) >= self.queue_window // 2:
            return None
        return head[0], head[1], head[4]

    def refill(self, first: int, last: int, rows: list[Job], priority: int = 0) -> int:
        """Take back the cold jobs ``first``..``last`` of ``priority`` (read from the
        journal: ``rows``, its queued jobs of that priority in that span, in id order,
        maybe fewer than the span holds). Up to the last row, or the whole span when
        ``rows`` are all it holds, leaves the cold queue. Returns how many jobs were queued
        in memory."""
        head = next((c for c in self.cold if c[0] == first and c[4] == priority), None)
        if head is None:
            return 0  # the cold queue changed meanwhile; the next tick reads again
        upto = min(head[1], last)
        # room for a window of jobs of this priority or higher: those of lower priority
        # in memory do not take it (memory then holds up to two windows)
        room = self.queue_window - self._in_line_from(priority)
        queued = 0
        for row in rows:
            if row.id > upto:
                break
            if queued >= room:
                upto = row.id - 1
                break
            job = self.jobs.get(row.id)
            if row.id in self._warmed:  # loaded early: it is that record that counts
                self._warmed.discard(row.id)
                if job is None or job.state is not State.QUEUED:
                    continue
            elif job is not None:  # in memory already (restored running, ...)
                continue
            else:
                job = row
                job.session = head[2]  # type: ignore[assignment]
                self.jobs[job.id] = job
                if not head[3] and job.kind == "python":
                    self.func_refs[job.payload[0]] += 1
            if job.not_before is not None:  # backing off after a failure
                heapq.heappush(self._delayed, (job.not_before, job.id))
                continue
            self._line(job).append(job.id)
            queued += 1
        else:
            upto = min(head[1], last)
        for i in [i for i in self._warmed if first <= i <= upto]:  # not queued any more
            if (j := self.jobs.get(i)) is None or j.priority == priority:
                self._warmed.discard(i)
        if upto >= head[1]:
            self.cold.remove(head)
            if self._cold_tail.get(priority) is head:  # (read back in order: the last)
                rest = [c for c in self.cold if c[4] == priority]
                if rest:
                    self._cold_tail[priority] = rest[-1]
                else:
                    del self._cold_tail[priority]
        else:
            head[0] = upto + 1
        return queued

    def is_cold(self, job_id: int) -> bool:
        if job_id in self.jobs:  # (ranges of other priorities may span its id)
            return job_id in self._warmed
        return any(first <= job_id <= last for first, last, *_ in self.cold)

    def warm(self, job: Job) -> Job:
        """Keep a cold job's record in memory (to watch or cancel it); it keeps its place."""
        span = next((c for c in self.cold if c[0] <= job.id <= c[1] and c[4] == job.priority),
                    None)  # fmt: skip
        if span is None:  # not cold after all (another priority's range spans its id)
            return self.jobs.get(job.id, job)
        if job.id in self.jobs:
            return self.jobs[job.id]
        if job.state.terminal:  # finished (and evicted) since: it stays in the journal
            return job
        job.session = span[2]
        self.jobs[job.id] = job
        if not span[3] and job.kind == "python" and not job.state.terminal:
            self.func_refs[job.payload[0]] += 1
        self._warmed.add(job.id)
        return job

    # -- clients -------------------------------------------------------------

    def submit(self, specs: list[tuple[Any, ...]], publish: bool = True) -> list[Job]:
        """Create queued jobs from specs as job.validate returns them (JobSpec's fields, in
        order). With ``publish=False`` no slave gets them until ``publish``."""
        now, first, default_attempts = self.clock(), self._next_id, self.max_attempts
        retries, backoff = self.retries, self.retry_backoff
        new = [
            # positional: this loop runs for every job submitted
            Job(
                i,
                kind,
                payload,
                name,
                labels or None,
                timeout,
                attempts or default_attempts,
                State.QUEUED,
                0,
                None,
                0,
                now,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                retries if tries is None else tries,
                backoff if wait is None else wait,
                0,
                None,
                None,
                after,
                priority or 0,
                requires,
            )  # fmt: skip
            for i, (kind, payload, name, labels, timeout, attempts, tries, wait, after,
                    priority, requires, _)
            in enumerate(specs, first)
        ]
        self._next_id = first + len(new)
        ids = [j.id for j in new]  # one int object per job, shared by every index of it
        if any(spec[11] is not None for spec in specs):  # an array: its id is its first job's
            tasks = [(j, spec[11]) for j, spec in zip(new, specs, strict=True) if spec[11]]
            for job, (index, cap) in tasks:
                job.array, job.array_index, job.array_cap = tasks[0][0].id, index, cap
        self.jobs.update(zip(ids, new, strict=True))
        self.func_refs.update(j.payload[0] for j in new if j.kind == "python")
        if publish:
            for job in new:
                self._line(job).append(job.id)
        self.dirty.update(ids)
        self.counts[State.QUEUED] += len(new)
        self.total += len(new)
        return new

    def depend(self, job: Job, after: Iterable[int], known: dict[int, State]) -> None:
        """``job`` runs after the jobs ``after`` succeed (their states now: ``known``, the
        board's own records first). One that failed or was cancelled already cancels it."""
        jobs, unmet = self.jobs, set()
        for dep in after:
            state = jobs[dep].state if dep in jobs else known[dep]
            if state in (State.FAILED, State.CANCELLED):
                self._drop_run(job)
                self._finish(job, State.CANCELLED, error=f"job {dep} it comes after {state}")
                self.cascaded.append(job)
                self._cascade(job)
                return
            if state is not State.SUCCEEDED:
                unmet.add(dep)
        if unmet:
            self._waiting_on[job.id] = unmet
            for dep in unmet:
                self._dependents.setdefault(dep, []).append(job.id)

    def waits_for(self, job_id: int) -> set[int]:
        """The jobs ``job_id`` still waits for (empty: none)."""
        return self._waiting_on.get(job_id, set())

    def _cascade(self, done: Job) -> None:
        """``done`` reached a final state: its dependents go in line, or are cancelled."""
        todo = [done]
        while todo:
            dep = todo.pop()
            for job_id in self._dependents.pop(dep.id, ()):
                # (queued, or running: handed out by an earlier master, see _requeue)
                job, unmet = self.jobs.get(job_id), self._waiting_on.get(job_id)
                if job is None or unmet is None:
                    continue
                if dep.state is State.SUCCEEDED:
                    unmet.discard(dep.id)
                    if not unmet:
                        del self._waiting_on[job_id]
                        if job.state is State.QUEUED and job.not_before is None:
                            self._enter_line(job)
                        elif job.state is State.QUEUED:  # a retry: its failure may be unsaved
                            self.released.append(job)
                    continue
                del self._waiting_on[job_id]
                self._drop_run(job)
                self._finish(job, State.CANCELLED, error=f"job {dep.id} it comes after {dep.state}",
                             cascade=False)  # fmt: skip
                self.cascaded.append(job)
                todo.append(job)

    def publish(self, jobs: Iterable[Job]) -> None:
        """Let slaves have jobs submitted with ``publish=False`` (now in the journal).

        Beyond ``queue_window`` queued in memory, saved jobs go cold (see above); jobs
        waiting for others stay in memory, out of line."""
        queue, window, in_line = self._queue, self.queue_window, self.in_line()
        waiting, cold_tail = self._waiting_on, self._cold_tail
        for job in jobs:
            if job.state is not State.QUEUED or job.id in waiting:
                continue
            # a job goes cold behind the cold ones of its priority (first come, first
            # served), or when the window is full (see cold_span for higher priorities)
            if job.journaled and (in_line >= window or job.priority in cold_tail):
                del self.jobs[job.id]
                self._chill(job.id, job.session, counted=True, priority=job.priority)
            else:
                (queue if not job.priority and job.requires is None
                 else self._line(job)).append(job.id)  # fmt: skip
                in_line += 1

    def unsubmit(self, jobs: Iterable[Job]) -> None:
        """Take back unpublished jobs that could not be saved: as if never submitted."""
        for job in jobs:
            if self.jobs.pop(job.id, None) is not None:
                if job.kind == "python" and not job.state.terminal:
                    self.func_refs[job.payload[0]] -= 1
                self.counts[job.state] -= 1
                self.total -= 1
                self.dirty.discard(job.id)

    def get(self, job_id: int) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise UnknownJob(f"no job {job_id}; list jobs with 'scheduler jobs'") from None

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued or running job; a finished job is left as it is.

        A running job's slave learns at its next heartbeat that its claim is void
        and kills the run.
        """
        job = self.get(job_id)
        self._drop_run(job)
        if not job.state.terminal:
            self._finish(job, State.CANCELLED, error="cancelled by request")
        return job

    def _drop_run(self, job: Job) -> None:
        """A running job is cancelled: its slave no longer holds it, and is told to drop
        it (see _reconcile)."""
        if job.state is State.RUNNING and job.worker in self.workers:
            self.workers[job.worker].let_go(job.id)

    # -- slaves --------------------------------------------------------------

    def register(
        self, name: str, holding: Holding = NOTHING, labels: dict[str, str] | None = None
    ) -> tuple[Worker, Reply]:
        """A slave (re)joins with what it holds, and the labels it carries; only registered
        workers are handed jobs."""
        worker = self.workers.get(name)
        if worker is None or not worker.registered:
            self.roster.append((name, True))
        if worker is None:
            worker = self.workers[name] = Worker(name=name, last_seen=self.clock())
        worker.registered = True
        worker.labels = dict(labels or {})
        self.awaited.discard(name)
        worker.last_seen = self.clock()
        worker.last_seq = -1
        worker.draining = holding.draining
        # What it says now is all it has: a process registering afresh (a restarted slave
        # under the same name, or one back after a master restart) has no reply on its
        # way. What it held before and does not claim ran and died (an attempt), unless
        # it was only waiting.
        started = {j: j not in worker.waiting for j in worker.held}
        worker.batch = dict.fromkeys(worker.held, 0)
        return worker, self._reconcile(worker, holding, started)

    def seen(self, name: str) -> Worker | None:
        """Note that a worker was heard from; every call from a slave keeps its leases."""
        worker = self.workers.get(name)
        if worker is not None and worker.registered:
            worker.last_seen = self.clock()
        return worker

    def lease_room(self) -> int | None:
        """How many leases are left below the reserved ceiling (None: no ceiling)."""
        if self.lease_ceiling is None:
            return None
        return self.lease_ceiling - self._next_lease + 1

    def lease(self, name: str, n: int, seq: int | None = None) -> list[Job]:
        """Hand out up to ``n`` jobs to a registered worker that is not draining.

        ``seq`` numbers the worker's lease calls: a call repeated with the same ``seq``
        (its reply was lost and the call retried) gets the same jobs again.
        """
        worker = self.seen(name)
        if worker is None or not worker.registered:
            raise UnknownWorker(name)  # gone (goodbye, expired) or the master restarted
        if seq is not None and seq == worker.last_seq:  # only set when jobs were handed
            return [self.jobs[j] for j in worker.last_handed if j in worker.held]
        if worker.draining or self.holding_back():
            return []
        if self._delayed and self._delayed[0][0] <= self.clock():
            self.release_due()
        if self.hungry - {name} and self._ahead(worker) > 0:
            # others wait with nothing: take no more than a slot's worth ahead
            n = min(n, max(0, max(1, worker.concurrency) - len(worker.held)))
        room = self.lease_room()
        if room is not None:
            n = min(n, room)
        now, batch = self.clock(), 0 if seq is None else seq
        handed: list[Job] = []
        jobs, lines = self.jobs, self._lines
        # most of the time there is one line: take from it directly
        take = (self._queue.popleft if len(lines) == 1
                else functools.partial(self._pop, self._order_for(worker)))  # fmt: skip
        while len(handed) < n:
            try:
                job = jobs.get(take())
            except IndexError:
                break
            if job is None or job.state is not State.QUEUED or job.not_before is not None:
                continue  # cancelled (maybe evicted), or backing off: removed lazily
            if job.array is not None:
                if self._capped_out(job):
                    continue
                self._running_in[job.array] += 1
            job.state, job.worker, job.lease = State.RUNNING, name, self._next_lease
            job.attempts += 1
            job.started = now
            self._next_lease += 1
            worker.held[job.id] = job.lease
            worker.batch[job.id] = batch
            self.started.add(job.id)
            handed.append(job)
        self.counts[State.QUEUED] -= len(handed)
        self.counts[State.RUNNING] += len(handed)
        if seq is not None and handed:
            worker.last_seq, worker.last_handed = seq, [j.id for j in handed]
        if len(lines) > 1:  # lines left empty go (the first stays)
            for key in [k for k, line in lines.items() if not line and k != MAIN]:
                del lines[key]
        if handed:
            self.hungry.discard(name)
        elif n > 0:
            self.hungry.add(name)
        return handed

    def yield_to(self, name: str) -> int | None:
        """A priority waiting in line that ``name`` could run while it holds jobs of lower
        priority ahead of its slots: it should hand back its unstarted jobs below it
        (None: nothing to hand back). Prefetching must not make a job of higher priority
        wait behind the slave's queue."""
        if not self._ranked:
            return None  # every job ever seen has priority 0
        worker = self.workers.get(name)
        if worker is None or len(worker.held) <= max(1, worker.concurrency):
            return None
        order = self._order_for(worker)
        if not order:
            return None
        top, jobs = order[0][0], self.jobs
        held = (jobs.get(i) for i in worker.held)
        return top if any(j is not None and j.priority < top for j in held) else None

    def give_back(self, name: str) -> int:
        """How many prefetched jobs ``name`` should hand back for idle workers (work stealing).

        A slave leases ahead of its slots when jobs are short; when jobs turn out long,
        others may sit idle while it holds a queue. Half of its surplus goes back.
        """
        worker = self.workers.get(name)
        hungry = [w for n in self.hungry - {name} if (w := self.workers.get(n)) is not None]
        if worker is None or not hungry:
            return 0
        if len(self._lines) == 1 and self._queue or any(self._order_for(w) for w in hungry):
            return 0  # they can take from the queue
        surplus = self._ahead(worker)
        return (surplus + 1) // 2 if surplus > 0 else 0

    def _ahead(self, worker: Worker) -> int:
        """Jobs a worker holds beyond its slots, if they are worth moving (>= STEAL_SECONDS)."""
        surplus = len(worker.held) - max(1, worker.concurrency)
        return surplus if surplus * worker.avg_seconds >= STEAL_SECONDS else 0

    def complete(self, name: str, outcomes: Iterable[Outcome]) -> tuple[list[Job], int]:
        """Apply outcomes from the holder of each lease; return (finished jobs, rejected)."""
        worker = self.seen(name)
        now = self.clock()
        finished, rejected = [], 0
        for out in outcomes:
            job = self.jobs.get(out.job_id)
            if job is None or not self.owns(name, job, out.lease):
                rejected += 1
                continue
            if worker is not None:
                worker.let_go(job.id)
                worker.avg_seconds = 0.8 * worker.avg_seconds + 0.2 * out.duration
            if not out.ok and job.failures < job.retries:
                self._retry(job, name, out, now)
                continue
            job.worker, job.lease = name, out.lease
            job.exit_code, job.stdout, job.stderr = out.exit_code, out.stdout, out.stderr
            job.result = out.result
            job.started = now - out.duration
            self._finish(job, State.SUCCEEDED if out.ok else State.FAILED, error=out.error, now=now)
            finished.append(job)
        return finished, rejected

    def _retry(self, job: Job, name: str, out: Outcome, now: float) -> None:
        """A failed run with retries left: recorded in the job's history, and the job queued
        again after its backoff (``retry_backoff`` doubled per failure, capped, with jitter)."""
        job.failures += 1
        error = out.error if out.error is None or len(out.error) <= HISTORY_ERROR else (
            "..." + out.error[-HISTORY_ERROR:])  # fmt: skip
        job.history = [*(job.history or ()), {
            "worker": name, "lease": out.lease, "started": now - out.duration, "ended": now,
            "exit_code": out.exit_code, "error": error,
        }]  # fmt: skip
        delay = min(RETRY_CAP, job.retry_backoff * 2 ** (job.failures - 1))
        job.not_before = now + delay * self._rng.uniform(0.5, 1.0)
        self.counts[job.state] -= 1
        self.counts[State.QUEUED] += 1
        if job.state is State.RUNNING:  # (or queued: requeued from the lease it reports)
            self._left_running(job)
        job.state, job.worker, job.started = State.QUEUED, None, None
        job.error = job.exit_code = job.stdout = job.stderr = None  # in its history now
        self.dirty.add(job.id)
        self.retried.append(job)  # handed out again only once saved: see schedule()

    def schedule(self, jobs: Iterable[Job]) -> None:
        """Retries whose failure is saved now go in line when their backoff ends. Not
        before: a crash that lost the failure would let the retry run beside a slave
        that still holds the failed run's outcome (and reports it to the next master)."""
        for job in jobs:
            # (one still waiting for others, see _requeue: once they succeeded, _cascade)
            if (job.state is State.QUEUED and job.not_before is not None
                    and job.id not in self._waiting_on):  # fmt: skip
                heapq.heappush(self._delayed, (job.not_before, job.id))

    def release_due(self) -> int:
        """Queue the jobs whose backoff ended, first in line; how many."""
        now, due = self.clock(), []
        while self._delayed and self._delayed[0][0] <= now:
            _, job_id = heapq.heappop(self._delayed)
            job = self.jobs.get(job_id)
            if job is not None and job.state is State.QUEUED and job.not_before is not None:
                job.not_before = None
                due.append(job_id)
        for job_id in reversed(due):
            self._line(self.jobs[job_id]).appendleft(job_id)
        return len(due)

    def owns(self, name: str, job: Job, lease: int) -> bool:
        """Whether worker ``name`` holding ``lease`` may run and report ``job``."""
        if job.state.terminal:
            return False
        # its current lease; or, queued, requeued from this very lease (its slave was
        # presumed dead); or a later lease than the journal saw, handed out by an
        # earlier master (which ended every earlier lease of the job: leases only grow)
        return (lease == job.lease and job.worker == name) or (
            job.lease < lease < self.first_lease
        )

    def release(self, name: str, leases: Iterable[tuple[int, int]]) -> list[Job]:
        """Take jobs back from a worker (drain, work stealing); the hand-out does not count."""
        worker = self.seen(name)
        back = []
        for job_id, lease in leases:
            job = self.jobs.get(job_id)
            if job is None or job.state is not State.RUNNING or job.lease != lease:
                continue
            if job.worker != name:
                continue
            if worker is not None:
                worker.let_go(job_id)
            self._requeue(job, counted=False)
            back.append(job)
        return back

    def heartbeat(self, name: str, holding: Holding = NOTHING) -> Reply:
        """Keep a worker's leases and reconcile what it says it holds with what we think.

        ``Reply.known`` is False if the worker is not registered (it must register again).
        """
        worker = self.seen(name)
        if worker is None or not worker.registered:
            return Reply(known=False)
        worker.draining = holding.draining
        return self._reconcile(worker, holding)

    def _reconcile(
        self, worker: Worker, holding: Holding, started: dict[int, bool] | None = None
    ) -> Reply:
        # a slave may hold two runs of one job (a failed run waiting to be acknowledged,
        # and its retry): the later lease is judged last, so it is the one adopted
        claims = sorted(set(holding.held), key=lambda claim: claim[1])
        claimed = {job_id for job_id, _ in claims}
        worker.waiting = set(holding.waiting)
        drop, cancelled = [], []
        for job_id, lease in claims:
            if worker.held.get(job_id) == lease:
                continue
            job = self.jobs.get(job_id)
            if job is not None and _reported(job, worker.name, lease):
                continue  # its outcome is in; the slave forgets it once told so
            if (job is not None and job.state is State.QUEUED and job_id in worker.waiting
                    and (job.id in self._waiting_on or self._at_cap(job))):  # fmt: skip
                # handed out by an earlier master once what it comes after succeeded (or a
                # task of its array ended), which this one has not heard yet: not started,
                # so it waits here again rather than be adopted
                drop.append((job_id, lease))
            elif job is not None and self.owns(worker.name, job, lease):
                self._adopt(worker, job, lease)
            else:
                drop.append((job_id, lease))
                if job is not None and job.state is State.CANCELLED:
                    cancelled.append(job_id)
        lost = [
            j for j in worker.held
            if j not in claimed and worker.batch.get(j, 0) <= holding.fetched
        ]  # fmt: skip
        for job_id in lost:  # handed out, never arrived: not an attempt (see register)
            worker.let_go(job_id)
            job = self.jobs.get(job_id)
            if job is not None and job.state is State.RUNNING:
                self._requeue(job, counted=bool(started and started.get(job_id)))
        return Reply(True, tuple(drop), tuple(cancelled))

    def _adopt(self, worker: Worker, job: Job, lease: int) -> None:
        if job.state is State.RUNNING and job.worker != worker.name:
            before = self.workers.get(job.worker or "")
            if before is not None:  # its lease is the older one: not its job any more
                before.let_go(job.id)
        if job.state is State.QUEUED:
            self.counts[State.QUEUED] -= 1
            self.counts[State.RUNNING] += 1
            if job.array is not None:
                self._running_in[job.array] += 1
            job.state, job.started = State.RUNNING, self.clock()
            job.not_before = None  # an earlier master let it run: its backoff is over
            job.attempts = max(job.attempts, 1)
        job.worker, job.lease = worker.name, lease
        worker.held[job.id] = lease
        worker.batch[job.id] = 0
        self.dirty.add(job.id)

    def holding_back(self) -> bool:
        """Whether hand-outs wait for slaves to come back after a restart (see above)."""
        if self.awaited and self.clock() >= self.hold_until:
            self.awaited.clear()
        return bool(self.awaited)

    def forget(self, name: str) -> list[Job]:
        """A worker said goodbye; anything it still held goes back, not counted."""
        self.hungry.discard(name)
        self.roster.append((name, False))
        worker = self.workers.pop(name, None)
        back = []
        for job_id in list(worker.held) if worker else []:
            job = self.jobs.get(job_id)
            if job is not None and job.state is State.RUNNING:
                self._requeue(job, counted=False)
                back.append(job)
        return back

    def expire(self) -> list[Job]:
        """Requeue (or fail) the jobs of workers silent for longer than ``lease_seconds``."""
        deadline = self.clock() - self.lease_seconds
        changed = []
        for worker in [w for w in self.workers.values() if w.last_seen < deadline]:
            del self.workers[worker.name]
            self.hungry.discard(worker.name)
            self.roster.append((worker.name, False))
            for job_id in worker.held:
                job = self.jobs.get(job_id)
                if job is None or job.state is not State.RUNNING:
                    continue
                if job_id in worker.waiting:  # it never started there
                    job.attempts = max(0, job.attempts - 1)
                if job.attempts >= job.max_attempts:
                    reason = (
                        f"worker {worker.name} stopped answering "
                        f"(silent for {self.lease_seconds:g}s); "
                        f"gave up after {job.attempts} attempts"
                    )
                    self._finish(job, State.FAILED, error=reason)
                    job.worker = None  # no run of it counts any more: a returning slave drops it
                else:
                    self._requeue(job)
                changed.append(job)
        return changed

    # -- views ---------------------------------------------------------------

    def take_dirty(self, started: bool = False) -> list[Job]:
        """The jobs changed since the last call, for the journal; with ``started`` (the
        periodic write), also those handed out since and still running."""
        jobs = self.jobs
        if started:
            self.dirty.update(i for i in self.started
                              if (j := jobs.get(i)) is not None and j.state is State.RUNNING)
            self.started.clear()
        out = [jobs[i] for i in self.dirty if i in jobs]
        self.dirty.clear()
        return out

    def why_pending(self, job_id: int) -> str:
        """Why a queued job is not running yet, in a few words (`scheduler jobs`)."""
        job = self.jobs.get(job_id)
        if job is not None and job.not_before is not None and job.not_before > self.clock():
            until = time.strftime("%H:%M:%S", time.localtime(job.not_before))
            return (f"backing off until {until} after failure {job.failures} "
                    f"(retry {job.failures} of {job.retries})")  # fmt: skip
        if job_id in self._waiting_on:
            first = min(self._waiting_on[job_id])
            more = len(self._waiting_on[job_id]) - 1
            return f"waiting for job {first}" + (f" and {more} more" if more else "")
        if self.holding_back():
            until = time.strftime("%H:%M:%S", time.localtime(self.hold_until))
            names = ", ".join(sorted(self.awaited))
            return f"held after a master restart until slave(s) {names} are back (or {until})"
        ready = [w for w in self.workers.values() if w.registered and not w.draining]
        if not ready:
            if any(w.registered for w in self.workers.values()):
                return "every connected slave is draining"
            return "no slave connected"
        wanted = ""
        if job is not None and job.requires:
            wanted = ",".join(f"{k}={v}" for k, v in sorted(job.requires.items()))
            ready = [w for w in ready if w.can_run(job.requires)]
            if not ready:
                return f"no slave with {wanted} connected"
            wanted = f" on slaves with {wanted}"
        if job is not None and self._at_cap(job):
            return f"array {job.array} has {job.array_cap} task(s) running, its cap"
        if self.is_cold(job_id):
            return (f"waiting in the journal, behind the {self.in_line():,} queued jobs "
                    "the master keeps in memory")  # fmt: skip
        slots = sum(max(1, w.concurrency) for w in ready)
        busy = sum(len(w.held) - len(w.waiting.intersection(w.held)) for w in ready)
        ahead = 0 if job is None else self._in_line_from(job.priority + 1)
        if busy >= slots and ahead:
            return f"all {slots} slot(s){wanted} busy; behind {ahead:,} job(s) of higher priority"
        if busy >= slots:
            return f"all {slots} slot(s){wanted} busy"
        if ahead:
            return f"behind {ahead:,} job(s) of higher priority"
        return "next in line for a free slot"

    def select(
        self, state: State | None = None, limit: int | None = None, before: int | None = None
    ) -> list[Job]:
        """Jobs in memory, newest first, with ids below ``before``, at most ``limit``."""
        out: list[Job] = []
        for job in reversed(self.jobs.values()):
            if before is not None and job.id >= before:
                continue
            if state is None or job.state is state:
                out.append(job)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def status(self) -> dict:
        return {
            "counts": {str(k): v for k, v in self.counts.items()},
            "total": self.total,
            "in_memory": len(self.jobs),
            "awaiting": sorted(self.awaited),  # slaves to come back after a restart
            "workers": [w.view() for w in sorted(self.workers.values(), key=lambda w: w.name)],
        }

    # -- transitions ---------------------------------------------------------

    def _requeue(self, job: Job, counted: bool = True) -> None:
        """Back to the queue, first in line. ``counted=False``: the hand-out was no attempt."""
        if not counted:
            job.attempts = max(0, job.attempts - 1)
        self.counts[job.state] -= 1
        self.counts[State.QUEUED] += 1
        if job.state is State.RUNNING:
            self._left_running(job)
        job.state, job.started = State.QUEUED, None
        # a run an earlier master handed out (adopted, or restored running) may still wait
        # for others here: that master saw them succeed, which this one has not heard, and
        # may never (an outcome lost with its slave runs again): it runs after them again
        if job.id not in self._waiting_on:
            self._line(job).appendleft(job.id)  # it waited once already; run it next
        self.dirty.add(job.id)

    def _finish(
        self, job: Job, state: State, *, error: str | None, now: float | None = None,
        cascade: bool = True,
    ) -> None:
        self.counts[job.state] -= 1
        self.counts[state] += 1
        if job.kind == "python":
            self.func_refs[job.payload[0]] -= 1
        if job.state is State.RUNNING:
            self._left_running(job)
        elif job.array is not None and job.array in self._capped:
            self._let_next(job.array)  # it may have been the one let go to run next
        job.state, job.error = state, error
        job.ended = self.clock() if now is None else now
        self.dirty.add(job.id)
        self._finished.append(job.id)
        self.finished_total += 1
        self._waiting_on.pop(job.id, None)
        if cascade and job.id in self._dependents:
            self._cascade(job)

    def evict(self, keep: int, saved: int | None = None) -> int:
        """Drop the oldest finished jobs beyond ``keep`` from memory; the journal has them.

        ``saved``: how many of ``finished_total`` are known to be in the journal; only
        those may go (default: all).
        """
        saved = self.finished_total if saved is None else saved
        dropped = 0
        while len(self._finished) > keep and self._evicted_total < saved:
            job = self.jobs.pop(self._finished.popleft(), None)
            self._evicted_total += 1
            if job is not None:
                dropped += 1
        return dropped

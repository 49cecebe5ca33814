"""The master's board: the pure state machine of queue, leases, retries and cancels.

No I/O, no threads, no sleeping: the clock is injected, callers hold the lock.
A job is handed out under a *lease* (a number unique across restarts). The worker
that holds it keeps it alive by being heard from; when a worker has been silent
for ``lease_seconds`` its jobs go back to the queue, or fail once they used up
their attempts. An outcome is applied only if it carries the job's current lease,
so a worker presumed dead cannot report a job that was handed out again.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import UnknownJob, UnknownWorker
from .job import Job, JobSpec, State

STEAL_SECONDS = 0.2  # less queued work than this is not worth a round trip to move


class Journaled(NamedTuple):
    """What the journal holds beyond the jobs loaded into memory."""

    total: int
    counts: dict[str, int]
    max_id: int
    max_lease: int


class Lease(NamedTuple):
    """A job as handed to a slave."""

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


@dataclass(slots=True)
class Worker:
    """A slave as the master sees it."""

    name: str
    last_seen: float
    host: str = ""
    pid: int = 0
    concurrency: int = 0
    draining: bool = False
    avg_seconds: float = 0.0  # moving average of its jobs' run times
    held: dict[int, int] = field(default_factory=dict)  # job id -> lease
    waiting: set[int] = field(default_factory=set)  # held but not started, at the last heartbeat
    cancels: set[int] = field(default_factory=set)

    def view(self) -> dict:
        return {
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "concurrency": self.concurrency,
            "draining": self.draining,
            "running": sorted(j for j in self.held if j not in self.waiting),
            "waiting": sorted(j for j in self.held if j in self.waiting),  # prefetched
            "last_heartbeat": self.last_seen,
        }


class Board:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.jobs: dict[int, Job] = {}
        self.workers: dict[str, Worker] = {}
        self.counts: Counter[str] = Counter({s: 0 for s in State})
        self.dirty: set[int] = set()  # jobs changed since the journal last saw them
        self.hungry: set[str] = set()  # workers that asked for work and found none
        self.total = 0  # jobs ever submitted, in memory or only in the journal
        self._finished: deque[int] = deque()  # finished job ids, oldest first
        self._queue: deque[int] = deque()
        self._next_id = 1
        self._next_lease = 1

    # -- loading -------------------------------------------------------------

    def restore(self, jobs: Iterable[Job], stored: Journaled | None = None) -> int:
        """Load jobs from the journal; jobs that were running go back to the queue.

        ``stored`` describes the whole journal when only part of it was loaded (finished
        jobs beyond the in-memory window stay on disk but still count).
        """
        jobs = sorted(jobs, key=lambda j: j.id)
        if stored is None:
            last = jobs[-1].id if jobs else 0
            stored = Journaled(len(jobs), dict(Counter(str(j.state) for j in jobs)), last,
                               max((j.lease for j in jobs), default=0))  # fmt: skip
        self._next_id, self._next_lease = stored.max_id + 1, stored.max_lease + 1
        self.total = stored.total
        for state, n in stored.counts.items():
            self.counts[State(state)] += n
        requeued = 0
        for job in jobs:
            self.jobs[job.id] = job
            if job.state is State.RUNNING:
                # The master went away, not the job: this hand-out does not count.
                job.state, job.attempts, job.started = State.QUEUED, max(0, job.attempts - 1), None
                self.counts[State.RUNNING] -= 1
                self.counts[State.QUEUED] += 1
                self.dirty.add(job.id)
                requeued += 1
            if job.state is State.QUEUED:
                self._queue.append(job.id)
            elif job.state.terminal:
                self._finished.append(job.id)
        return requeued

    # -- clients -------------------------------------------------------------

    def submit(self, specs: Iterable[JobSpec]) -> list[Job]:
        now, first, default_attempts = self.clock(), self._next_id, self.max_attempts
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
            )  # fmt: skip
            for i, (kind, payload, name, labels, timeout, attempts) in enumerate(specs, first)
        ]
        self._next_id = first + len(new)
        ids = range(first, self._next_id)
        self.jobs.update(zip(ids, new, strict=True))
        self._queue.extend(ids)
        self.dirty.update(ids)
        self.counts[State.QUEUED] += len(new)
        self.total += len(new)
        return new

    def get(self, job_id: int) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise UnknownJob(f"no job {job_id}; list jobs with 'scheduler jobs'") from None

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued or running job; a finished job is left as it is."""
        job = self.get(job_id)
        if job.state is State.RUNNING and job.worker in self.workers:
            worker = self.workers[job.worker]
            worker.held.pop(job.id, None)
            worker.cancels.add(job.id)
        if not job.state.terminal:
            self._finish(job, State.CANCELLED, error="cancelled by request")
        return job

    # -- slaves --------------------------------------------------------------

    def register(self, name: str) -> Worker:
        """A slave (re)joins; only registered workers are handed jobs."""
        worker = self.workers.get(name)
        if worker is None:
            worker = self.workers[name] = Worker(name=name, last_seen=self.clock())
        worker.last_seen = self.clock()
        return worker

    def seen(self, name: str) -> Worker | None:
        """Note that a worker was heard from; every call from a slave renews its leases."""
        worker = self.workers.get(name)
        if worker is not None:
            worker.last_seen = self.clock()
        return worker

    def lease(self, name: str, n: int) -> list[Job]:
        """Hand out up to ``n`` jobs to a registered worker that is not draining."""
        worker = self.seen(name)
        if worker is None:
            raise UnknownWorker(name)  # gone (goodbye, expired) or the master restarted
        if worker.draining:
            return []
        if self.hungry - {name} and self._ahead(worker) > 0:
            # others wait with nothing: take no more than a slot's worth ahead
            n = min(n, max(0, max(1, worker.concurrency) - len(worker.held)))
        now = self.clock()
        handed: list[Job] = []
        while len(handed) < n and self._queue:
            job = self.jobs[self._queue.popleft()]
            if job.state is not State.QUEUED:
                continue  # cancelled while waiting; removed lazily
            job.state, job.worker, job.lease = State.RUNNING, name, self._next_lease
            job.attempts += 1
            job.started = now
            self._next_lease += 1
            worker.held[job.id] = job.lease
            self.dirty.add(job.id)
            handed.append(job)
        self.counts[State.QUEUED] -= len(handed)
        self.counts[State.RUNNING] += len(handed)
        if handed:
            self.hungry.discard(name)
        elif n > 0 and not self._queue:
            self.hungry.add(name)
        return handed

    def give_back(self, name: str) -> int:
        """How many prefetched jobs ``name`` should hand back for idle workers (work stealing).

        A slave leases ahead of its slots when jobs are short; when jobs turn out long,
        others may sit idle while it holds a queue. Half of its surplus goes back.
        """
        worker = self.workers.get(name)
        if worker is None or self._queue or not (self.hungry - {name}):
            return 0
        surplus = self._ahead(worker)
        return (surplus + 1) // 2 if surplus > 0 else 0

    def _ahead(self, worker: Worker) -> int:
        """Jobs a worker holds beyond its slots, if they are worth moving (>= STEAL_SECONDS)."""
        surplus = len(worker.held) - max(1, worker.concurrency)
        return surplus if surplus * worker.avg_seconds >= STEAL_SECONDS else 0

    def complete(self, name: str, outcomes: Iterable[Outcome]) -> tuple[list[Job], int]:
        """Apply outcomes that carry the current lease; return (finished jobs, rejected count)."""
        worker = self.seen(name)
        now = self.clock()
        finished, rejected = [], 0
        for out in outcomes:
            job = self.jobs.get(out.job_id)
            if job is None or job.state is not State.RUNNING or job.lease != out.lease:
                rejected += 1
                continue
            if worker is not None:
                worker.held.pop(job.id, None)
                worker.avg_seconds = 0.8 * worker.avg_seconds + 0.2 * out.duration
            job.exit_code, job.stdout, job.stderr = out.exit_code, out.stdout, out.stderr
            job.result = out.result
            job.started = now - out.duration
            self._finish(job, State.SUCCEEDED if out.ok else State.FAILED, error=out.error, now=now)
            finished.append(job)
        return finished, rejected

    def release(self, name: str, leases: Iterable[tuple[int, int]]) -> list[Job]:
        """Take jobs back from a draining worker; the interrupted hand-out does not count."""
        worker = self.seen(name)
        back = []
        for job_id, lease in leases:
            job = self.jobs.get(job_id)
            if job is None or job.state is not State.RUNNING or job.lease != lease:
                continue
            if worker is not None:
                worker.held.pop(job_id, None)
            job.attempts = max(0, job.attempts - 1)
            self._requeue(job)
            back.append(job)
        return back

    def heartbeat(
        self,
        name: str,
        *,
        draining: bool = False,
        running: Iterable[int] | None = None,
        waiting: Iterable[int] = (),
    ) -> list[int] | None:
        """Renew a worker's leases; return the running jobs it must kill (cancelled),
        or None if the worker is not registered (it must register again).

        ``running`` and ``waiting`` are what the worker says it has. A job we think it
        holds, handed out longer than a lease ago and absent from both, was lost in
        transit (the reply to a lease call never arrived): it goes back to the queue.
        Jobs still waiting do not count as an attempt if the worker dies.
        """
        worker = self.seen(name)
        if worker is None:
            return None
        worker.draining = draining
        worker.waiting = set(waiting)
        if running is not None:
            held = set(running) | worker.waiting
            old = self.clock() - self.lease_seconds
            for job_id in [j for j in worker.held if j not in held]:
                job = self.jobs[job_id]
                if job.started is not None and job.started < old:
                    del worker.held[job_id]
                    self._requeue(job)
        cancels = sorted(worker.cancels)
        worker.cancels.clear()
        return cancels

    def forget(self, name: str) -> None:
        """A worker said goodbye; anything it still held goes back to the queue."""
        self.hungry.discard(name)
        worker = self.workers.pop(name, None)
        if worker is not None:
            for job_id in list(worker.held):
                job = self.jobs[job_id]
                job.attempts = max(0, job.attempts - 1)
                self._requeue(job)

    def expire(self) -> list[Job]:
        """Requeue (or fail) the jobs of workers silent for longer than the lease."""
        deadline = self.clock() - self.lease_seconds
        changed = []
        for worker in [w for w in self.workers.values() if w.last_seen < deadline]:
            del self.workers[worker.name]
            self.hungry.discard(worker.name)
            for job_id in worker.held:
                job = self.jobs[job_id]
                if job_id in worker.waiting:  # it never started there
                    job.attempts = max(0, job.attempts - 1)
                if job.attempts >= job.max_attempts:
                    reason = (
                        f"worker {worker.name} stopped answering (lease expired); "
                        f"gave up after {job.attempts} attempts"
                    )
                    self._finish(job, State.FAILED, error=reason)
                else:
                    self._requeue(job)
                changed.append(job)
        return changed

    # -- views ---------------------------------------------------------------

    def take_dirty(self) -> list[Job]:
        """The jobs changed since the last call, for the journal."""
        jobs = [self.jobs[i] for i in self.dirty]
        self.dirty.clear()
        return jobs

    def select(self, state: State | None = None, limit: int | None = None) -> list[Job]:
        jobs = (j for j in self.jobs.values() if state is None or j.state is state)
        out = []
        for job in jobs:
            out.append(job)
            if limit is not None and len(out) >= limit:
                break
        return out

    def status(self) -> dict:
        return {
            "counts": {str(k): v for k, v in self.counts.items()},
            "total": self.total,
            "workers": [w.view() for w in sorted(self.workers.values(), key=lambda w: w.name)],
        }

    # -- transitions ---------------------------------------------------------

    def _requeue(self, job: Job) -> None:
        self.counts[job.state] -= 1
        self.counts[State.QUEUED] += 1
        job.state, job.started = State.QUEUED, None
        self._queue.appendleft(job.id)  # it waited once already; run it next
        self.dirty.add(job.id)

    def _finish(
        self, job: Job, state: State, *, error: str | None, now: float | None = None
    ) -> None:
        self.counts[job.state] -= 1
        self.counts[state] += 1
        job.state, job.error = state, error
        job.ended = self.clock() if now is None else now
        self.dirty.add(job.id)
        self._finished.append(job.id)

    def evict(self, keep: int) -> int:
        """Drop the oldest finished jobs beyond ``keep`` from memory; the journal has them.

        Call after their last change went to the journal (not dirty any more).
        """
        dropped = 0
        while len(self._finished) > keep:
            job = self.jobs.get(self._finished[0])
            if job is not None and (job.id in self.dirty or not job.journaled):
                break  # not written yet; next time
            self._finished.popleft()
            if job is not None:
                del self.jobs[job.id]
                dropped += 1
        return dropped

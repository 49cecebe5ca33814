"""What the master counts for ``/metrics`` and the dashboard: Prometheus instruments, a
per-second ring of finished jobs, and the latest failures.

The service calls the hooks (``submitted``, ``finished``, ``requeued``...) where things
happen; gauges (jobs by state, workers, slots) are read from a board snapshot at scrape
time, so an idle scrape costs one lock acquisition. ``prometheus_client`` is imported
only when a ``Metrics`` is made: the master runs without it (and without HTTP) if absent.
Label values are bounded: states, and the reasons in REQUEUE_REASONS.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .job import Job, State

FINAL = (State.SUCCEEDED, State.FAILED, State.CANCELLED)
# Why a job went back to the queue. A lease ends only when its slave dies (is silent for
# the lease), so "lease lapsed" and "slave death" are one reason here.
REQUEUE_REASONS = ("slave_death", "drain", "handed_back", "slave_left", "lost_in_transit",
                   "retry")  # fmt: skip
RUN_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400)
COMMIT_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
RING_SECONDS = 600  # how far back the throughput chart reaches
KEEP_FAILURES = 20
ERROR_CHARS = 2000  # of a failure's error text kept for the dashboard (its end)
FAILURE_FIELDS = ("id", "name", "worker", "exit_code", "ended", "attempts", "error", "stderr")
STDERR_CHARS = 500  # of a failure's stderr kept for the dashboard (its end)

Snapshot = Callable[[], Mapping[str, Any]]


class Throughput:
    """Jobs finished per second, by final state, for the last ``seconds`` seconds."""

    def __init__(self, seconds: int = RING_SECONDS, clock: Callable[[], float] = time.time):
        self.seconds = seconds
        self.clock = clock
        self._stamp = [-1] * seconds  # which second each slot holds
        self._counts = [[0, 0, 0] for _ in range(seconds)]
        self._lock = threading.Lock()

    def add(self, state: State, n: int = 1) -> None:
        second = int(self.clock())
        slot = second % self.seconds
        with self._lock:
            if self._stamp[slot] != second:
                self._stamp[slot], self._counts[slot] = second, [0, 0, 0]
            self._counts[slot][FINAL.index(state)] += n

    def series(self, last: int | None = None) -> dict[str, Any]:
        """``{"start": first second, "step": 1, state: [count per second]}``, oldest first,
        ending with the second before the current one (which is still filling)."""
        last = min(last or self.seconds, self.seconds - 1)
        end = int(self.clock())
        start = end - last
        out: dict[str, Any] = {"start": start, "step": 1}
        columns: list[list[int]] = [[], [], []]
        with self._lock:
            for second in range(start, end):
                slot = second % self.seconds
                row = self._counts[slot] if self._stamp[slot] == second else (0, 0, 0)
                for column, value in zip(columns, row, strict=True):
                    column.append(value)
        out.update((str(state), column) for state, column in zip(FINAL, columns, strict=True))
        return out


def failure_view(job: Mapping[str, Any]) -> dict[str, Any]:
    """What the dashboard lists of a failed job (a ``Job.info`` view): the end of its error."""
    view = {key: job.get(key) for key in FAILURE_FIELDS}
    view["error"] = (view["error"] or "")[-ERROR_CHARS:]
    view["stderr"] = (view["stderr"] or "")[-STDERR_CHARS:]
    return view


class NoMetrics:
    """The hooks, doing nothing: the master when HTTP is off or prometheus_client absent."""

    def submitted(self, n: int) -> None: ...
    def finished(self, jobs: Iterable[Job], ran: bool = True) -> None: ...
    def requeued(self, n: int, reason: str) -> None: ...
    def rejected(self, n: int) -> None: ...
    def journal_committed(self, seconds: float) -> None: ...


class Metrics(NoMetrics):
    """The master's instruments, in a registry of their own (never the global one)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
        from prometheus_client.process_collector import ProcessCollector

        self.content_type = CONTENT_TYPE_LATEST
        self.registry = CollectorRegistry(auto_describe=True)
        self.throughput = Throughput(clock=clock)
        self._failures: deque[dict[str, Any]] = deque(maxlen=KEEP_FAILURES)
        self._failures_lock = threading.Lock()
        r = self.registry
        ProcessCollector(registry=r)
        self._submitted = Counter("scheduler_jobs_submitted", "Jobs submitted", registry=r)
        finished = Counter("scheduler_jobs_finished", "Jobs that reached a final state",
                           ["state"], registry=r)  # fmt: skip
        self._finished = {s: finished.labels(str(s)) for s in FINAL}
        self._run = _RunTimes()
        r.register(self._run)
        requeues = Counter("scheduler_requeues", "Jobs put back in the queue, by reason",
                           ["reason"], registry=r)  # fmt: skip
        self._requeues = {why: requeues.labels(why) for why in REQUEUE_REASONS}
        self._rejected = Counter("scheduler_outcomes_rejected",
                                 "Outcomes refused (lease given up or job cancelled)",
                                 registry=r)  # fmt: skip
        self._commit = Histogram("scheduler_journal_commit_seconds",
                                 "Time of one journal transaction (group commit)",
                                 buckets=COMMIT_SECONDS, registry=r)  # fmt: skip

    def watch(self, snapshot: Snapshot) -> None:
        """Gauges read at scrape time from ``snapshot()`` (see Service.snapshot)."""
        self.registry.register(_BoardCollector(snapshot))

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    # -- hooks -----------------------------------------------------------------

    def submitted(self, n: int) -> None:
        if n:
            self._submitted.inc(n)

    def finished(self, jobs: Iterable[Job], ran: bool = True) -> None:
        """Jobs that reached a final state; ``ran``: from outcomes, so their run time counts."""
        tally = {s: 0 for s in FINAL}
        times = []
        for job in jobs:
            tally[job.state] += 1
            if ran and job.started is not None and job.ended is not None:
                times.append(job.ended - job.started)
            if job.state is State.FAILED:
                failed = failure_view({k: getattr(job, k) for k in FAILURE_FIELDS})
                with self._failures_lock:
                    self._failures.appendleft(failed)
        if times:
            self._run.observe(times)
        for state, n in tally.items():
            if n:
                self._finished[state].inc(n)
                self.throughput.add(state, n)

    def seed_failures(self, infos: Iterable[Mapping[str, Any]]) -> None:
        """The latest failures from before a restart (``Service.jobs`` views, newest first)."""
        with self._failures_lock:
            self._failures.extend(failure_view(info) for info in infos)

    def failures(self) -> list[dict[str, Any]]:
        """The latest failed jobs, newest first (see failure_view)."""
        with self._failures_lock:
            return list(self._failures)

    def requeued(self, n: int, reason: str) -> None:
        if n:
            self._requeues[reason].inc(n)

    def rejected(self, n: int) -> None:
        if n:
            self._rejected.inc(n)

    def journal_committed(self, seconds: float) -> None:
        self._commit.observe(seconds)


class _RunTimes:
    """``scheduler_job_run_seconds``, a histogram fed a batch at a time: a report of a
    thousand outcomes takes one lock, not the thousand of ``Histogram.observe``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(RUN_SECONDS) + 1)  # the last: above every bound
        self._sum = 0.0

    def observe(self, seconds: list[float]) -> None:
        found = [bisect.bisect_left(RUN_SECONDS, s) for s in seconds]
        total = sum(seconds)
        with self._lock:
            for i in found:
                self._counts[i] += 1
            self._sum += total

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        from prometheus_client.core import HistogramMetricFamily

        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, n in zip([*map(_bound, RUN_SECONDS), "+Inf"], counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("scheduler_job_run_seconds",
                                    "Run time of jobs whose slave reported an outcome",
                                    buckets=buckets, sum_value=total)  # fmt: skip


def _bound(value: float) -> str:
    """A bucket bound as prometheus_client writes it (``le="1.0"``)."""
    return repr(float(value))


class _BoardCollector:
    """Gauges computed from the board at scrape time."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def describe(self) -> list:
        return []  # nothing to check at registration: names are fixed, below

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        snap = self._snapshot()
        jobs = GaugeMetricFamily("scheduler_jobs", "Jobs by state", labels=["state"])
        for state in State:
            jobs.add_metric([str(state)], snap["counts"].get(str(state), 0))
        yield jobs
        for name, doc, key in (
            ("scheduler_queue_depth", "Jobs waiting for a slave", "queued"),
            ("scheduler_jobs_in_memory", "Jobs the master keeps in memory", "in_memory"),
            ("scheduler_workers_connected", "Slaves registered and heard from", "connected"),
            ("scheduler_workers_draining", "Slaves draining (taking no new jobs)", "draining"),
            ("scheduler_slots", "Job slots of the connected slaves", "slots"),
            ("scheduler_slots_busy", "Jobs running on slaves (not only held)", "busy"),
            ("scheduler_jobs_held", "Jobs handed out and not finished", "held"),
            ("scheduler_journal_failing", "1 while journal writes fail", "journal_failing"),
        ):
            yield GaugeMetricFamily(name, doc, value=snap[key])


__all__ = ["FINAL", "Metrics", "NoMetrics", "REQUEUE_REASONS", "Throughput", "failure_view"]

"""Progress in the master's log: per-job lines, summarised at high rates, and a periodic total."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from .job import Job, State

log = logging.getLogger("scheduler.progress")


class RateLimit:
    """Allows ``per_second`` events a second and counts the rest."""

    def __init__(self, clock: Callable[[], float], per_second: int = 20) -> None:
        self.clock = clock
        self.per_second = per_second
        self._second = 0
        self._count = 0
        self.suppressed = 0

    def __call__(self) -> bool:
        return self.take(1) == 1

    def take(self, n: int) -> int:
        """How many of ``n`` events may be told now; the rest are counted."""
        second = int(self.clock())
        if second != self._second:
            self._second, self._count = second, 0
        allowed = max(0, min(n, self.per_second - self._count))
        self._count += n
        self.suppressed += n - allowed
        return allowed


class Progress:
    def __init__(
        self, clock: Callable[[], float], interval: float = 5.0, lines_per_second: int = 20
    ) -> None:
        self.clock = clock
        self.interval = interval
        self._allow = RateLimit(clock, lines_per_second)
        self._last_tick = clock()
        self._last_done = 0
        self._last_line: tuple = ()

    def baseline(self, counts: Mapping[str, int]) -> None:
        """Start counting the rate from the jobs already done (after a restart)."""
        self._last_done = counts[State.SUCCEEDED] + counts[State.FAILED] + counts[State.CANCELLED]

    def dispatched(self, jobs: list[Job], worker: str) -> None:
        for job in jobs[: self._allow.take(len(jobs))]:
            log.info("job %s dispatched to %s (attempt %d/%d): %s", job.label, worker,
                     job.attempts, job.max_attempts, job.describe())  # fmt: skip

    def finished(self, jobs: list[Job], worker: str | None = None) -> None:
        for job in jobs[: self._allow.take(len(jobs))]:
            where = f" on {worker or job.worker}" if (worker or job.worker) else ""
            took = f" in {job.ended - job.started:.3f}s" if job.ended and job.started else ""
            if job.state is State.SUCCEEDED:
                log.info("job %s succeeded%s%s", job.label, where, took)
            else:
                code = f" (exit code {job.exit_code})" if job.exit_code not in (None, 0) else ""
                reason = (job.error or "").strip().splitlines()[-1:] or [""]
                log.info("job %s %s%s%s%s: %s", job.label, job.state, where, took, code, reason[0])

    def requeued(self, labels: Iterable[str], why: str) -> None:
        """Jobs that went back to the queue (their labels, taken when it happened)."""
        for label in labels:
            if self._allow():
                log.warning("job %s requeued (%s)", label, why)

    def tick(self, counts: Mapping[str, int], total: int, force: bool = False) -> None:
        """Log the progress line every ``interval`` seconds while anything changes."""
        now = self.clock()
        elapsed = now - self._last_tick
        if elapsed < self.interval and not force:
            return
        done = counts[State.SUCCEEDED] + counts[State.FAILED] + counts[State.CANCELLED]
        line = (done, total, counts[State.RUNNING], counts[State.QUEUED])
        if line == self._last_line and not self._allow.suppressed and not force:
            self._last_tick = now
            return
        rate = (done - self._last_done) / elapsed if elapsed > 0 else 0.0
        left = counts[State.QUEUED] + counts[State.RUNNING]
        eta = f"{left / rate:.0f}s" if rate > 0 and left else ("-" if left else "0s")
        dropped = self._allow.suppressed
        extra = f", {dropped} per-job lines summarised" if dropped else ""
        log.info(
            "progress: %d/%d done, %d running, %d queued, %d failed, %d cancelled, "
            "%.1f jobs/s, ETA %s%s",
            done, total, counts[State.RUNNING], counts[State.QUEUED], counts[State.FAILED],
            counts[State.CANCELLED], rate, eta, extra,
        )  # fmt: skip
        self._last_tick, self._last_done, self._last_line, self._allow.suppressed = (
            now,
            done,
            line,
            0,
        )

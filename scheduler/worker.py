"""The slave's engine: fetch leases in batches, run them in slots, report in batches.

Threads: one fetcher (long-polls the master for work while there is room), one
reporter (sends outcomes as they come, batched under load), one heartbeat (renews
leases, learns about cancels), and one thread per slot running jobs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from .board import Lease, Outcome
from .errors import AuthError, ConnectError, UnknownWorker
from .progress import RateLimit
from .runner import Abort, PythonSlot, run_shell
from .settings import Settings
from .transport import Link

log = logging.getLogger(__name__)

TARGET_BATCH_SECONDS = 0.05  # prefetch about this much work per slot
MAX_PREFETCH = 256
MAX_CHILD_BATCH = 16  # jobs sent to a child cannot be handed back: keep batches short
SHORT_JOB = 0.002  # seconds; jobs shorter than this on average are batched to the child
LONG_POLL = 5.0
REPORT_GAP = 0.002  # seconds; a slave busy with short jobs reports at most this often


class Worker:
    def __init__(self, settings: Settings, stop: threading.Event) -> None:
        self.settings = settings
        self.name = settings.worker_name
        self.concurrency = settings.concurrency
        self._stop = stop
        self.link = Link(settings.master, settings.authkey.reveal(), stopping=stop.is_set)
        self._cond = threading.Condition()  # slots wait here for work, drain for idle slots
        self._has_room = threading.Condition(self._cond._lock)  # type: ignore[attr-defined]
        self._queue: deque[Lease] = deque()
        self._funcs: dict[str, bytes] = {}
        # keyed by (job id, lease): after a master restart the same job can come twice
        self._running: dict[tuple[int, int], tuple[Lease, Abort, PythonSlot | None]] = {}
        self._results: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._requeue: list[tuple[int, int]] = []
        self._draining = threading.Event()
        self._avg = 0.0  # moving average of job run time, seconds
        self._slots = [
            PythonSlot(settings.output_limit, settings.result_limit)
            for _ in range(self.concurrency)
        ]
        self._busy_slots = 0
        self._log_ok = RateLimit(time.time)
        self._done = 0
        self._failed = 0
        self.heartbeat_seconds = 5.0

    # -- lifecycle -----------------------------------------------------------

    def run(self) -> int:
        """Serve until ``stop`` is set, then drain; returns the exit status."""
        self._register()
        threads = [threading.Thread(target=self._slot_loop, args=(s,), name=f"slot-{i}")
                   for i, s in enumerate(self._slots)]  # fmt: skip
        reporter = threading.Thread(target=self._report_loop, name="reporter")
        for t in [*threads, reporter]:
            t.start()
        fetcher = threading.Thread(target=self._fetch_loop, name="fetcher", daemon=True)
        fetcher.start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        self._stop.wait()
        self._drain(threads, reporter, fetcher)
        return 0

    def _register(self) -> None:
        info = self.link.call("register", self.name, socket.gethostname(), os.getpid(),
                              self.concurrency)  # fmt: skip
        self.heartbeat_seconds = info["heartbeat_seconds"]
        log.info("slave %s connected to master %s:%d with %d processes", self.name,
                 *self.settings.master, self.concurrency)  # fmt: skip
        self._touch_health()

    def _drain(
        self, slots: list[threading.Thread], reporter: threading.Thread, fetcher: threading.Thread
    ) -> None:
        grace = self.settings.grace_seconds
        log.info("slave %s draining: taking no new jobs, %.0fs grace for running ones",
                 self.name, grace)  # fmt: skip
        with self._cond:
            self._draining.set()
            unstarted = [(lease.job_id, lease.lease) for lease in self._queue]
            self._queue.clear()
            self._cond.notify_all()
            self._has_room.notify_all()
        self._call_quietly("heartbeat", self.name, True)  # wakes our own long-poll, empty
        fetcher.join(LONG_POLL + 1)  # whatever it still got, it hands back itself
        if unstarted:
            self._call_quietly("release", self.name, unstarted)
            log.info("slave %s handed back %d unstarted job(s)", self.name, len(unstarted))
        deadline = time.monotonic() + grace
        with self._cond:
            while self._busy_slots and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            late = list(self._running.values())
        for _, abort, _ in late:
            abort("the slave drained past its grace period", requeue=True)
        for t in slots:
            t.join()
        self._results.put(None)
        reporter.join()
        if self._requeue:
            self._call_quietly("release", self.name, self._requeue)
            log.info("slave %s requeued %d job(s) still running after the grace period",
                     self.name, len(self._requeue))  # fmt: skip
        self._call_quietly("goodbye", self.name)
        for slot in self._slots:
            slot.close()
        log.info("slave %s stopped: %d jobs done, %d failed", self.name, self._done, self._failed)

    def _call_quietly(self, method: str, *args: Any) -> Any:
        try:
            return self.link.call(method, *args)
        except ConnectError as exc:
            log.warning("slave %s: %s during shutdown: %s", self.name, method, exc)
            return None

    # -- fetching ------------------------------------------------------------

    def _room(self) -> tuple[int, int]:
        """(free places, the fewest worth a round trip to the master)."""
        prefetch = self.concurrency
        if self._avg > 0:
            prefetch = math.ceil(self.concurrency * TARGET_BATCH_SECONDS / self._avg)
        target = self.concurrency + min(MAX_PREFETCH, prefetch)
        return target - len(self._queue) - len(self._running), max(1, target // 2)

    def _fetch_loop(self) -> None:
        while not self._draining.is_set():
            with self._cond:
                while not self._draining.is_set() and self._room()[0] < self._room()[1]:
                    self._has_room.wait(1.0)
                want = self._room()[0]
            if self._draining.is_set():
                return
            try:
                leases, funcs = self.link.call("lease", self.name, want, LONG_POLL)
            except UnknownWorker:
                if not self._draining.is_set():
                    self._register()
                continue
            except ConnectError:
                return
            with self._cond:
                self._funcs.update(funcs)
                if self._draining.is_set():
                    back = [(lease.job_id, lease.lease) for lease in leases]
                    if back:
                        self._call_quietly("release", self.name, back)
                    return
                self._queue.extend(leases)
                self._cond.notify_all()

    # -- running -------------------------------------------------------------

    def _take(self) -> list[Lease] | None:
        with self._cond:
            while not self._queue and not self._draining.is_set():
                self._cond.wait()
            if self._draining.is_set():
                return None
            first = self._queue.popleft()
            batch = [first]
            if first.kind == "python" and first.timeout is None and 0 < self._avg < SHORT_JOB:
                # tiny jobs go to the child in batches: one pipe round trip per job costs more
                share = math.ceil((len(self._queue) + 1) / self.concurrency)
                limit = min(MAX_CHILD_BATCH, share)
                while (
                    len(batch) < limit
                    and self._queue
                    and self._queue[0].kind == "python"
                    and self._queue[0].timeout is None  # deadlines are kept one job at a time
                ):
                    batch.append(self._queue.popleft())
            self._busy_slots += 1
            return batch

    def _slot_loop(self, slot: PythonSlot) -> None:
        while (batch := self._take()) is not None:
            abort = Abort()
            with self._cond:
                for lease in batch:
                    self._running[lease.job_id, lease.lease] = (lease, abort, slot)
            self._log_start(batch)
            if batch[0].kind == "shell":
                self._finish(run_shell(batch[0], self.settings.output_limit, abort), abort)
                rest: list[Lease] = []
            else:
                done = functools.partial(self._finish, abort=abort)
                rest = slot.run(batch, self._funcs, abort, done)
            with self._cond:
                for lease in rest:
                    self._running.pop((lease.job_id, lease.lease), None)
                if self._draining.is_set():
                    self._requeue.extend((lease.job_id, lease.lease) for lease in rest)
                else:
                    self._queue.extendleft(reversed(rest))
                self._busy_slots -= 1
                self._cond.notify_all()

    def _finish(self, outcome: Outcome, abort: Abort) -> None:
        with self._cond:
            self._running.pop((outcome.job_id, outcome.lease), None)
            self._avg = (
                outcome.duration if not self._avg else 0.8 * self._avg + 0.2 * outcome.duration
            )
            free, worth = self._room()
            if free >= worth:
                self._has_room.notify()
        if abort.requeue:
            self._requeue.append((outcome.job_id, outcome.lease))
            return
        abort.reason = None  # the next job in a batch starts clean
        self._done += 1
        if not outcome.ok:
            self._failed += 1
        self._results.put(outcome)
        if self._log_ok():
            if outcome.ok:
                log.info("job %d succeeded in %.3fs", outcome.job_id, outcome.duration)
            else:
                reason = (outcome.error or "").strip().splitlines()[-1:] or [""]
                log.info("job %d failed after %.3fs: %s", outcome.job_id, outcome.duration,
                         reason[0])  # fmt: skip

    def _log_start(self, batch: list[Lease]) -> None:
        for lease in batch:
            if not self._log_ok():
                return
            if lease.kind == "shell":
                command, use_shell = lease.payload
                shown = command if use_shell else " ".join(command)
            else:
                shown = "python callable"
            log.info("job %d running: %s", lease.job_id, shown)

    # -- reporting and heartbeats ----------------------------------------------

    def _report_loop(self) -> None:
        last = 0.0
        while (first := self._results.get()) is not None:
            batch, stop = [first], False
            if time.monotonic() - last < REPORT_GAP and self._running:
                time.sleep(REPORT_GAP)  # busy with more: let outcomes gather into one message
            while len(batch) < 1000:
                try:
                    item = self._results.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            last = time.monotonic()
            reply = self._call_quietly("report", self.name, batch)
            if reply:
                self._give_back(reply[2])
            if stop:
                return

    def _heartbeat_loop(self) -> None:
        while not self._draining.wait(self.heartbeat_seconds):
            with self._cond:
                waiting = [lease.job_id for lease in self._queue]
                running = [job_id for job_id, _ in self._running]
            try:
                reply = self.link.call("heartbeat", self.name, False, running, waiting)
            except ConnectError:
                continue
            except AuthError as exc:
                log.error("%s", exc)
                continue
            if not reply["known"]:
                log.warning("master did not know slave %s (restarted, or it gave us up); "
                            "registering again", self.name)  # fmt: skip
                self._register()
            self._cancel(reply["cancel"])
            self._give_back(reply.get("give_back", 0))
            self._touch_health()

    def _give_back(self, n: int) -> None:
        """Hand the last ``n`` unstarted jobs back to the master for idle slaves."""
        with self._cond:
            back = [self._queue.pop() for _ in range(min(n, len(self._queue)))]
        if back:
            self._call_quietly("release", self.name, [(b.job_id, b.lease) for b in back])
            log.info("slave %s handed %d queued job(s) to idle slaves", self.name, len(back))

    def _cancel(self, job_ids: list[int]) -> None:
        with self._cond:
            for job_id in job_ids:
                for lease in [q for q in self._queue if q.job_id == job_id]:
                    self._queue.remove(lease)
                for lease, abort, slot in self._running.values():
                    if lease.job_id != job_id:
                        continue
                    if lease.kind == "shell" or (slot and slot.current is lease):
                        log.info("job %d cancelled by request; killing it", job_id)
                        abort("cancelled by request")

    def _touch_health(self) -> None:
        try:
            Path(self.settings.health_file).touch()
        except OSError as exc:
            log.debug("cannot touch health file %s: %s", self.settings.health_file, exc)

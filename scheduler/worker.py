"""The slave's engine: fetch leases in batches, run them in slots, report in batches.

Threads: one per slot running jobs; one fetcher (leases more work while every slot is
busy and there is room); one reporter (sends outcomes batched under load, until the
master has saved them); one heartbeat (says what the slave holds, learns what to drop;
it beats until the slave says goodbye, draining included). An idle slot long-polls for
work itself, and a slot that finds the slave otherwise idle reports its outcome itself:
a lone job crosses no thread of the slave. One lease call is in flight at a time
(``_fetching``), whoever makes it, so replies are taken in in order (``Holding.fetched``).

A job stays in what the slave *holds* from the moment its lease arrives until the
master has acknowledged its outcome, so there is no moment at which a heartbeat could
make the master think a running or finishing job was lost.
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

from .errors import AuthError, ConnectError, SchedulerError, UnknownWorker
from .progress import RateLimit
from .protocol import VERSION, Holding, Lease, Leased, Outcome, Registered, Reply, Reported
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
RETRY_SECONDS = 1.0  # after an unexpected error from the master


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
        self._func_refs: dict[str, int] = {}  # digest -> leases held that call it
        # keyed by (job id, lease): after a master restart the same job can come twice
        self._running: dict[tuple[int, int], tuple[Lease, Abort, PythonSlot | None]] = {}
        self._reporting: set[tuple[int, int]] = set()  # finished, not yet saved by the master
        self._void: set[tuple[int, int]] = set()  # dropped by the master: never report
        self._results: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._requeue: list[tuple[int, int]] = []
        self._draining = threading.Event()
        self._gone = threading.Event()  # said goodbye: heartbeats stop
        self._seq = 0  # numbers our lease calls
        self._fetching = False  # a lease call is in flight (one at a time)
        self._idle = 0  # slots waiting for work (they fetch it themselves)
        self._sending = 0  # report calls in flight
        self._direct = 0  # slots reporting their own outcome (they fetch next themselves)
        self._drained = True  # the last lease got less than asked: no prefetching
        self._fetched = 0  # the last lease reply taken in
        self._avg = 0.0  # moving average of job run time, seconds
        self._slots = [
            PythonSlot(settings.output_limit, settings.result_limit)
            for _ in range(self.concurrency)
        ]
        self._busy_slots = 0
        self._log_ok = RateLimit(time.time)
        self._done = 0
        self._failed = 0
        self.heartbeat_seconds = settings.heartbeat_seconds or settings.lease_seconds / 3

    # -- lifecycle -----------------------------------------------------------

    def run(self) -> int:
        """Serve until ``stop`` is set, then drain; returns the exit status."""
        # what a job needs to find its master (a Client inside a job) and its slave
        os.environ["SCHEDULER_MASTER"] = "{}:{}".format(*self.settings.master)
        os.environ["SCHEDULER_WORKER_NAME"] = self.name
        self._register()
        threads = [threading.Thread(target=self._slot_loop, args=(s,), name=f"slot-{i}")
                   for i, s in enumerate(self._slots)]  # fmt: skip
        reporter = threading.Thread(target=self._report_loop, name="reporter")
        for t in [*threads, reporter]:
            t.start()
        fetcher = threading.Thread(target=self._fetch_loop, name="fetcher", daemon=True)
        fetcher.start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        # never an endless wait: a signal the kernel hands to another thread only sets a
        # flag that the main thread (which runs Python's handlers) sees when it next runs
        while not self._stop.wait(0.5):
            pass
        self._drain(threads, reporter, fetcher)
        return 0

    def holding(self) -> Holding:
        """What this slave holds, for register and heartbeats (see protocol.Holding)."""
        with self._cond:
            waiting = tuple(lease.job_id for lease in self._queue)
            held = [(lease.job_id, lease.lease) for lease in self._queue]
            held += [key for key in self._running if key not in self._void]
            held += [key for key in self._reporting if key not in self._void]
            return Holding(tuple(held), waiting, self._fetched, self._draining.is_set())

    def _register(self) -> None:
        info = Registered(*self.link.call("register", self.name, socket.gethostname(),
                                          os.getpid(), self.concurrency,
                                          tuple(self.holding()), VERSION,
                                          self.settings.worker_labels or None))  # fmt: skip
        self.heartbeat_seconds = self.settings.heartbeat_seconds or info.heartbeat_seconds
        log.info("slave %s connected to master %s:%d with %d processes", self.name,
                 *self.settings.master, self.concurrency)  # fmt: skip
        self._apply(Reply(*info.reply))
        self._touch_health()

    def _drain(
        self, slots: list[threading.Thread], reporter: threading.Thread, fetcher: threading.Thread
    ) -> None:
        grace = self.settings.grace_seconds
        log.info("slave %s draining: taking no new jobs, %.0fs grace for running ones "
                 "(Ctrl-C again to stop now and hand them back)", self.name, grace)  # fmt: skip
        with self._cond:
            self._draining.set()
            unstarted = [lease for lease in self._queue]
            self._queue.clear()
            self._cond.notify_all()
            self._has_room.notify_all()
        for lease in unstarted:
            self._unref(lease)
        self._beat()  # tells the master we drain; wakes our own long-poll, empty
        fetcher.join(LONG_POLL + 1)  # whatever it still got, it hands back itself
        if unstarted:
            self._call_quietly("release", self.name, [(x.job_id, x.lease) for x in unstarted])
            log.info("slave %s handed back %d unstarted job(s)", self.name, len(unstarted))
        self._stop.clear()  # a second Ctrl-C / SIGTERM ends the grace period
        deadline = time.monotonic() + grace
        with self._cond:
            while self._busy_slots and time.monotonic() < deadline and not self._stop.is_set():
                self._cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))
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
        self._gone.set()
        for slot in self._slots:
            slot.close()
        log.info("slave %s stopped: %d jobs done, %d failed", self.name, self._done, self._failed)

    def _call_quietly(self, method: str, *args: Any) -> Any:
        try:
            return self.link.call(method, *args)
        except SchedulerError as exc:
            log.warning("slave %s: %s during shutdown: %s", self.name, method, exc)
            return None

    # -- fetching ------------------------------------------------------------

    def _room(self) -> tuple[int, int]:
        """(free places, the fewest worth a round trip to the master).

        Beyond its slots, a slave holds about TARGET_BATCH_SECONDS of work per slot, and
        none when jobs are longer (or not yet timed): a job held here waits behind the
        runs before it, and a job of higher priority submitted meanwhile would wait
        behind it too."""
        prefetch = 0
        if self._avg > 0:
            prefetch = int(self.concurrency * TARGET_BATCH_SECONDS / self._avg)
        target = self.concurrency + min(MAX_PREFETCH, prefetch)
        return target - len(self._queue) - len(self._running), max(1, target // 2)

    def _fetch_loop(self) -> None:
        while not self._draining.is_set():
            with self._cond:
                while not self._draining.is_set() and (
                    self._fetching or self._idle or self._direct or self._drained
                    or self._room()[0] < self._room()[1]
                ):  # idle slots fetch for themselves; this thread keeps busy slots fed
                    self._has_room.wait(1.0)
                if self._draining.is_set():
                    return
                self._fetching = True
            self._fetch()

    def _fetch(self) -> None:
        """One lease call, by whoever set ``_fetching``; queues what came and clears it."""
        try:
            self._fetch_once()
        except ConnectError as exc:
            if not (self._draining.is_set() or self._stop.is_set()):
                log.warning("slave %s: fetching work: %s", self.name, exc)
                time.sleep(RETRY_SECONDS)
        except Exception as exc:  # whatever the master says, fetching goes on
            log.error("slave %s: fetching work failed, retrying: %r", self.name, exc)
            time.sleep(RETRY_SECONDS)
        finally:
            with self._cond:
                self._fetching = False
                self._cond.notify_all()
                if not self._drained:  # the fetcher has nothing to do while drained
                    self._has_room.notify_all()

    def _fetch_once(self) -> None:
        with self._cond:
            want = self._room()[0]
            self._seq += 1
            seq = self._seq
        if self._draining.is_set() or want <= 0:
            return
        try:
            leases, funcs = Leased(*self.link.call("lease", self.name, want, LONG_POLL, seq))
        except UnknownWorker:
            if not self._draining.is_set():
                self._register_again()
            return
        self._take_in(leases, funcs, seq, want)

    def _take_in(self, wire: list[tuple], funcs: dict[str, bytes], seq: int, want: int) -> None:
        """Queue the work a lease reply brought (hand it back if we drain meanwhile)."""
        leases = [Lease._make(t) for t in wire]
        with self._cond:
            self._fetched = seq
            self._drained = len(leases) < want
            for digest, body in funcs.items():
                self._funcs.setdefault(digest, body)
            for lease in leases:
                self._ref(lease)
            if not self._draining.is_set():
                self._queue.extend(leases)
                if any(x.priority for x in self._queue):
                    # highest priority first, in the order they came within one (stable)
                    ordered = sorted(self._queue, key=lambda x: -x.priority)
                    self._queue.clear()
                    self._queue.extend(ordered)
                self._cond.notify_all()
                return
        if leases:
            for lease in leases:
                self._unref(lease)
            self._call_quietly("release", self.name, [(x.job_id, x.lease) for x in leases])

    def _ref(self, lease: Lease) -> None:
        if lease.kind == "python":
            digest = lease.payload[0]
            self._func_refs[digest] = self._func_refs.get(digest, 0) + 1

    def _unref(self, lease: Lease) -> None:
        """The slave is done with a lease: forget a function body nothing else calls."""
        if lease.kind != "python":
            return
        digest = lease.payload[0]
        left = self._func_refs.get(digest, 0) - 1
        if left > 0:
            self._func_refs[digest] = left
        else:
            self._func_refs.pop(digest, None)
            self._funcs.pop(digest, None)

    # -- running -------------------------------------------------------------

    def _take(self, slot: PythonSlot) -> tuple[list[Lease], Abort, dict[str, bytes]] | None:
        """The next batch for ``slot``: taken off the queue and entered as running in one
        step, so that no heartbeat ever sees the slave without it (the master would take
        it for lost in transit and hand it out again)."""
        with self._cond:
            while not self._queue and not self._draining.is_set():
                if not self._fetching:  # long-poll ourselves: no hand-off when work comes
                    self._fetching = True
                    self._cond.release()
                    try:
                        self._fetch()
                    finally:
                        self._cond.acquire()
                    continue
                self._idle += 1
                try:
                    self._cond.wait()
                finally:
                    self._idle -= 1
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
            abort = Abort()
            for lease in batch:
                self._running[lease.job_id, lease.lease] = (lease, abort, slot)
            # the bodies this batch calls (others may leave self._funcs meanwhile)
            funcs = {x.payload[0]: self._funcs[x.payload[0]] for x in batch
                     if x.kind == "python" and x.payload[0] in self._funcs}  # fmt: skip
            return batch, abort, funcs

    def _slot_loop(self, slot: PythonSlot) -> None:
        while (taken := self._take(slot)) is not None:
            batch, abort, funcs = taken
            self._log_start(batch)
            if batch[0].kind == "shell":
                self._finish(run_shell(batch[0], self.settings.output_limit, abort), abort)
                rest: list[Lease] = []
            else:
                done = functools.partial(self._finish, abort=abort)
                rest = slot.run(batch, funcs, abort, done)
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
        key = (outcome.job_id, outcome.lease)
        with self._cond:
            entry = self._running.pop(key, None)
            void = key in self._void
            self._void.discard(key)
            if not void and not abort.requeue:
                self._reporting.add(key)  # held until the master has saved the outcome
            if entry is not None:
                self._unref(entry[0])  # run, dropped or handed back: its body is not needed
            self._avg = (
                outcome.duration if not self._avg else 0.8 * self._avg + 0.2 * outcome.duration
            )
            free, worth = self._room()
            if free >= worth and not self._drained:
                self._has_room.notify()
            # nothing else to do or to send: report it ourselves, no hand-off; and after
            # a long job too (the round trip is small beside it): the slot then hears what
            # the master says (hand back jobs held ahead for higher priority work) before
            # it takes the next job held here
            idle = (not self._running and not self._queue and not self._sending
                    and self._results.empty())  # fmt: skip
            direct = not void and not abort.requeue and (
                idle or outcome.duration >= TARGET_BATCH_SECONDS)
            if direct:
                self._sending += 1
                self._direct += 1
            # ... and ask for the next work in the same call
            fuse = (direct and idle and not self._fetching and not self._draining.is_set()
                    and free > 0)  # fmt: skip
            if fuse:
                self._fetching = True
                self._seq += 1
                ask = (free, LONG_POLL, self._seq)
        if void:
            return
        if abort.requeue:
            self._requeue.append(key)
            return
        abort.reason = None  # the next job in a batch starts clean
        self._done += 1
        if not outcome.ok:
            self._failed += 1
        if self._log_ok():
            if outcome.ok:
                log.info("job %d succeeded in %.3fs", outcome.job_id, outcome.duration)
            else:
                reason = (outcome.error or "").strip().splitlines()[-1:] or [""]
                log.info("job %d failed after %.3fs: %s", outcome.job_id, outcome.duration,
                         reason[0])  # fmt: skip
        if not direct:
            self._results.put(outcome)
            return
        try:
            reply = self._send_report([outcome], ask if fuse else None)
            if fuse and reply is not None:
                if not reply.known:
                    self._register_again()
                else:
                    self._take_in(list(reply.leases), reply.funcs, ask[2], ask[0])
        finally:
            with self._cond:
                self._direct -= 1
                if fuse:
                    self._fetching = False
                    self._cond.notify_all()
                if not self._drained:
                    self._has_room.notify_all()

    def _log_start(self, batch: list[Lease]) -> None:
        for lease in batch:
            if not self._log_ok():
                return
            if lease.kind == "shell":
                command, use_shell = lease.payload[:2]
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
            with self._cond:
                self._sending += 1
            self._send_report(batch)
            if stop:
                return

    def _send_report(
        self, batch: list[Outcome], ask: tuple[int, float, int] | None = None
    ) -> Reported | None:
        """Report until the master has them (or, stopping, until it cannot be reached).

        ``ask``: lease arguments for work in the same call. The caller counted itself in
        ``_sending``; this uncounts it.
        """
        try:
            reply = self._report(batch, ask)
        finally:
            with self._cond:
                self._sending -= 1
                self._reporting.difference_update((o.job_id, o.lease) for o in batch)
        if reply:
            self._give_back(reply.give_back, reply.yield_to)
        return reply

    def _report(self, batch: list[Outcome], ask: tuple | None) -> Reported | None:
        wire = [tuple(o) for o in batch]  # see protocol: per-job messages
        while True:
            try:
                reply = Reported(*self.link.call("report", self.name, wire, ask))
                break
            except ConnectError as exc:
                if self._stop.is_set() or self._draining.is_set():
                    log.warning("slave %s: %d outcome(s) not delivered: %s", self.name,
                                len(batch), exc)  # fmt: skip
                    reply = None
                    break
                time.sleep(RETRY_SECONDS)  # a refusal comes back at once: no busy loop
            except Exception as exc:
                log.error("slave %s: reporting %d outcome(s) failed, retrying: %r", self.name,
                          len(batch), exc)  # fmt: skip
                time.sleep(RETRY_SECONDS)
        return reply  # type: ignore[no-any-return]

    def _heartbeat_loop(self) -> None:
        while not self._gone.wait(self.heartbeat_seconds):
            try:
                self._beat()
            except Exception as exc:  # the heartbeat must outlive anything the master says
                log.error("slave %s: heartbeat failed: %r", self.name, exc)

    def _beat(self) -> None:
        try:
            reply = Reply(*self.link.call("heartbeat", self.name, tuple(self.holding())))
        except AuthError as exc:
            log.error("%s", exc)
            return
        except ConnectError:
            return
        if not reply.known:
            if self._gone.is_set():
                return
            self._register_again()
            return
        self._apply(reply)
        self._touch_health()

    def _register_again(self) -> None:
        log.warning("master did not know slave %s (restarted, or it gave us up); "
                    "registering again with what we hold", self.name)  # fmt: skip
        self._register()

    def _apply(self, reply: Reply) -> None:
        if reply.exit:
            log.error("slave %s: `scheduler verify` asked this slave to die now", self.name)
            logging.shutdown()
            os._exit(137)
        self._drop(reply.drop, set(reply.cancelled))
        self._give_back(reply.give_back, reply.yield_to)

    def _give_back(self, n: int, below: int | None = None) -> None:
        """Hand the last ``n`` unstarted jobs back to the master for idle slaves, and
        every unstarted job of lower priority than ``below`` (a job of that priority
        waits at the master: it must not wait behind them)."""
        if not n and below is None:
            return
        with self._cond:
            back = [self._queue.pop() for _ in range(min(n, len(self._queue)))]
            if below is not None and any(x.priority < below for x in self._queue):
                back += [x for x in self._queue if x.priority < below]
                kept = [x for x in self._queue if x.priority >= below]
                self._queue.clear()
                self._queue.extend(kept)
            for lease in back:
                self._unref(lease)
        if back:
            self._call_quietly("release", self.name, [(b.job_id, b.lease) for b in back])
            why = "to idle slaves" if below is None else f"for priority {below} work"
            log.info("slave %s handed back %d queued job(s) %s", self.name, len(back), why)

    def _drop(self, drops: tuple[tuple[int, int], ...], cancelled: set[int]) -> None:
        """Stop runs the master no longer counts as ours; never report them."""
        with self._cond:
            for job_id, lease_no in drops:
                key = (job_id, lease_no)
                for lease in [q for q in self._queue if (q.job_id, q.lease) == key]:
                    self._queue.remove(lease)
                    self._unref(lease)
                self._reporting.discard(key)
                entry = self._running.get(key)
                if entry is None:
                    continue
                self._void.add(key)
                lease, abort, slot = entry
                if lease.kind == "shell" or (slot and slot.current is lease):
                    why = (
                        "cancelled by request" if job_id in cancelled
                        else "its lease went elsewhere"
                    )  # fmt: skip
                    log.info("job %d %s; killing it", job_id, why)
                    abort(why)

    def _touch_health(self) -> None:
        try:
            Path(self.settings.health_file).touch()
        except OSError as exc:
            log.debug("cannot touch health file %s: %s", self.settings.health_file, exc)

"""A model-based (stateful) test of the master's board, ``scheduler/board.py``.

Hypothesis drives a small simulated cluster through random interleavings, one event a
step (see EVENTS): three slaves (more join when some die or leave), each with its own
view (leases queued but not started, runs, finished outcomes claimed until acknowledged
and the reporter's copies it sends until then, the seq of its last lease call and of the
last reply it took in); a fake clock; and a "journal" of frozen job records taken with
``board.take_dirty()`` where the service writes (a submit, a report before its ack, a
cancel; the tick's write, or not yet). Lease replies, reports and heartbeats travel: they
arrive late, or never (a lease call is then retried with the same seq). Slaves die, are
cut off (briefly, or past their lease while the master expires them), come back and
register again with their claims, drain and say goodbye; clients submit and cancel; old
finished jobs are evicted; and the master crashes: a new ``Board`` is restored from the
journal alone, above the reserved lease ceiling as ``scheduler/master.py`` does it.

Checked after every step, or at the call that could break it:

* Bookkeeping: every accepted job is in memory or (evicted, not loaded) only in the
  journal, in one state; ``counts`` are the real counts, ``total`` the jobs accepted,
  across restarts; every accepted job is in the journal; evicted jobs are there in their
  final state.
* Outcomes: a report is applied exactly when the reporting slave holds the job's lease
  (its current one; or, queued, the one it was requeued from; or a later one than the
  journal saw, from an earlier master): never from a run that was dropped or whose job
  went elsewhere. A finished job stays finished in the same state (once saved: across
  restarts too); what a client saw stays, unless the slave that ran it died or went silent.
* Leases: no lease number is handed out twice, across restarts; a retried lease call gets
  the same leases back and nothing new.
* The board's view of slaves: ``expire`` forgets a slave exactly when it was silent for
  longer than ``lease_seconds``; a slave heard from within ``lease_seconds`` keeps every
  job it holds (running under that very lease, finished by its own report, or cancelled),
  after a master restart too once it registered again; a ``drop`` never names a lease
  the board still counts as the slave's, nor an outcome of its own the journal does not
  have yet; a running job always has a worker the board knows (or it could never be
  requeued); after a restart, running jobs stay running, on placeholders.
* Exactly once on healthy histories: slaves start a job once, unless a slave that held it
  died or was silent (cut off, or not scheduled) for longer than ``lease_seconds``. A
  master crash and restart never cause a second run.
* Nothing lost: at the end of every example partitions heal and the live slaves work,
  heartbeat and report while time passes, until every accepted job is finished.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from scheduler.board import RECONNECT_SECONDS, Board, Holding, Journaled, Outcome, Reply
from scheduler.errors import UnknownWorker
from scheduler.job import Job, JobSpec, State

LEASE = 10.0  # lease_seconds
BLOCK = 4  # leases reserved per journal write: tiny, so reservations happen often
KEEP_LOADED = 2  # finished jobs a restarted master loads (keep_finished)
WINDOW = 3  # queued job records kept in memory; the others wait cold, in the journal
REFILL = 2  # cold jobs read back at a time
NAMES = ("s0", "s1", "s2")
SETTLE_ROUNDS = 60  # rounds of "everybody works a bit" in which all jobs must finish
GPU = {"gpu": "1"}


def labels(name: str) -> dict[str, str]:
    """Slaves with an even number carry gpu=1 (s0, s2, ...)."""
    return GPU if int(name[1:]) % 2 == 0 else {}

Key = tuple[int, int]  # (job id, lease)

# What can happen, one a step, as (what, its arguments...), and how often (per 32 steps).
_slave = st.sampled_from(NAMES)  # the slave that acts (if it cannot, the next one that can)
EVENTS: dict[str, tuple[int, tuple[st.SearchStrategy, ...]]] = {
    "lease": (6, (
        _slave,
        st.integers(1, 3),  # how many jobs it asks for
        st.sampled_from(["take", "take", "in_flight", "lost"]),  # the fate of the reply
        st.booleans(),  # retry the call whose reply was lost (same seq), if there is one
        st.integers(0, 2),  # how many of them it starts at once
    )),
    "work": (6, (
        _slave,
        st.integers(0, 2),  # start this many queued leases
        st.integers(0, 2),  # finish this many runs
        st.booleans(),  # ok
        # the fate of its report of every outcome not yet acknowledged
        st.sampled_from(["none", "acked", "acked", "ack_lost", "unsaved", "in_flight", "lost"]),
    )),
    "heartbeat": (2, (_slave, st.booleans())),  # late: overtaken by later calls
    # something travelling (or the next thing travelling) arrives, or is lost
    "arrive": (2, (_slave, st.sampled_from(["reply", "report", "beat"]), st.booleans())),
    "cut": (1, (_slave, st.booleans())),  # stall: longer than the lease
    "heal": (1, (_slave,)),
    "die": (1, (_slave,)),
    "drain": (1, (_slave,)),
    "goodbye": (1, (_slave,)),
    "join": (1, ()),
    # n, attempts (slave deaths), retries (failed runs tried again, after a backoff)
    "submit": (2, (st.integers(1, 3), st.sampled_from([None, None, 1, 2]),
                   st.sampled_from([0, 0, 1, 2]),
                   st.sampled_from([0, 0, 1, 2]),  # after the last k accepted
                   st.sampled_from([0, 0, 0, 1, 2, -1]),  # priority
                   st.sampled_from([None, None, "gpu"]),  # requires gpu=1
                   st.sampled_from([None, None, 0, 1, 2]))),  # an array with this cap
    # fmt: skip
    "cancel": (1, (st.integers(0, 64),)),  # which job (modulo)
    "tick": (3, (
        st.sampled_from([0.5, LEASE / 3, LEASE + 0.5, LEASE + RECONNECT_SECONDS + 0.5]),
        st.booleans(),  # every reachable slave heartbeats at the end
    )),
    "expire": (2, (st.booleans(),)),  # the tick: and write the journal (and roster)
    "evict": (1, (st.integers(0, 2),)),  # keep
    "crash": (2, (st.sampled_from(["later", "at once", "at once, last first"]),)),
}  # fmt: skip
STEPS = st.one_of(  # weighted by repeating (distinct but equal) strategies
    [st.tuples(st.just(kind), *args) for kind, (n, args) in EVENTS.items() for _ in range(n)]
)


@dataclass
class Slave:
    """A slave process as it sees itself."""

    name: str
    alive: bool = True  # False: died, never calls again
    gone: bool = False  # said goodbye
    partitioned: bool = False  # alive, but nothing it sends arrives
    draining: bool = False
    waiting: list[Key] = field(default_factory=list)  # leases taken in, not started
    running: list[Key] = field(default_factory=list)
    reporting: set[Key] = field(default_factory=set)  # finished, claimed until acknowledged
    # the reporter's outcomes: sent (again) until a reply says the master saved them,
    # even if a heartbeat's reply told the slave to drop the claim meanwhile
    unacked: dict[Key, Outcome] = field(default_factory=dict)
    report_in_flight: list[Outcome] | None = None
    beat_in_flight: Holding | None = None  # a heartbeat overtaken by the slave's other calls
    seq: int = 0  # its last lease call
    fetched: int = 0  # the last lease reply it took in
    reply_in_flight: tuple[int, list[Key]] | None = None  # (seq, leases) not yet taken in
    lost_seq: int | None = None  # a lease call whose reply was lost: may be retried
    # what the current master knows of it, per the model: when it last heard from it
    # as a registered worker (its ``last_seen``), None when it does not know it
    heard: float | None = None
    last_call: float = 0.0  # when any master last heard from it
    last_lease_call: tuple[int, list[Key]] | None = None  # as delivered to this master

    @property
    def reachable(self) -> bool:
        return self.alive and not self.gone and not self.partitioned

    @property
    def working(self) -> bool:
        return self.alive and not self.gone

    def keys(self) -> list[Key]:
        return [*self.waiting, *self.running, *self.reporting]

    def holding(self) -> Holding:
        return Holding(
            tuple(self.keys()), tuple(j for j, _ in self.waiting), self.fetched, self.draining
        )

    def every_key(self) -> set[Key]:
        """Every lease this slave might run or report, now or later."""
        keys = {*self.keys(), *self.unacked}
        if self.reply_in_flight is not None:
            keys.update(self.reply_in_flight[1])
        return keys

    def forget(self, key: Key) -> None:
        if key in self.waiting:
            self.waiting.remove(key)
        if key in self.running:
            self.running.remove(key)
        self.reporting.discard(key)


def reachable(s: Slave) -> bool:
    return s.reachable


def working(s: Slave) -> bool:
    return s.working


def partitioned(s: Slave) -> bool:
    return s.working and s.partitioned


def can_lease(s: Slave) -> bool:
    return s.reachable and not s.draining and s.reply_in_flight is None


def can_work(s: Slave) -> bool:
    return s.working and bool(s.waiting or s.running or can_report(s))


def can_report(s: Slave) -> bool:
    return s.reachable and s.report_in_flight is None and bool(s.unacked)


def has_mail(s: Slave) -> bool:
    return s.reachable and (
        s.reply_in_flight is not None
        or s.report_in_flight is not None
        or s.beat_in_flight is not None
    )


def can_drain(s: Slave) -> bool:
    return s.working and not s.draining


def can_leave(s: Slave) -> bool:
    return (
        s.reachable
        and s.draining
        and not s.keys()
        and not s.unacked
        and s.reply_in_flight is None
        and s.report_in_flight is None
    )


SLAVE_ACTS: dict[str, Callable[[Slave], bool]] = {  # who can do what
    "lease": can_lease, "work": can_work, "heartbeat": reachable, "arrive": has_mail,
    "cut": reachable, "heal": partitioned, "die": working, "drain": can_drain,
    "goodbye": can_leave,
}  # fmt: skip


class BoardModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.epoch = 0  # master incarnations
        self.journal: dict[int, Job] = {}
        self.unscheduled: list[Job] = []  # retries whose failure is not saved yet
        self.journal_ceiling = 0  # the lease ceiling reserved in the journal (meta)
        self.roster: set[str] = set()  # the slaves registered, as the journal has it
        self.accepted: set[int] = set()
        self.offboard: dict[int, State] = {}  # accepted jobs not in memory (journal only)
        self.saved_finished = 0  # board.finished_total at the last journal write
        self.handed: dict[int, tuple[int, str, int]] = {}  # lease -> (job, slave, epoch)
        self.executions: Counter[int] = Counter()
        self.runs: dict[int, list[tuple[str, int]]] = {}  # job -> (slave, lease) started
        self.tainted: set[int] = set()  # jobs a dead or silent slave held: reruns allowed
        self.stale: set[tuple[str, Key]] = set()  # (slave, lease) it held, dead or silent
        self.applied: dict[int, tuple[str, int]] = {}  # job -> (slave, lease) it finished by
        self.applied_here: dict[int, tuple[str, int]] = {}  # the same, this master
        self.client_saw: dict[int, State] = {}  # outcomes reach clients once applied
        self.terminal_here: dict[int, State] = {}  # finished in this master's memory
        self.terminal_saved: dict[int, State] = {}  # finished in the journal
        self.slaves = {name: Slave(name) for name in NAMES}
        self.board = self._start_master()

    # -- the master ------------------------------------------------------------

    def _clock(self) -> float:
        return self.now

    def _start_master(self) -> Board:
        """What scheduler/master.py does: load the journal, reserve leases, restore."""
        rows = list(self.journal.values())
        finished = sorted((j for j in rows if j.state.terminal), key=lambda j: -j.id)
        queued = sorted((j for j in rows if j.state is State.QUEUED and not j.after),
                        key=lambda j: (-j.priority, j.id))  # fmt: skip
        cold_by: dict[int, list[int]] = {}  # what Journal.load leaves cold, by priority
        for job in queued[WINDOW:]:
            cold_by.setdefault(job.priority, []).append(job.id)
        cold = tuple((min(ids), max(ids), p) for p, ids in sorted(cold_by.items(), reverse=True))
        waiting = [j for j in rows if j.state is State.QUEUED and j.after]  # all loaded
        loaded = [j for j in rows if j.state is State.RUNNING] + queued[:WINDOW] + waiting
        loaded += finished[:KEEP_LOADED]
        here = {j.id for j in loaded}
        deps = {d for j in rows if j.state is State.RUNNING or j in waiting
                for d in j.after or () if d not in here}  # fmt: skip
        max_lease = max([self.journal_ceiling, *(j.lease for j in rows)])
        stored = Journaled(
            len(rows),
            dict(Counter(str(j.state) for j in rows)),
            max((j.id for j in rows), default=0),
            max_lease,
            slaves=tuple(sorted(self.roster)),
            cold=cold,
            dep_states={d: str(self.journal[d].state) for d in deps if d in self.journal},
        )
        self.journal_ceiling = max_lease + BLOCK
        board = Board(
            clock=self._clock,
            lease_seconds=LEASE,
            max_attempts=3,
            first_lease=max_lease + 1,
            lease_ceiling=self.journal_ceiling,
            queue_window=WINDOW,
        )
        board.restore([copy.copy(j) for j in loaded], stored)
        in_memory = {j.id for j in loaded}
        self.offboard = {j.id: j.state for j in rows if j.id not in in_memory
                         and j.state.terminal}  # fmt: skip
        self.saved_finished = board.finished_total
        self.terminal_here, self.applied_here = {}, {}
        self.epoch += 1
        return board

    def _save(self, tick: bool = False) -> None:
        """A journal write: what changed since the last one (and, the master's periodic
        ``tick``, which slaves registered or left: the journal's roster)."""
        if tick:
            roster, self.board.roster = self.board.roster, []
            for name, present in roster:
                (self.roster.add if present else self.roster.discard)(name)
        saved_retries, self.unscheduled = self.unscheduled, []
        for job in self.board.take_dirty(started=tick):
            frozen = copy.copy(job)
            self.journal[job.id] = frozen
            if frozen.state.terminal:
                before = self.terminal_saved.setdefault(job.id, frozen.state)
                assert before is frozen.state, f"job {job.id} saved {before}, then {frozen}"
        self.saved_finished = self.board.finished_total
        self.board.schedule(saved_retries)

    def _where(self, job_id: int) -> str:
        job = self.board.jobs.get(job_id)
        if job is None:
            return f"job {job_id}: not in memory ({self.offboard.get(job_id)})"
        return (
            f"job {job_id}: {job.state} lease {job.lease} worker {job.worker} "
            f"attempts {job.attempts}; runs {self.runs.get(job_id)}; "
            f"tainted {job_id in self.tainted}"
        )

    # -- calls from a slave ------------------------------------------------------

    def _heard(self, s: Slave) -> None:
        """A call from ``s`` arrived; the board renews its lease if it knows it."""
        s.last_call = self.now
        if s.heard is not None:
            s.heard = self.now

    def _warm_claims(self, job_ids: Iterable[int]) -> None:
        """What the service does before register, heartbeat and report: a claimed or
        reported cold job's record is read from the journal, so that it can be adopted."""
        for job_id in job_ids:
            if job_id not in self.board.jobs and self.board.is_cold(job_id):
                self.board.warm(copy.copy(self.journal[job_id]))

    def _refill(self) -> None:
        """The service's tick: cold queued jobs read back as the queue in memory drains."""
        span = self.board.cold_span()
        if span is None:
            return
        first, last, priority = span
        rows = sorted((j for j in self.journal.values()
                       if first <= j.id <= last and j.state is State.QUEUED and not j.after
                       and j.priority == priority),
                      key=lambda j: j.id)[:REFILL]  # fmt: skip
        complete_to = rows[-1].id if len(rows) == REFILL else last
        self.board.refill(first, complete_to, [copy.copy(j) for j in rows], priority)

    def _cold(self) -> set[int]:
        """Accepted jobs waiting cold: neither in memory nor evicted."""
        return self.accepted - set(self.board.jobs) - set(self.offboard)

    def _register(self, s: Slave) -> None:
        holding = s.holding()
        self._warm_claims(j for j, _ in holding.held)
        worker, reply = self.board.register(s.name, holding, labels(s.name))
        worker.concurrency = 2  # what the service records from the call
        # the service saves the roster (and what changed) before it replies
        self._save(tick=True)
        s.heard = s.last_call = self.now
        s.last_lease_call = None
        self._apply(s, reply, holding)

    def _heartbeat(self, s: Slave, holding: Holding | None = None) -> None:
        """A heartbeat with what the slave holds (or held, when it was sent)."""
        s.beat_in_flight = None
        holding = s.holding() if holding is None else holding
        self._warm_claims(j for j, _ in holding.held)
        reply = self.board.heartbeat(s.name, holding)
        assert reply.known == (s.heard is not None), (
            f"{s.name}: heartbeat known={reply.known}, but the model says the master "
            f"{'knows' if s.heard is not None else 'does not know'} it"
        )
        if not reply.known:
            s.last_call = self.now
            self._register(s)
            return
        self._heard(s)
        self._apply(s, reply, holding)
        back = self.board.give_back(s.name)  # the service puts it in the reply
        if back and s.waiting:
            keys = s.waiting[-back:]
            del s.waiting[-back:]
            self._release(s, keys)

    def _apply(self, s: Slave, reply: Reply, claimed: Holding) -> None:
        """The slave acts on the reply to a register or heartbeat that ``claimed``."""
        dropped = {j for j, _ in reply.drop}
        assert set(reply.cancelled) <= dropped, reply
        for job_id, lease in reply.drop:
            job = self.board.jobs.get(job_id)
            assert job is None or not (
                job.state is State.RUNNING and job.lease == lease and job.worker == s.name
            ), f"{s.name} told to drop ({job_id}, {lease}) that is still its lease"
            saved = self.journal.get(job_id)
            assert not (  # a crash now would lose the outcome and rerun the job
                job is not None
                and (s.name, (job_id, lease)) not in self.stale
                and job.state.terminal
                and self.applied_here.get(job_id) == (s.name, lease)
                and not (saved is not None and saved.state.terminal)
            ), (
                f"{s.name} told to drop ({job_id}, {lease}), finished by its outcome, which "
                f"is not saved yet: {self._where(job_id)}; saved {saved and saved.state}"
            )
            s.forget((job_id, lease))  # a run is killed and never reported
        seen = dict(claimed.held)  # (a job claimed twice, under two leases, counts once)
        for job_id, lease in set(s.keys()) & set(seen.items()):  # kept: the board's too
            if (s.name, (job_id, lease)) in self.stale:
                continue  # from before it was silent for long: the board may not know it
            job = self.board.jobs.get(job_id)
            assert (
                job is not None
                and job.state is State.RUNNING
                and (job.lease, job.worker) == (lease, s.name)
            ) or (  # or finished by its own outcome, not yet acknowledged
                (job is None or job.state in (State.SUCCEEDED, State.FAILED))
                and self.applied.get(job_id) == (s.name, lease)
            ), f"{s.name} keeps ({job_id}, {lease}) after reconciling: {self._where(job_id)}"

    def _release(self, s: Slave, keys: list[Key]) -> None:
        if not s.reachable or not keys:
            return  # the call is lost: the master finds out from the next heartbeats
        back = self.board.release(s.name, keys)
        self._heard(s)
        for job in back:
            assert (job.id, job.lease) in keys and job.state is State.QUEUED, self._where(job.id)

    def _lease(self, s: Slave, n: int, seq: int) -> list[Key] | None:
        """A lease call (as Service.lease makes it); None if the slave had to register."""
        s.seq = max(s.seq, seq)
        room = self.board.lease_room()
        if room is not None and room < BLOCK // 2:  # the next block, saved before it is used
            self.journal_ceiling = (self.board.lease_ceiling or 0) + BLOCK
            self.board.lease_ceiling = self.journal_ceiling
        queued = {j.id for j in self.board.jobs.values() if j.state is State.QUEUED}
        retry = s.last_lease_call is not None and s.last_lease_call[0] == seq
        try:
            jobs = self.board.lease(s.name, n, seq)
        except UnknownWorker:
            assert s.heard is None, f"{s.name} heard at {s.heard}, now {self.now}: unknown?"
            s.last_call = self.now
            self._register(s)
            return None
        assert s.heard is not None, f"{s.name} handed jobs while the model says it is unknown"
        self._heard(s)
        keys = [(j.id, j.lease) for j in jobs]
        if not retry:
            self._check_order(s, jobs)
        if retry:
            assert s.last_lease_call is not None
            assert set(keys) <= set(s.last_lease_call[1]), (keys, s.last_lease_call)
        else:
            assert len(keys) <= n
            for job in jobs:
                assert job.id in queued, f"handed a job that was not queued: {self._where(job.id)}"
                assert job.lease not in self.handed, (
                    f"lease {job.lease} handed out twice: to {s.name} for job {job.id}, "
                    f"before {self.handed[job.lease]}"
                )
                assert job.state is State.RUNNING and job.worker == s.name
                self.handed[job.lease] = (job.id, s.name, self.epoch)
            if keys:  # the call a retry with the same seq repeats (an empty one: a new call)
                s.last_lease_call = (seq, keys)
        return keys

    def _check_order(self, s: Slave, handed: list[Job]) -> None:
        """Jobs go to slaves that carry the labels they require, highest priority first:
        no job left in line that this slave could run now ranks above one it got."""
        for job in handed:
            assert not job.requires or labels(s.name) == GPU, f"{s.name} got {self._where(job.id)}"
        if not handed:
            return
        lowest = min(j.priority for j in handed)
        running = Counter(j.array for j in self.board.jobs.values()
                          if j.state is State.RUNNING and j.array is not None)  # fmt: skip
        for job in self.board.jobs.values():
            if (job.state is State.QUEUED and job.not_before is None
                    and not self.board.waits_for(job.id) and not self.board.is_cold(job.id)
                    and (not job.requires or labels(s.name) == GPU)
                    and not (job.array_cap and running[job.array] >= job.array_cap)):  # fmt: skip
                assert job.priority <= lowest, (
                    f"{s.name} got priority {lowest}, {self._where(job.id)} "
                    f"(priority {job.priority}) left in line"
                )

    def _take_in(self, s: Slave, seq: int, keys: list[Key]) -> None:
        s.fetched = max(s.fetched, seq)
        s.lost_seq = None
        held = set(s.keys())
        fresh = [k for k in keys if k not in held]
        if s.draining:  # whatever the fetcher still got, it hands back
            self._release(s, fresh)
        else:
            s.waiting.extend(fresh)

    def _start(self, s: Slave, pick: int) -> None:
        """The slave starts a lease it queued: an execution."""
        key = s.waiting.pop(pick % len(s.waiting))
        s.running.append(key)
        job_id = key[0]
        self.executions[job_id] += 1
        self.runs.setdefault(job_id, []).append((s.name, key[1]))
        record = self.board.jobs.get(job_id) or self.journal.get(job_id)  # (cold: journal)
        retried = record.failures if record is not None else 0  # failed runs tried again
        for dep in (record.after or ()) if record is not None else ():
            state = self._state(dep)
            assert state is State.SUCCEEDED, f"job {job_id} started while {dep} is {state}"
        assert self.executions[job_id] <= 1 + retried or job_id in self.tainted, (
            f"job {job_id} started a second time on a healthy history: {self._where(job_id)}"
        )

    def _finish(self, s: Slave, pick: int, ok: bool) -> None:
        job_id, lease = key = s.running.pop(pick % len(s.running))
        s.reporting.add(key)
        s.unacked[key] = Outcome(
            job_id, lease, ok, error=None if ok else "exited with 1", exit_code=0 if ok else 1,
            duration=1.0,
        )  # fmt: skip

    def _deliver_report(self, s: Slave, outs: list[Outcome], *, save: bool, ack: bool) -> None:
        self._warm_claims(o.job_id for o in outs)  # the service reads cold ones back first
        expected: dict[Key, bool] = {}
        now_terminal: set[int] = set()
        retrying: set[Key] = set()  # failed, with retries left: applied, the job queued again
        for out in outs:
            job = self.board.jobs.get(out.job_id)
            if job is None or job.state.terminal or out.job_id in now_terminal:
                ok = False
            else:  # its lease (running; or queued: requeued from it), or a later one than
                # the journal saw, from an earlier master (that lease ended there)
                ok = (job.lease, job.worker) == (out.lease, s.name) or (
                    self.handed[out.lease][2] < self.epoch and job.lease < out.lease
                )
            expected[out.job_id, out.lease] = ok
            if ok:
                now_terminal.add(out.job_id)
                if not out.ok and job is not None and job.failures < job.retries:
                    retrying.add((out.job_id, out.lease))
        before = {o.job_id: self._where(o.job_id) for o in outs}
        finished, rejected = self.board.complete(s.name, outs)
        retried, self.board.retried = {j.id: j for j in self.board.retried}, []
        released, self.board.released = self.board.released, []
        self._heard(s)
        done = {j.id: j for j in finished}
        assert len(done) == len(finished), f"a job finished twice in one report: {finished}"
        assert rejected == len(outs) - len(finished) - len(retried)
        for out in outs:
            key = (out.job_id, out.lease)
            if key in retrying:  # its run is over; the slave learns so when acknowledged
                job = retried.get(out.job_id)
                assert job is not None and job.state is State.QUEUED, before[out.job_id]
                assert job.history and job.history[-1]["lease"] == out.lease
                assert job.not_before is not None and job.worker is None
                self.stale.add((s.name, key))
                continue
            applied = out.job_id in done and done[out.job_id].lease == out.lease
            assert applied == expected[key], (
                f"outcome {key} from {s.name} {'applied' if applied else 'rejected'}; "
                f"before: {before[out.job_id]}"
            )
            if applied:
                job = done[out.job_id]
                assert job.state is (State.SUCCEEDED if out.ok else State.FAILED)
                self.applied[out.job_id] = self.applied_here[out.job_id] = (s.name, out.lease)
                self.client_saw.setdefault(out.job_id, job.state)
        self.unscheduled += [*retried.values(), *released]  # in line once saved (schedule)
        if save:
            self._save()
        if ack:  # only once the master has saved them does the slave forget them
            for out in outs:
                s.reporting.discard((out.job_id, out.lease))
                s.unacked.pop((out.job_id, out.lease), None)

    def _expire(self) -> None:
        deadline = self.now - LEASE
        changed = self.board.expire()
        for s in self.slaves.values():
            if s.heard is None:
                continue
            if s.heard < deadline:
                assert s.name not in self.board.workers, f"{s.name} silent, not expired"
                s.heard = None
            else:
                assert s.name in self.board.workers, (
                    f"{s.name} expired though heard at {s.heard}, now {self.now}"
                )
        for job in changed:
            assert job.worker not in self.board.workers, self._where(job.id)

    def _taint(self, s: Slave) -> None:
        """``s`` is dead, or silent for longer than its lease: what it holds may go
        elsewhere and run again."""
        for key in s.every_key():
            self.stale.add((s.name, key))
            self.tainted.add(key[0])

    def _advance(self, dt: float) -> None:
        self.now += dt
        for s in self.slaves.values():
            if s.working and self.now - s.last_call > LEASE:
                self._taint(s)  # silent past its lease: reruns are fair

    # -- the rule ------------------------------------------------------------------
    # One rule, ``step``, whose event says what happens (see EVENTS), rather than a rule
    # per event: hypothesis's swarm testing turns random subsets of rules off for whole
    # examples, and a story (lease, run, cut off, re-handed, come back) needs several.
    # A slave's event names a slave; if that one cannot do it, the next one that can
    # does (noted in the printed example), else nothing happens.

    def _pick(self, name: str, able: Callable[[Slave], bool]) -> Slave | None:
        order = list(self.slaves)
        i = order.index(name)
        for other in order[i:] + order[:i]:
            if able(self.slaves[other]):
                if other != name:
                    note(f"  ({name} cannot: {other} does)")
                return self.slaves[other]
        note("  (no slave can do that)")
        return None

    @initialize(n=st.integers(0, 4))
    def cluster_starts(self, n: int) -> None:
        for s in self.slaves.values():
            self._register(s)
        if n:
            self.submit(n, None)

    @rule(event=STEPS)
    def step(self, event: tuple) -> None:
        """One thing happens (see EVENTS)."""
        kind, *args = event
        if kind in SLAVE_ACTS:
            handler, able = getattr(self, f"_act_{kind}"), SLAVE_ACTS[kind]
            s = self._pick(args[0], able)
            if s is not None:
                handler(s, *args[1:])
        elif kind == "cancel":
            if self.board.jobs:
                self._cancel(*args)
        else:
            getattr(self, kind)(*args)

    def submit(
        self, n: int, attempts: int | None, retries: int = 0, after: int = 0, priority: int = 0,
        requires: str | None = None, cap: int | None = None,
    ) -> None:
        deps = tuple(sorted(self.accepted)[-after:]) if after and self.accepted else None
        specs = [JobSpec("shell", (["true"], False), max_attempts=attempts, retries=retries,
                         retry_backoff=LEASE / 4, after=deps, priority=priority or None,
                         requires=GPU if requires else None,
                         array=None if cap is None else (i, cap))
                 for i in range(n)]  # fmt: skip
        jobs = self.board.submit(specs, publish=False)
        if deps:  # what the service does: states of those not in memory from the journal
            known = {d: self.journal[d].state for d in deps if d not in self.board.jobs}
            for job in jobs:
                self.board.depend(job, deps, known)
        self._save()  # a submit returns once its jobs are in the journal
        self.board.publish(jobs)
        for job in jobs:
            assert job.id not in self.accepted, f"job id {job.id} given twice"
            self.accepted.add(job.id)

    def _cancel(self, pick: int) -> None:
        job_id = sorted(self.board.jobs)[pick % len(self.board.jobs)]
        before = self.board.jobs[job_id].state
        job = self.board.cancel(job_id)
        self._save()  # a cancel returns once saved
        assert job.state is (before if before.terminal else State.CANCELLED)

    def _act_lease(self, s: Slave, n: int, fate: str, retry: bool, run: int) -> None:
        """A lease call; its reply is taken in (and ``run`` of them started at once),
        still travelling, or lost. ``retry``: the call of a lost reply, again."""
        seq = s.lost_seq if retry and s.lost_seq is not None else s.seq + 1
        keys = self._lease(s, n, seq)
        if keys is None:  # it registered again; its fetcher calls again at once
            if s.draining:
                return
            seq = s.seq + 1
            keys = self._lease(s, n, seq)
            assert keys is not None, f"{s.name} unknown right after registering"
        if fate == "take":
            self._take_in(s, seq, keys)
            for _ in range(min(run, len(s.waiting))):
                self._start(s, 0)
        elif fate == "in_flight":
            s.reply_in_flight = (seq, keys)
        else:
            s.lost_seq = seq

    def _act_work(self, s: Slave, start: int, finish: int, ok: bool, report: str) -> None:
        """Start queued leases, finish runs, report every unacknowledged outcome (the
        master saves them before it acks, except ``unsaved``: it crashes first)."""
        for _ in range(min(start, len(s.waiting))):
            self._start(s, 0)
        for _ in range(min(finish, len(s.running))):
            self._finish(s, 0, ok)
        if report == "none" or not can_report(s):
            return
        outs = list(s.unacked.values())
        if report == "in_flight":
            s.report_in_flight = outs
        elif report != "lost":
            self._deliver_report(s, outs, save=report != "unsaved", ack=report == "acked")

    def _act_heartbeat(self, s: Slave, late: bool) -> None:
        """A heartbeat; ``late``: sent now, it arrives after the slave's later calls."""
        if late:
            s.beat_in_flight = s.holding()
        else:
            self._heartbeat(s)

    def _act_arrive(self, s: Slave, what: str, lost: bool) -> None:
        """A travelling lease reply, report or heartbeat (``what``, or else the next one
        travelling) arrives, or is lost for good. A report that arrives is saved;
        ``lost`` then means its acknowledgement is lost."""
        kinds = ["reply", "report", "beat"]
        kinds = kinds[kinds.index(what) :] + kinds[: kinds.index(what)]
        travelling = {
            "reply": s.reply_in_flight, "report": s.report_in_flight, "beat": s.beat_in_flight,
        }  # fmt: skip
        kind = next(k for k in kinds if travelling[k] is not None)
        if kind == "reply":
            assert s.reply_in_flight is not None
            seq, keys = s.reply_in_flight
            s.reply_in_flight = None
            if lost:
                s.lost_seq = seq
            else:
                self._take_in(s, seq, keys)
        elif kind == "report":
            outs, s.report_in_flight = s.report_in_flight or [], None
            self._deliver_report(s, outs, save=True, ack=not lost)
        elif lost:
            s.beat_in_flight = None
        else:
            self._heartbeat(s, s.beat_in_flight)

    def _act_die(self, s: Slave) -> None:
        s.alive = False
        self._taint(s)

    def _act_cut(self, s: Slave, stall: bool) -> None:
        """The slave is cut off; ``stall``: for longer than its lease, while the others
        heartbeat, and the master expires it."""
        s.partitioned = True
        if s.reply_in_flight is not None:  # the connection broke under it
            s.lost_seq = s.reply_in_flight[0]
            s.reply_in_flight = None
        s.report_in_flight = s.beat_in_flight = None  # outcomes are sent again later
        if stall:
            self.tick(LEASE + 0.5, True)
            self._expire()

    def _act_heal(self, s: Slave) -> None:
        s.partitioned = False
        self._heartbeat(s)

    def _act_drain(self, s: Slave) -> None:
        """SIGTERM: hand back what it did not start, take nothing new, finish the rest."""
        s.draining = True
        back, s.waiting = s.waiting, []
        self._release(s, back)

    def _act_goodbye(self, s: Slave) -> None:
        self._goodbye(s)

    def _goodbye(self, s: Slave) -> None:
        back = self.board.forget(s.name)
        for job in back:
            assert job.state is State.QUEUED, self._where(job.id)
        s.gone, s.heard = True, None

    def join(self) -> None:
        """A new slave, when fewer than three take work."""
        if sum(map(can_drain, self.slaves.values())) < len(NAMES):
            s = self.slaves[f"s{len(self.slaves)}"] = Slave(f"s{len(self.slaves)}")
            self._register(s)

    def tick(self, dt: float, beat: bool) -> None:
        """``dt`` seconds pass; with ``beat``, every reachable slave heartbeats as it
        should (every third of the lease), else all are silent meanwhile."""
        while dt > 0:
            step = min(dt, LEASE / 3) if beat else dt
            self._advance(step)
            dt -= step
            for s in self.slaves.values():
                if beat and s.reachable:
                    self._heartbeat(s)

    def expire(self, save: bool) -> None:
        self._expire()
        if save:
            self._save(tick=True)
            self._refill()

    def evict(self, keep: int) -> None:
        before = set(self.board.jobs)
        self.board.evict(keep, self.saved_finished)
        for job_id in before - set(self.board.jobs):
            saved = self.journal.get(job_id)
            assert saved is not None and saved.state.terminal, (
                f"job {job_id} evicted but the journal has {saved and saved.state}"
            )
            self.offboard[job_id] = saved.state

    def crash(self, rejoin: str) -> None:
        """kill -9 and restart: what was not saved is gone. The slaves register again
        with their claims when they next call, or (``rejoin``) every reachable one at once."""
        assert set(self.journal) == self.accepted, "an accepted job is not in the journal"
        for s in self.slaves.values():
            if s.reply_in_flight is not None:
                s.lost_seq = s.reply_in_flight[0]
                s.reply_in_flight = None
            s.report_in_flight = s.beat_in_flight = None
            s.heard, s.last_lease_call = None, None
        self.unscheduled = []  # unsaved: lost with the master
        self.board = self._start_master()
        for row in self.journal.values():  # running jobs stay running, on a placeholder
            if row.state is State.RUNNING and row.worker:
                job, worker = self.board.jobs[row.id], self.board.workers.get(row.worker)
                assert job.state is State.RUNNING and (job.lease, job.worker) == (
                    row.lease, row.worker
                ), f"restored as {self._where(row.id)}"  # fmt: skip
                assert worker is not None and worker.held.get(row.id) == row.lease
        if rejoin != "later":
            order = list(self.slaves.values())
            for s in order[::-1] if rejoin.endswith("first") else order:
                if s.reachable:
                    self._register(s)

    # -- quiescence ------------------------------------------------------------------

    def _unfinished(self) -> list[int]:
        jobs, cold = self.board.jobs, self._cold()
        return sorted(
            j for j in self.accepted
            if j in cold or (j not in self.offboard and not jobs[j].state.terminal)
        )  # fmt: skip

    def _settle(self) -> None:
        """Heal everything, let the live slaves work; every job must finish."""
        for s in self.slaves.values():
            s.partitioned = False
        while not any(s.working and not s.draining and labels(s.name)
                      for s in self.slaves.values()):  # fmt: skip
            fresh = Slave(f"s{len(self.slaves)}", last_call=self.now)
            self.slaves[fresh.name] = fresh
        for _ in range(SETTLE_ROUNDS):
            if not self._unfinished():
                break
            for s in list(self.slaves.values()):
                if not s.working:
                    continue
                if s.reply_in_flight is not None:
                    seq, keys = s.reply_in_flight
                    s.reply_in_flight = None
                    self._take_in(s, seq, keys)
                if s.report_in_flight is not None:
                    outs, s.report_in_flight = s.report_in_flight, None
                    self._deliver_report(s, outs, save=True, ack=True)
                self._heartbeat(s)
                if not s.draining:
                    seq = s.seq + 1
                    keys = self._lease(s, 3, seq)
                    if keys is not None:
                        self._take_in(s, seq, keys)
                while s.waiting:
                    self._start(s, 0)
                while s.running:
                    self._finish(s, 0, True)
                if s.unacked:
                    self._deliver_report(s, list(s.unacked.values()), save=True, ack=True)
                if can_leave(s):
                    self._goodbye(s)
            self._advance(LEASE / 3)
            self._expire()
            self._save(tick=True)
            self._refill()
        left = self._unfinished()
        assert not left, "jobs never finished: " + "; ".join(self._where(j) for j in left)

    def _state(self, job_id: int) -> State:
        """A job's state: in memory, else as the journal has it."""
        job = self.board.jobs.get(job_id)
        return job.state if job is not None else self.journal[job_id].state

    def teardown(self) -> None:
        if sys.exc_info()[0] is None:  # not while a failure propagates: it would mask it
            self._settle()
            self.check()
            self._check_dependencies()

    def _check_dependencies(self) -> None:
        """At the end: a job after a failed or cancelled one was cancelled (unless it had
        already run, adopted after a crash); one cancelled for a job it came after names it,
        and that job did fail or was cancelled."""
        for job_id in sorted(self.accepted):
            job = self.board.jobs.get(job_id) or self.journal[job_id]
            if not job.after:
                continue
            bad = [d for d in job.after if self._state(d) in (State.FAILED, State.CANCELLED)]
            if bad and not self.executions[job_id]:
                assert job.state is State.CANCELLED, f"job {job_id} after {bad}: {job.state}"
            if job.state is State.CANCELLED and "it comes after" in (job.error or ""):
                named = int((job.error or "").split()[1])
                assert named in job.after and self._state(named) in (
                    State.FAILED, State.CANCELLED), f"job {job_id}: {job.error}"  # fmt: skip

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def check(self) -> None:
        board, jobs = self.board, self.board.jobs
        # every accepted job is in one place, in one state; counts and total agree
        assert not set(jobs) & set(self.offboard)
        cold = self._cold()
        for job_id in cold:  # waiting cold: queued in the journal, in a cold range
            saved = self.journal.get(job_id)
            assert saved is not None and saved.state is State.QUEUED, self._where(job_id)
            assert board.is_cold(job_id), f"job {job_id} neither in memory nor cold"
        queued_here = sum(1 for j in jobs.values() if j.state is State.QUEUED)
        assert queued_here <= WINDOW + len(board._warmed) + 2 * len(self.slaves) * 8, (
            f"{queued_here} queued records in memory"
        )  # the window, plus jobs handed back or requeued, which go first
        real = Counter(j.state for j in jobs.values()) + Counter(self.offboard.values())
        real[State.QUEUED] += len(cold)
        assert {s: board.counts[s] for s in State} == {s: real[s] for s in State}, (
            dict(board.counts),
            dict(real),
        )
        assert board.total == len(self.accepted)
        # finished stays finished, in the same state
        for job_id, state in self.offboard.items():
            assert state.terminal
            assert self.terminal_saved.get(job_id, state) is state
        for job in jobs.values():
            if job.state.terminal:
                assert self.terminal_here.setdefault(job.id, job.state) is job.state
            assert self.terminal_saved.get(job.id, job.state) is job.state, self._where(job.id)
        for job_id in self.terminal_here:
            assert job_id in self.offboard or jobs[job_id].state.terminal, self._where(job_id)
        # what a client saw stays (its slave reports again to the next master), unless
        # that slave died or went silent before it could, or the job was cancelled since
        for job_id, state in self.client_saw.items():
            now = jobs[job_id].state if job_id in jobs else self.offboard.get(job_id, State.QUEUED)
            assert (
                not now.terminal or now in (state, State.CANCELLED) or (job_id in self.tainted)
            ), f"clients saw {state}, now {self._where(job_id)}"
        # the board counts each array's running tasks right; at most its cap run at once
        # under leases of this master (runs adopted after a restart, started or finished
        # and not yet reported, count but may overlap), unless one was held by a dead or
        # silent slave: then two runs may overlap
        running = Counter(j.array for j in jobs.values()
                          if j.state is State.RUNNING and j.array is not None)  # fmt: skip
        assert +board._running_in == +running, (dict(board._running_in), dict(running))
        running = Counter(j.array for j in jobs.values() if j.state is State.RUNNING
                          and j.array is not None and j.lease >= board.first_lease)  # fmt: skip
        for array, n in running.items():
            tasks = [j for j in jobs.values() if j.array == array]
            cap = tasks[0].array_cap
            assert not cap or n <= cap or any(j.id in self.tainted for j in tasks), (
                f"array {array}: {n} tasks running, cap {cap}"
            )
        # a running job is held by a worker the board knows: it can always be requeued
        for job in jobs.values():
            if job.state is State.RUNNING:
                worker = board.workers.get(job.worker or "")
                assert worker is not None and worker.held.get(job.id) == job.lease, (
                    f"running job no worker holds: {self._where(job.id)}"
                )
        # a slave heard from within the lease keeps every job it holds (those it had
        # while it was silent for longer may have gone elsewhere: it learns so later)
        for s in self.slaves.values():
            if not s.working or s.heard is None or self.now - s.heard > LEASE:
                continue
            worker = board.workers.get(s.name)
            assert worker is not None and worker.registered, f"{s.name} lost by the master"
            for job_id, lease in s.keys():
                if (s.name, (job_id, lease)) in self.stale:
                    continue
                job = jobs.get(job_id)
                state = job.state if job is not None else self.offboard.get(job_id, State.QUEUED)
                mine = (
                    state is State.RUNNING
                    and job is not None
                    and (job.lease, job.worker) == (lease, s.name)
                ) or (  # finished by its own outcome, or cancelled: it learns so later
                    state.terminal
                    and (state is State.CANCELLED or self.applied.get(job_id) == (s.name, lease))
                )
                assert mine, (
                    f"{s.name} (heard {s.heard}, now {self.now}) holds ({job_id}, {lease}): "
                    + self._where(job_id)
                )


BoardModel.TestCase.settings = settings(
    max_examples=1000,
    stateful_step_count=50,
    deadline=None,
    # no "explain" phase: it doubles the time of a failing run and adds little here
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    report_multiple_bugs=False,  # one story at a time shrinks shorter
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBoardModel = BoardModel.TestCase

"""Model-based test of the long-polls the master parks (service: lease and collect).

A waiting ``lease`` or ``collect`` holds no thread: it is parked in the service, and the
call that brings work or an outcome answers it. What could go wrong is a lost wake-up (a
parked slave idle while work it could run waits in line, or a client not told of an
outcome it waits for), an answer sent twice or never, or a poll left behind. Hypothesis
drives three slaves (one with ``gpu=1``) and a client through random interleavings of
submits (with placement, dependencies and retries), leases, reports (with the next lease in the
same call, as idle slots do), heartbeats (draining), goodbyes, cancels and ticks of a fake
clock (deadlines, silent slaves expiring), against the real service and journal. Calls
are made as the transport makes them (``transport.answer_later``), without sockets.

After every step:
- every poll was answered at most once, and the parked ones are exactly those unanswered;
- nothing is lost: serving the parked polls again answers none of them (no slave could
  take anything in line, no client has an outcome waiting);
- no parked lease belongs to a slave that drains or that the master forgot;
- every job the board has running on a slave it knows reached that slave (answers go
  to the poll that asked, and a poll a slave left behind ends empty).
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from scheduler import transport
from scheduler.board import Board
from scheduler.errors import SchedulerError, UnknownWorker
from scheduler.job import State
from scheduler.journal import Journal
from scheduler.progress import Progress
from scheduler.protocol import VERSION, Lease, Leased, Reply, Reported
from scheduler.service import Service

SLAVES = ("w0", "w1", "w2")  # w2 carries gpu=1
LEASE_SECONDS = 6.0
SESSION = "s"


class Recorder:
    """An answer the service sends later (as transport.Answer), kept for the model."""

    def __init__(self, on_answer: Any) -> None:
        self.answers: list[tuple[str, Any]] = []
        self._on_answer = on_answer

    def __call__(self, value: Any) -> None:
        self.answers.append(("value", value))
        self._on_answer(self, value)

    def fail(self, exc: Exception) -> None:
        self.answers.append(("error", exc))
        self._on_answer(self, exc)


def over_the_wire(answer: Recorder, method: Any, *args: Any) -> Any:
    """Call ``method`` as transport's serve_client does: it may answer later, through ``answer``."""
    transport._serving.answer = answer
    try:
        return method(*args)
    finally:
        transport._serving.answer = None


class PollModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.dir = tempfile.mkdtemp(prefix="polls-")
        self.journal = Journal(self.dir)
        board = Board(clock=lambda: self.now, lease_seconds=LEASE_SECONDS)
        self.svc = Service(board, self.journal, {}, Progress(lambda: self.now),
                           clock=lambda: self.now)  # fmt: skip
        self.known = dict.fromkeys(SLAVES, False)
        self.draining = dict.fromkeys(SLAVES, False)
        self.held: dict[str, dict[int, int]] = {w: {} for w in SLAVES}  # job id -> lease
        self.parked: dict[str, Recorder] = {}  # slave -> its unanswered lease
        self.seq = dict.fromkeys(SLAVES, 0)  # lease calls made
        self.fetched = dict.fromkeys(SLAVES, 0)  # lease replies taken in
        self.collecting: Recorder | None = None
        self.seen: set[int] = set()  # outcomes the client got
        self.submitted: list[int] = []
        self.svc.watch(SESSION, [])
        for worker in SLAVES:
            self._register(worker)

    def teardown(self) -> None:
        self.svc.close()
        self.journal.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what slaves and the client do -------------------------------------------

    def _register(self, worker: str) -> None:
        labels = {"gpu": "1"} if worker == "w2" else None
        holding = (tuple(self.held[worker].items()), (), self.fetched[worker], False)
        self._apply(worker, Reply(*self.svc.register(worker, "h", 1, 1, holding, VERSION,
                                                     labels).reply))  # fmt: skip
        self.known[worker], self.draining[worker] = True, False

    def _apply(self, worker: str, reply: Reply) -> None:
        if not reply.known:
            self._forgotten(worker)
            return
        for job_id, lease in reply.drop:
            if self.held[worker].get(job_id) == lease:
                del self.held[worker][job_id]

    def _forgotten(self, worker: str) -> None:
        self.known[worker] = False
        self.held[worker].clear()  # a slave the master forgot stops what it ran

    def _take_in(self, worker: str, seq: int, leases: Any) -> None:
        self.fetched[worker] = max(self.fetched[worker], seq)
        for lease in map(Lease._make, leases):
            self.held[worker][lease.job_id] = lease.lease

    def _answered_lease(self, worker: str, seq: int, rec: Recorder, value: Any) -> None:
        assert len(rec.answers) == 1, f"{worker}'s lease answered {len(rec.answers)} times"
        if self.parked.get(worker) is rec:
            del self.parked[worker]
        if isinstance(value, UnknownWorker) or (type(value) is Reported and not value.known):
            self._forgotten(worker)
            return
        leases = value.leases if isinstance(value, (Leased, Reported)) else ()
        self._take_in(worker, seq, leases)

    def _lease_call(self, worker: str, n: int, wait: float, outcome: tuple | None) -> None:
        self.seq[worker] += 1
        seq = self.seq[worker]
        rec = Recorder(lambda r, v: self._answered_lease(worker, seq, r, v))
        if outcome is None:
            method, args = self.svc.lease, (worker, n, wait, seq)
        else:
            method, args = self.svc.report, (worker, [outcome], (n, wait, seq))
        try:
            got = over_the_wire(rec, method, *args)
        except UnknownWorker:
            self._forgotten(worker)
            return
        if got is transport.DEFERRED:
            if not rec.answers:
                self.parked[worker] = rec
            return
        rec(got)

    @rule(n=st.integers(1, 3), gpu=st.booleans(), after=st.booleans(), retry=st.booleans())
    def submit(self, n: int, gpu: bool, after: bool, retry: bool) -> None:
        """``retry``: a failed run goes back in line after a backoff (released by a tick,
        or by a lease that finds it due)."""
        deps = (self.submitted[-1],) if after and self.submitted else None
        tries, backoff = (2, 0.5) if retry else (None, None)
        spec = ("shell", (["true"], False), "", None, None, None, tries, backoff, deps, None,
                {"gpu": "1"} if gpu else None, None)  # fmt: skip
        try:
            first, count = self.svc.submit([spec] * n, {}, SESSION)
        except SchedulerError:
            return
        self.submitted += range(first, first + count)

    @rule(worker=st.sampled_from(SLAVES), n=st.integers(1, 3), wait=st.sampled_from([0, 1, 5]),
          again=st.booleans())
    def lease(self, worker: str, n: int, wait: float, again: bool) -> None:
        """``again``: with a lease parked already, as a slave that lost that connection."""
        if self.known[worker] and (again or worker not in self.parked):
            old = self.parked.get(worker)
            self._lease_call(worker, n, wait, None)
            assert old is None or [(kind, tuple(v.leases)) for kind, v in old.answers] == [
                ("value", ())], "a lease superseded by the slave's next one ends empty, at once"

    @rule(worker=st.sampled_from(SLAVES), ok=st.booleans(), ask=st.booleans(), data=st.data())
    def report(self, worker: str, ok: bool, ask: bool, data: st.DataObject) -> None:
        if not self.known[worker] or not self.held[worker]:
            return
        job_id = data.draw(st.sampled_from(sorted(self.held[worker])))
        lease = self.held[worker].pop(job_id)
        outcome = (job_id, lease, ok, None, None if ok else "failed", 0 if ok else 1)
        if ask and worker not in self.parked:
            self._lease_call(worker, 2, 5, outcome)
            return
        try:
            self.svc.report(worker, [outcome])
        except UnknownWorker:
            self._forgotten(worker)

    @rule(worker=st.sampled_from(SLAVES), drain=st.booleans())
    def heartbeat(self, worker: str, drain: bool) -> None:
        if not self.known[worker]:
            return
        self.draining[worker] = self.draining[worker] or drain
        holding = (tuple(self.held[worker].items()), (), self.fetched[worker],
                   self.draining[worker])  # fmt: skip
        self._apply(worker, Reply(*self.svc.heartbeat(worker, holding)))

    @rule(worker=st.sampled_from(SLAVES))
    def goodbye(self, worker: str) -> None:
        if self.known[worker]:
            self.svc.goodbye(worker)
            self._forgotten(worker)

    @rule(worker=st.sampled_from(SLAVES))
    def register_again(self, worker: str) -> None:
        if not self.known[worker] and worker not in self.parked:
            self._register(worker)

    @rule()
    def collect(self) -> None:
        if self.collecting is not None:
            return

        def answered(rec: Recorder, value: Any) -> None:
            assert len(rec.answers) == 1, "a collect answered twice"
            if self.collecting is rec:
                self.collecting = None
            self.seen.update(done[0] for done in value or ())

        rec = Recorder(answered)
        got = over_the_wire(rec, self.svc.collect, SESSION, 5.0)
        if got is transport.DEFERRED:
            if not rec.answers:
                self.collecting = rec
        else:
            rec(got)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if self.submitted:
            self.svc.cancel(data.draw(st.sampled_from(self.submitted)))

    @rule(dt=st.sampled_from([0.05, 1.0, 3.0, LEASE_SECONDS + 1]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.svc.tick()

    # -- invariants ------------------------------------------------------------

    @invariant()
    def parked_polls_are_the_unanswered_ones(self) -> None:
        assert set(self.svc._leasing) == set(self.parked)
        assert (SESSION in self.svc._collecting) == (self.collecting is not None)

    @invariant()
    def no_wake_up_is_lost(self) -> None:
        before = {w: len(r.answers) for w, r in self.parked.items()}
        collecting = self.collecting
        with self.svc._lock:
            self.svc._serve_leases()
            if self.svc._outboxes.get(SESSION):
                self.svc._serve_collect(SESSION)
        self.svc._flush()
        answered = [w for w, n in before.items() if self.parked.get(w) is None
                    or len(self.parked[w].answers) != n]  # fmt: skip
        assert not answered, f"parked lease(s) of {answered} could have had work"
        assert collecting is None or collecting is self.collecting, "an outcome waited"

    @invariant()
    def no_parked_lease_of_a_draining_or_forgotten_slave(self) -> None:
        for worker in self.parked:
            record = self.svc._board.workers.get(worker)
            assert record is not None and record.registered, f"{worker} is forgotten"
            assert not record.draining, f"{worker} drains"

    @invariant()
    def every_run_handed_out_reached_its_slave(self) -> None:
        for job in self.svc._board.jobs.values():
            if job.state is State.RUNNING and self.known.get(job.worker or ""):
                assert self.held[job.worker].get(job.id) == job.lease, (  # type: ignore[index]
                    f"job {job.id} runs on {job.worker} (lease {job.lease}), which never got it")


class _First:
    """A draw that takes the lowest job id a slave holds (for the fixed stories below)."""

    def __init__(self, model: PollModel, worker: str) -> None:
        self._model, self._worker = model, worker

    def draw(self, _: object) -> int:
        return min(self._model.held[self._worker])


def story(steps: Any) -> None:
    """Run ``steps(model)`` on a fresh model, checking every invariant after each step."""
    model = PollModel()
    checks = [model.parked_polls_are_the_unanswered_ones, model.no_wake_up_is_lost,
              model.no_parked_lease_of_a_draining_or_forgotten_slave,
              model.every_run_handed_out_reached_its_slave]  # fmt: skip
    try:
        for step in steps(model):
            step()
            for check in checks:
                check()
    finally:
        model.teardown()


def test_a_retry_whose_backoff_ends_at_a_tick_goes_to_a_parked_slave():
    story(lambda m: [
        lambda: m.submit(n=1, gpu=False, after=False, retry=True),
        lambda: m.lease(worker="w0", n=1, wait=0, again=False),
        lambda: m.report(worker="w0", ok=False, ask=False, data=_First(m, "w0")),
        lambda: m.lease(worker="w1", n=1, wait=5, again=False),
        lambda: m.tick(dt=1.0),
    ])  # fmt: skip


def test_a_dependent_freed_by_a_saved_report_goes_to_a_parked_slave():
    story(lambda m: [
        lambda: m.submit(n=1, gpu=False, after=False, retry=False),
        lambda: m.submit(n=1, gpu=False, after=True, retry=False),
        lambda: m.lease(worker="w0", n=1, wait=0, again=False),
        lambda: m.lease(worker="w1", n=1, wait=5, again=False),
        lambda: m.report(worker="w0", ok=True, ask=False, data=_First(m, "w0")),
    ])  # fmt: skip


PollModel.TestCase.settings = settings(
    max_examples=1000,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPollModel = PollModel.TestCase

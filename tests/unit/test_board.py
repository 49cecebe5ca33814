"""The board's state machine with an injected clock: no sockets, no sleeping."""

from __future__ import annotations

import copy
import random

import pytest

from scheduler.board import RECONNECT_SECONDS, Board, Holding, Journaled, Outcome
from scheduler.errors import UnknownJob, UnknownWorker
from scheduler.job import JobSpec, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def board(clock: Clock) -> Board:
    return Board(clock=clock, lease_seconds=30, max_attempts=3)


def shell(*argv: str, **kw) -> JobSpec:
    return JobSpec("shell", (list(argv), False), **kw)


def take(board: Board, worker: str, n: int):
    """A registered worker asks for work."""
    board.register(worker)
    return board.lease(worker, n)


def ok(job, **kw) -> Outcome:
    return Outcome(job.id, job.lease, True, **kw)


def test_jobs_are_handed_out_in_order_and_finish_once(board):
    a, b, c = board.submit([shell("a"), shell("b"), shell("c")])
    assert (a.id, b.id, c.id) == (1, 2, 3)
    got = take(board, "w1", 2)
    assert [j.id for j in got] == [1, 2] and a.state is State.RUNNING and a.attempts == 1
    finished, rejected = board.complete("w1", [ok(a, stdout="hi", duration=0.5)])
    assert finished == [a] and rejected == 0
    assert a.state is State.SUCCEEDED and a.stdout == "hi" and a.ended - a.started == 0.5
    # the same outcome again is not applied twice
    assert board.complete("w1", [ok(a)]) == ([], 1)
    assert board.status()["counts"] == {
        "queued": 1, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0,
    }  # fmt: skip


def test_a_failed_outcome_keeps_exit_code_and_error(board):
    (job,) = board.submit([shell("false")])
    take(board, "w1", 1)
    board.complete("w1", [Outcome(job.id, job.lease, False, error="exited with 1", exit_code=1)])
    assert (job.state, job.exit_code, job.error) == (State.FAILED, 1, "exited with 1")


def test_a_silent_worker_loses_its_jobs_after_the_lease(board, clock):
    (job,) = board.submit([shell("x")])
    take(board, "w1", 1)
    clock.now += 29
    assert board.expire() == []
    clock.now += 2
    assert board.expire() == [job]
    assert job.state is State.QUEUED and "w1" not in board.workers
    again = take(board, "w2", 1)
    assert again == [job] and job.attempts == 2 and job.worker == "w2"


def claims(*jobs, waiting=(), fetched=10**9, draining=False) -> Holding:
    """What a worker says it holds: these jobs under their current leases."""
    return Holding(tuple((j.id, j.lease) for j in jobs), tuple(j.id for j in waiting),
                   fetched, draining)  # fmt: skip


def test_a_heard_from_worker_keeps_a_job_however_long_it_runs(board, clock):
    (job,) = board.submit([shell("sleep", "3600")])
    take(board, "w1", 1)
    for _ in range(200):  # 200 heartbeats 20 s apart: far longer than the 30 s lease
        clock.now += 20
        assert board.heartbeat("w1", claims(job)).drop == ()
        assert board.expire() == []
    assert job.state is State.RUNNING and job.attempts == 1
    assert board.complete("w1", [ok(job)])[0] == [job]


def test_a_finishing_job_is_not_requeued_while_its_outcome_travels(board, clock):
    """The bug of 0.1: the slave forgot the job before the master had its outcome."""
    (job,) = board.submit([shell("x")])
    take(board, "w1", 1)
    clock.now += 100
    board.heartbeat("w1", claims(job))  # finished, report in flight: still claimed
    assert job.state is State.RUNNING
    assert board.complete("w1", [ok(job)])[0] == [job] and job.attempts == 1


def test_a_late_outcome_from_a_lapsed_lease_is_rejected(board, clock):
    (job,) = board.submit([shell("x")])
    (first,) = take(board, "w1", 1)
    old_lease = first.lease
    clock.now += 31
    board.expire()
    take(board, "w2", 1)
    assert board.complete("w1", [Outcome(job.id, old_lease, True)]) == ([], 1)
    assert job.state is State.RUNNING and job.worker == "w2"
    assert board.complete("w2", [ok(job)])[0] == [job]


def test_an_outcome_only_counts_from_the_worker_holding_the_lease(board):
    (job,) = board.submit([shell("x")])
    take(board, "w1", 1)
    board.register("w2")
    assert board.complete("w2", [ok(job)]) == ([], 1)
    assert job.state is State.RUNNING


def test_a_worker_back_from_a_partition_keeps_a_job_nobody_took(board, clock):
    (job,) = board.submit([shell("x")])
    take(board, "w1", 1)
    clock.now += 31
    assert board.expire() == [job] and job.state is State.QUEUED
    assert not board.heartbeat("w1", claims(job)).known  # it must register again
    _, reply = board.register("w1", claims(job))
    assert reply.drop == () and job.state is State.RUNNING and job.worker == "w1"
    assert board.lease("w1", 1) == []  # not handed out a second time


def test_a_worker_back_from_a_partition_drops_a_job_that_went_elsewhere(board, clock):
    (job,) = board.submit([shell("x")])
    take(board, "w1", 1)
    old = job.lease
    clock.now += 31
    board.expire()
    take(board, "w2", 1)
    _, reply = board.register("w1", Holding(((job.id, old),)))
    assert reply.drop == ((job.id, old),)
    assert job.worker == "w2" and board.complete("w1", [Outcome(job.id, old, True)]) == ([], 1)


def test_max_attempts_then_failed_with_the_reason(board, clock):
    (job,) = board.submit([shell("x", max_attempts=2)])
    for worker in ("w1", "w2"):
        take(board, worker, 1)
        clock.now += 31
        board.expire()
    assert job.state is State.FAILED and job.attempts == 2
    assert "w2 stopped answering" in job.error and "after 2 attempts" in job.error


def test_jobs_only_waiting_on_a_dead_worker_do_not_use_an_attempt(board, clock):
    a, b = board.submit([shell("a", max_attempts=1), shell("b", max_attempts=1)])
    take(board, "w1", 2)
    board.heartbeat("w1", claims(a, b, waiting=[b]))
    clock.now += 31
    board.expire()
    assert a.state is State.FAILED and b.state is State.QUEUED and b.attempts == 0


def test_a_lease_lost_in_transit_is_reclaimed_once_the_worker_says_it_took_the_reply(board):
    a, b = board.submit([shell("a"), shell("b")])
    board.register("w1")
    board.lease("w1", 1, seq=1)
    board.lease("w1", 1, seq=2)  # the reply carrying b never arrived
    board.heartbeat("w1", claims(a, fetched=1))
    assert b.state is State.RUNNING  # the reply may still be on its way
    board.heartbeat("w1", claims(a, fetched=3))  # a later reply arrived: b's was lost
    assert b.state is State.QUEUED and b.attempts == 0 and a.state is State.RUNNING


def test_a_retried_lease_call_gets_the_same_jobs(board):
    board.register("w1")
    assert board.lease("w1", 2, seq=7) == []  # a long-poll asks again with the same seq
    board.submit([shell("a"), shell("b"), shell("c")])
    first = board.lease("w1", 2, seq=7)
    assert board.lease("w1", 2, seq=7) == first
    assert [j.id for j in board.lease("w1", 2, seq=8)] == [3]


def test_release_hands_back_without_counting_an_attempt(board):
    a, b = board.submit([shell("a"), shell("b")])
    take(board, "w1", 2)
    back = board.release("w1", [(b.id, b.lease), (a.id, 999)])
    assert back == [b] and b.state is State.QUEUED and b.attempts == 0
    assert a.state is State.RUNNING
    assert [j.id for j in take(board, "w2", 5)] == [b.id]


def test_an_unknown_or_departed_worker_must_register_first(board):
    board.submit([shell("a")])
    with pytest.raises(UnknownWorker):
        board.lease("stranger", 1)
    board.register("w1")
    board.forget("w1")
    with pytest.raises(UnknownWorker):
        board.lease("w1", 1)
    # a late heartbeat does not bring it back: it has to register again
    assert not board.heartbeat("w1").known and "w1" not in board.workers
    assert board.counts["queued"] == 1


def test_a_draining_worker_gets_nothing_and_keeps_what_runs(board, clock):
    (a, _) = board.submit([shell("a"), shell("b")])
    take(board, "w1", 1)
    for _ in range(10):  # a grace period far longer than the lease
        clock.now += 20
        board.heartbeat("w1", claims(a, draining=True))
        board.expire()
    assert board.lease("w1", 1) == [] and a.state is State.RUNNING and a.attempts == 1
    assert len(take(board, "w2", 1)) == 1


def test_cancel_queued_and_running(board):
    a, b = board.submit([shell("a"), shell("b")])
    board.cancel(a.id)
    assert a.state is State.CANCELLED
    assert [j.id for j in take(board, "w1", 5)] == [b.id]  # the cancelled one is skipped
    board.cancel(b.id)
    assert b.state is State.CANCELLED
    reply = board.heartbeat("w1", claims(b))
    assert reply.drop == ((b.id, b.lease),) and reply.cancelled == (b.id,)  # kill it
    assert board.complete("w1", [ok(b)]) == ([], 1)
    assert board.cancel(b.id).state is State.CANCELLED  # idempotent
    with pytest.raises(UnknownJob, match="no job 99"):
        board.cancel(99)


def test_cancelled_jobs_that_left_memory_do_not_break_the_queue(board):
    jobs = board.submit([shell(str(i)) for i in range(30)])
    for job in jobs[:10]:
        board.cancel(job.id)
    assert board.evict(keep=3) == 7
    got = take(board, "w1", 30)
    assert [j.id for j in got] == [j.id for j in jobs[10:]]


def test_goodbye_requeues_what_the_worker_still_held(board):
    (a,) = board.submit([shell("a")])
    take(board, "w1", 1)
    board.forget("w1")
    assert a.state is State.QUEUED and a.attempts == 0


def test_a_restarted_master_keeps_running_jobs_for_their_worker(board, clock):
    a, b, c = board.submit([shell("a"), shell("b"), shell("c")])
    take(board, "w1", 2)
    board.complete("w1", [ok(a)])
    restored = Board(clock=clock, lease_seconds=30, first_lease=b.lease + 1)
    assert restored.restore([a, b, c]) == 1
    assert b.state is State.RUNNING and b.attempts == 1
    assert take(restored, "w2", 5) == []  # nothing until w1, which ran jobs, is back
    _, reply = restored.register("w1", claims(b))
    assert reply.drop == () and b.worker == "w1"
    assert [j.id for j in restored.lease("w2", 5)] == [c.id]  # b is not handed out again
    assert restored.complete("w1", [ok(b)])[0] == [b] and b.attempts == 1
    (d,) = restored.submit([shell("d")])
    assert d.id == 4 and c.lease > b.lease


def test_a_restarted_master_requeues_what_a_worker_does_not_claim(board, clock):
    a, b = board.submit([shell("a"), shell("b")])
    take(board, "w1", 2)
    restored = Board(clock=clock, lease_seconds=30, first_lease=b.lease + 1)
    restored.restore([a, b])
    restored.register("w1", claims(a))  # b finished and was forgotten, or never started
    assert a.state is State.RUNNING and b.state is State.QUEUED


def test_a_restarted_master_gives_up_on_workers_that_do_not_come_back(board, clock):
    (a,) = board.submit([shell("a")])
    take(board, "w1", 1)
    restored = Board(clock=clock, lease_seconds=30, first_lease=a.lease + 1)
    restored.restore([a])
    clock.now += 31
    assert restored.expire() == []  # slaves get time to reconnect
    clock.now += RECONNECT_SECONDS
    assert restored.expire() == [a] and a.state is State.QUEUED


def test_a_lease_the_journal_never_saw_is_adopted_not_repeated(board, clock):
    """Handed out, then the master died before saving it: the journal says queued."""
    (a,) = board.submit([shell("a")])
    saved = copy.copy(a)  # what the journal had
    take(board, "w1", 1)
    restored = Board(clock=clock, lease_seconds=30, first_lease=a.lease + 100)
    restored.restore([saved])
    _, reply = restored.register("w1", Holding(((a.id, a.lease),)))
    assert reply.drop == () and saved.state is State.RUNNING and saved.lease == a.lease
    assert restored.complete("w1", [ok(a)])[0] == [saved]


def test_leases_stop_at_the_reserved_ceiling(clock):
    board = Board(clock=clock, first_lease=5, lease_ceiling=7)
    board.submit([shell(str(i)) for i in range(5)])
    assert [j.lease for j in take(board, "w1", 5)] == [5, 6, 7]
    assert board.lease_room() == 0 and board.lease("w1", 1) == []
    board.lease_ceiling = 100
    assert [j.lease for j in board.lease("w1", 5)] == [8, 9]


def test_take_dirty_returns_each_changed_job_once(board):
    a, b = board.submit([shell("a"), shell("b")])
    assert {j.id for j in board.take_dirty()} == {a.id, b.id}
    assert board.take_dirty() == []
    take(board, "w1", 1)
    assert board.take_dirty() == []  # a hand-out waits for the periodic write ...
    assert board.take_dirty(started=True) == [a]  # ... which saves it if still running
    assert board.take_dirty(started=True) == []


def test_a_job_finished_before_the_periodic_write_is_saved_once_finished(board):
    a, b = board.submit([shell("a"), shell("b")])
    board.take_dirty()
    leased = take(board, "w1", 2)
    board.complete("w1", [ok(leased[0])])
    assert board.take_dirty() == [a]  # its finished row; no row for its start
    assert board.take_dirty(started=True) == [b]


def test_work_stealing_gives_prefetched_jobs_to_idle_workers(board):
    jobs = board.submit([shell(str(i)) for i in range(10)])
    board.register("busy")[0].concurrency = 2
    board.register("idle")[0].concurrency = 2
    assert len(board.lease("busy", 10)) == 10  # prefetched while jobs looked tiny
    board.complete("busy", [ok(jobs[0], duration=0.001)])
    assert board.lease("idle", 4) == [] and board.give_back("busy") == 0  # not worth moving
    board.complete("busy", [ok(jobs[1], duration=2.0)])  # then they turned out long
    assert board.hungry == {"idle"}
    n = board.give_back("busy")
    assert n == 3  # half of the 6 it holds beyond its 2 slots
    back = board.release("busy", [(j.id, j.lease) for j in jobs[-n:]])
    assert len(back) == 3 and all(j.attempts == 0 for j in back)
    # the busy one may not grab them again beyond its slots while another waits
    assert board.lease("busy", 10) == []
    assert len(board.lease("idle", 4)) == 3 and board.hungry == set()


def test_finished_jobs_beyond_the_window_leave_memory_but_still_count(board):
    jobs = board.submit([shell(str(i)) for i in range(5)])
    board.register("w")
    for job in board.lease("w", 5):
        board.complete("w", [ok(job)])
    assert board.evict(keep=2, saved=0) == 0  # not journaled yet: kept
    assert board.evict(keep=2, saved=2) == 2  # the first two finished are saved
    assert board.evict(keep=2, saved=5) == 1
    assert sorted(board.jobs) == [jobs[3].id, jobs[4].id]
    assert board.status()["counts"]["succeeded"] == 5 and board.status()["total"] == 5


def test_a_finished_run_still_claimed_while_its_ack_travels_is_not_dropped(board):
    (job,) = board.submit([shell("x")])
    take(board, "w1", 1)
    board.complete("w1", [ok(job)])
    assert board.heartbeat("w1", Holding(((job.id, job.lease),))).drop == ()


def test_after_a_restart_nothing_is_handed_out_until_known_slaves_are_back(board, clock):
    """A lease handed out just before the crash never reached the journal: the job looks
    queued, but its slave runs it. Give that slave the chance to claim it first."""
    a, b = board.submit([shell("a"), shell("b")])
    saved = [copy.copy(a), copy.copy(b)]  # the journal: both queued
    take(board, "w1", 1)  # a goes to w1; then the master dies
    restored = Board(clock=clock, lease_seconds=30, first_lease=a.lease + 100)
    restored.restore(saved, Journaled(2, {"queued": 2}, 2, a.lease + 99, ("w1", "w2")))
    restored.register("w2")
    assert restored.lease("w2", 2) == [] and restored.status()["awaiting"] == ["w1"]
    restored.register("w1", Holding(((a.id, a.lease),)))  # back, with its run of a
    assert [j.id for j in restored.lease("w2", 2)] == [b.id]  # a is not run twice
    assert restored.jobs[a.id].worker == "w1"


def test_a_slave_that_never_comes_back_holds_nothing_up_for_long(board, clock):
    (a,) = board.submit([shell("a")])
    restored = Board(clock=clock, lease_seconds=30)
    restored.restore([copy.copy(a)], Journaled(1, {"queued": 1}, 1, 0, ("gone",)))
    restored.register("w2")
    assert restored.lease("w2", 1) == []
    clock.now += RECONNECT_SECONDS + 29  # within the lease: it may still come back
    assert restored.lease("w2", 1) == []
    clock.now += 1  # silent for the reconnect allowance plus the lease: dead
    assert [j.id for j in restored.lease("w2", 1)] == [a.id]


def test_the_roster_of_slaves_is_kept_for_the_journal(board, clock):
    board.register("w1")
    board.register("w1")  # again: no change
    board.register("w2")
    board.forget("w2")
    clock.now += 31
    board.expire()
    assert board.roster == [("w1", True), ("w2", True), ("w2", False), ("w1", False)]


def test_a_slave_restarted_under_the_same_name_gives_back_what_the_old_one_ran(board):
    a, b, c = board.submit([shell("a"), shell("b"), shell("c")])
    board.register("w1")
    board.lease("w1", 3, seq=57)
    board.heartbeat("w1", claims(a, b, c, waiting=[c], fetched=57))
    _, reply = board.register("w1", Holding())  # a new process: seq 0, holds nothing
    assert reply.drop == ()
    assert a.state is b.state is c.state is State.QUEUED
    assert (a.attempts, b.attempts, c.attempts) == (1, 1, 0)  # a and b ran and died there


# -- the cold queue: beyond queue_window, queued jobs wait in the journal only --------


def cold_board(window: int = 3) -> Board:
    return Board(clock=lambda: 1000.0, lease_seconds=10.0, queue_window=window)


def saved(board: Board, jobs: list) -> dict:
    """What the journal would hold: a copy of each job as saved now."""
    board.take_dirty()
    for job in jobs:
        job.journaled = True
    return {j.id: copy.copy(j) for j in jobs}


def read_back(board: Board, journal: dict, limit: int = 100) -> int:
    """What the service's tick does: read the next cold span back, if it is time."""
    span = board.cold_span()
    if span is None:
        return 0
    first, last, priority = span
    rows = [copy.copy(j) for i, j in sorted(journal.items())
            if first <= i <= last and j.state is State.QUEUED
            and j.priority == priority][:limit]  # fmt: skip
    return board.refill(first, rows[-1].id if len(rows) == limit else last, rows, priority)


def test_beyond_the_window_queued_jobs_wait_cold_and_come_back_in_order():
    board = cold_board()
    jobs = board.submit([shell(str(i)) for i in range(10)], publish=False)
    journal = saved(board, jobs)
    board.publish(jobs)
    assert sorted(board.jobs) == [1, 2, 3] and board.counts[State.QUEUED] == 10
    assert board.is_cold(4) and board.is_cold(10) and not board.is_cold(3)
    later = board.submit([shell("late")], publish=False)  # behind the cold ones, FIFO
    journal.update(saved(board, later))
    board.publish(later)
    assert 11 not in board.jobs
    order = []
    while len(order) < 11:
        got = take(board, "w1", 1)
        if not got:
            assert read_back(board, journal) > 0
            continue
        order.append(got[0].id)
        board.complete("w1", [ok(got[0])])
    assert order == list(range(1, 12)) and not board.cold
    assert board.counts[State.SUCCEEDED] == 11 and board.counts[State.QUEUED] == 0


def test_a_cold_job_watched_or_cancelled_keeps_its_place_and_its_state():
    board = cold_board(window=2)
    jobs = board.submit([shell(str(i)) for i in range(6)], publish=False)
    journal = saved(board, jobs)
    board.publish(jobs)
    watched = board.warm(copy.copy(journal[4]))  # a client watches job 4
    cancelled = board.cancel(board.warm(copy.copy(journal[5])).id)
    journal[5] = copy.copy(cancelled)  # the cancel is saved
    assert watched.state is State.QUEUED and cancelled.state is State.CANCELLED
    handed = []
    while True:
        got = take(board, "w1", 10)
        handed += [j.id for j in got]
        for job in got:
            board.complete("w1", [ok(job)])
        if not got and not read_back(board, journal):
            break
    assert handed == [1, 2, 3, 4, 6]  # 4 in its place, as its watched record; 5 never
    assert board.jobs[4] is watched and watched.state is State.SUCCEEDED
    assert not board.cold and not board._warmed


def test_a_restored_master_keeps_the_window_and_leaves_the_rest_cold():
    board = cold_board()
    jobs = board.submit([shell(str(i)) for i in range(8)])
    take(board, "w1", 1)  # job 1 runs
    restored = cold_board()
    restored.restore([copy.copy(j) for j in jobs])
    assert sorted(i for i, j in restored.jobs.items() if j.state is State.QUEUED) == [2, 3, 4]
    assert 1 in restored.jobs and restored.is_cold(5) and restored.is_cold(8)
    assert restored.counts[State.QUEUED] == 7


def test_a_worker_keeps_no_record_of_jobs_it_no_longer_holds(board):
    jobs = board.submit([shell(str(i)) for i in range(50)])
    handed = take(board, "w1", 50)
    board.complete("w1", [ok(j) for j in handed[:40]])
    board.release("w1", [(j.id, j.lease) for j in handed[40:45]])
    board.cancel(handed[45].id)
    worker = board.workers["w1"]
    assert set(worker.batch) == set(worker.held) == {j.id for j in handed[46:]}
    assert len(jobs) == 50


def test_a_queued_job_says_why_it_waits():
    clock = [1000.0]
    board = Board(clock=lambda: clock[0], lease_seconds=10.0, queue_window=2)
    jobs = board.submit([shell(str(i)) for i in range(4)], publish=False)
    saved(board, jobs)
    board.publish(jobs)
    assert board.why_pending(1) == "no slave connected"
    board.register("w1")[0].concurrency = 1
    assert board.why_pending(2) == "next in line for a free slot"
    board.lease("w1", 1)
    assert board.why_pending(2) == "all 1 slot(s) busy"
    assert board.why_pending(4).startswith("waiting in the journal, behind the 1 queued")
    board.heartbeat("w1", Holding(draining=True))
    assert board.why_pending(2) == "every connected slave is draining"
    restored = Board(clock=lambda: clock[0], lease_seconds=10.0)
    restored.restore([copy.copy(j) for j in jobs], Journaled(4, {"queued": 4}, 4, 0, ("w1",)))
    assert restored.why_pending(1).startswith("held after a master restart until slave(s) w1")


# -- retries with backoff --------------------------------------------------------------


def failed(job, **kw) -> Outcome:
    return Outcome(job.id, job.lease, False, error=kw.pop("error", "boom"), exit_code=1, **kw)


def test_a_failed_run_with_retries_left_is_tried_again_after_a_doubling_backoff():
    clock = [1000.0]
    board = Board(clock=lambda: clock[0], lease_seconds=10.0, rng=random.Random(1))
    (job,) = board.submit([JobSpec("shell", (["x"], False), retries=2, retry_backoff=4.0)])
    waits = []
    for run in (1, 2):
        (got,) = take(board, "w1", 1)
        finished, rejected = board.complete("w1", [failed(got, error=f"boom {run}")])
        assert (finished, rejected) == ([], 0) and job.state is State.QUEUED
        assert board.retried == [job] and job.failures == run
        waits.append(job.not_before - clock[0])
        assert board.why_pending(job.id).startswith("backing off until")
        clock[0] = job.not_before  # its backoff is over, but its failure is not saved yet
        assert take(board, "w1", 1) == []
        board.schedule(board.retried)  # the service says it is saved
        board.retried = []
    assert 2.0 <= waits[0] <= 4.0 and 4.0 <= waits[1] <= 8.0  # doubled, with jitter
    (got,) = take(board, "w1", 1)
    assert job.attempts == 3
    finished, _ = board.complete("w1", [failed(got, error="boom 3")])
    assert finished == [job] and job.state is State.FAILED and job.error == "boom 3"
    assert [h["error"] for h in job.history] == ["boom 1", "boom 2"]
    assert board.counts[State.FAILED] == 1 and board.counts[State.QUEUED] == 0


def test_retries_are_apart_from_lost_slaves_and_a_cancel_stops_the_backoff():
    clock = [1000.0]
    board = Board(clock=lambda: clock[0], lease_seconds=10.0, max_attempts=1)
    a, b = board.submit([JobSpec("shell", (["x"], False), retries=1, retry_backoff=1.0)] * 2)
    take(board, "w1", 1)
    board.complete("w1", [failed(a)])
    board.cancel(a.id)  # during its backoff
    clock[0] += 5
    assert [j.id for j in take(board, "w1", 5)] == [b.id]  # a never runs again
    assert a.state is State.CANCELLED and board.release_due() == 0
    clock[0] += 60  # w1 silent: b's lease lapses; max_attempts=1 fails it, retries aside
    board.expire()
    assert b.state is State.FAILED and b.failures == 0 and "stopped answering" in b.error


def test_a_restored_master_keeps_a_job_backing_off():
    clock = [1000.0]
    board = Board(clock=lambda: clock[0], lease_seconds=10.0)
    (job,) = board.submit([JobSpec("shell", (["x"], False), retries=1, retry_backoff=30.0)])
    take(board, "w1", 1)
    board.complete("w1", [failed(job)])
    restored = Board(clock=lambda: clock[0], lease_seconds=10.0)
    restored.restore([copy.copy(job)])
    restored.register("w2")
    assert restored.lease("w2", 1) == []
    clock[0] = job.not_before + 0.001
    assert [j.id for j in restored.lease("w2", 1)] == [job.id]


# -- dependencies ------------------------------------------------------------------------


def after(board: Board, *deps: int, known: dict | None = None):
    (job,) = board.submit([JobSpec("shell", (["x"], False), after=deps)], publish=False)
    board.depend(job, deps, known or {})
    board.publish([job])
    return job


def test_a_job_waits_until_all_it_comes_after_succeeded():
    board = Board(clock=lambda: 1000.0, lease_seconds=10.0)
    a, b = board.submit([shell("a"), shell("b")])
    c = after(board, a.id, b.id)
    assert board.why_pending(c.id) == "waiting for job 1 and 1 more"
    got = take(board, "w1", 5)
    assert [j.id for j in got] == [a.id, b.id]  # c is not in line
    board.complete("w1", [ok(got[0])])
    assert board.lease("w1", 5) == [] and board.waits_for(c.id) == {b.id}
    board.complete("w1", [ok(got[1])])
    assert [j.id for j in board.lease("w1", 5)] == [c.id]


def test_a_failed_or_cancelled_job_cancels_the_chain_after_it():
    board = Board(clock=lambda: 1000.0, lease_seconds=10.0)
    (a,) = board.submit([shell("a")])
    b = after(board, a.id)
    c = after(board, b.id)
    (got,) = take(board, "w1", 5)
    board.complete("w1", [Outcome(got.id, got.lease, False, error="boom", exit_code=2)])
    assert (b.state, c.state) == (State.CANCELLED, State.CANCELLED)
    assert b.error == "job 1 it comes after failed" and c.error == "job 2 it comes after cancelled"
    assert board.cascaded == [b, c] and board.lease("w1", 5) == []
    late = after(board, a.id, known={})  # after a job that already failed: cancelled at once
    assert late.state is State.CANCELLED and board.counts[State.CANCELLED] == 3


def test_a_long_chain_unwinds_without_recursion():
    board = Board(clock=lambda: 1000.0, lease_seconds=10.0)
    (first,) = board.submit([shell("0")])
    chain = [first]
    for _ in range(3000):
        chain.append(after(board, chain[-1].id))
    board.cancel(first.id)
    assert all(j.state is State.CANCELLED for j in chain) and len(board.cascaded) == 3000


def test_a_restored_master_keeps_jobs_waiting_for_others():
    board = Board(clock=lambda: 1000.0, lease_seconds=10.0)
    a, b = board.submit([shell("a"), shell("b")])
    c = after(board, a.id, b.id)
    restored = Board(clock=lambda: 1000.0, lease_seconds=10.0)
    # b is in memory; a only in the journal, finished: succeeded
    restored.restore([copy.copy(b), copy.copy(c)],
                     Journaled(3, {"queued": 2, "succeeded": 1}, 3, 0, dep_states={1: "succeeded"}))
    assert restored.waits_for(c.id) == {b.id}
    assert [j.id for j in take(restored, "w1", 5)] == [b.id]


def adopted_before_what_it_comes_after(clock, claim_a: bool = True) -> Board:
    """An earlier master saw a (job 1) succeed on w1 and handed w1 b (job 2), which comes
    after a, then died before saving either: the next one adopts w1's run of b (and of a,
    if w1 claims its outcome) while b still waits for a."""
    board = Board(clock=clock, lease_seconds=30)
    (a,) = board.submit([shell("a")])
    b = after(board, a.id)
    saved = [copy.copy(a), copy.copy(b)]  # the journal: a queued, b waiting for it
    take(board, "w1", 1)
    board.complete("w1", [ok(a)])  # not saved yet, nor acknowledged
    assert board.lease("w1", 1) == [b]
    restored = Board(clock=clock, lease_seconds=30, first_lease=b.lease + 100)
    restored.restore(saved, Journaled(2, {"queued": 2}, 2, 0, ("w1",)))
    restored.register("w1", claims(a, b) if claim_a else claims(b))
    assert restored.jobs[b.id].state is State.RUNNING and restored.waits_for(b.id) == {a.id}
    return restored


def test_an_adopted_run_of_a_waiting_job_that_is_lost_waits_again(clock):
    """w1 dies: a's outcome is lost with it, and b runs again only after a, not beside it."""
    board = adopted_before_what_it_comes_after(clock)
    clock.now += 31
    board.register("w2")
    assert {j.id for j in board.expire()} == {1, 2}
    assert [j.id for j in board.lease("w2", 5)] == [1]
    assert board.why_pending(2) == "waiting for job 1"
    board.complete("w2", [ok(board.jobs[1])])
    assert [j.id for j in board.lease("w2", 5)] == [2]


def test_a_job_restored_running_waits_again_if_its_slave_does_not_come_back(clock):
    """The master dies again: its journal has b running on w1 (adopted), and a not
    finished; w1 never comes back."""
    board = adopted_before_what_it_comes_after(clock)
    restored = Board(clock=clock, lease_seconds=30, first_lease=board.first_lease + 100)
    restored.restore([copy.copy(j) for j in board.take_dirty()],
                     Journaled(2, {"running": 2}, 2, 0, ("w1",)))  # fmt: skip
    clock.now += RECONNECT_SECONDS + 31
    restored.register("w2")
    assert {j.id for j in restored.expire()} == {1, 2}
    assert [j.id for j in restored.lease("w2", 5)] == [1]


def test_an_adopted_run_of_a_waiting_job_follows_what_it_comes_after(clock):
    """While w1's run of b goes on, a runs again (its outcome was lost) and finishes: if
    a succeeded, b no longer waits for it (its run handed back, b goes in line); if a
    failed, b is cancelled, and w1 told to drop it."""
    for good in (True, False):
        board = adopted_before_what_it_comes_after(clock, claim_a=False)
        (again,) = take(board, "w2", 5)
        assert again.id == 1
        board.complete("w2", [Outcome(1, again.lease, good, exit_code=0 if good else 1)])
        b = board.jobs[2]
        if good:
            assert board.waits_for(b.id) == set()
            board.release("w1", [(b.id, b.lease)])
            assert board.lease("w2", 5) == [b]
        else:
            assert b.state is State.CANCELLED and b.error == "job 1 it comes after failed"
            assert board.heartbeat("w1", claims(b)).cancelled == (b.id,)


def test_a_retry_freed_by_what_it_comes_after_goes_in_line_only_once_saved(clock):
    """w1's adopted run of b fails (a retry left) while a runs again; a's success then
    frees b's retry: it goes in line once the service says what came before is saved,
    as any retry (a crash that lost b's failure would let it run beside w1's report)."""
    board = adopted_before_what_it_comes_after(clock, claim_a=False)
    b = board.jobs[2]
    b.retries = 1
    (again,) = take(board, "w2", 5)
    assert board.complete("w1", [Outcome(b.id, b.lease, False, error="boom")]) == ([], 0)
    assert board.retried == [b] and b.state is State.QUEUED and b.not_before is not None
    board.schedule(board.retried)  # saved; but b still waits for a: not in line yet
    board.retried = []
    board.complete("w2", [ok(again)])
    assert board.released == [b] and board.waits_for(b.id) == set()
    clock.now = b.not_before + 1  # its backoff is over, but a's success is not saved yet
    assert board.release_due() == 0 and take(board, "w2", 5) == []
    board.schedule(board.released)  # the service says it is saved
    assert board.release_due() == 1 and take(board, "w2", 5) == [b]


# -- priorities, arrays, placement -------------------------------------------------------


def test_higher_priority_goes_first_and_fifo_within_one(board):
    low = board.submit([shell("low") for _ in range(3)])
    high = board.submit([shell("high", priority=5) for _ in range(2)])
    mid = board.submit([shell("mid", priority=1)])
    got = take(board, "w", 10)
    assert [j.id for j in got] == [j.id for j in [*high, *mid, *low]]


def test_a_requeued_job_goes_first_within_its_priority_only(board):
    (low,) = board.submit([shell("low")])
    (high,) = board.submit([shell("high", priority=3)])
    (first,) = take(board, "w", 1)
    assert first is high
    board.release("w", [(high.id, high.lease)])  # handed back: first in its own line
    board.submit([shell("high again", priority=3)])
    assert [j.id for j in board.lease("w", 3)] == [high.id, high.id + 1, low.id]


def test_a_job_runs_only_on_a_slave_with_the_labels_it_requires(board):
    (gpu,) = board.submit([shell("train", requires={"gpu": "1"})])
    (plain,) = board.submit([shell("plain")])
    board.register("cpu")
    board.register("big", labels={"gpu": "1", "zone": "a"})
    assert board.why_pending(gpu.id) == "next in line for a free slot"
    assert board.lease("cpu", 5) == [plain]
    assert board.lease("big", 5) == [gpu]


def test_a_job_no_connected_slave_can_run_says_so(board):
    (job,) = board.submit([shell("train", requires={"gpu": "1", "zone": "b"})])
    board.register("cpu", labels={"zone": "b"})
    assert board.lease("cpu", 1) == []
    assert board.why_pending(job.id) == "no slave with gpu=1,zone=b connected"
    board.register("gpu", labels={"gpu": "1", "zone": "b"})
    assert board.lease("gpu", 1) == [job]


def test_an_array_runs_at_most_its_cap_and_the_rest_follow_in_order(board):
    tasks = board.submit([shell("t", array=(i, 2)) for i in range(5)])
    assert {t.array for t in tasks} == {tasks[0].id} and [t.array_index for t in tasks] == [
        0, 1, 2, 3, 4]  # fmt: skip
    (other,) = board.submit([shell("other")])
    got = take(board, "w", 10)
    assert got == [tasks[0], tasks[1], other]  # the cap: two; the others are not held up
    assert board.why_pending(tasks[2].id) == f"array {tasks[0].id} has 2 task(s) running, its cap"
    board.complete("w", [ok(tasks[0])])
    assert board.lease("w", 10) == [tasks[2]]
    board.cancel(tasks[3].id)  # a task set aside may be cancelled
    board.complete("w", [ok(tasks[1])])
    assert board.lease("w", 10) == [tasks[4]]
    board.complete("w", [Outcome(tasks[2].id, tasks[2].lease, False, exit_code=1)])
    board.complete("w", [ok(tasks[4])])
    assert board.in_line() == 0 and not board._capped and not board._running_in


def test_an_array_cap_counts_runs_that_end_any_way(board, clock):
    tasks = board.submit([shell("t", array=(i, 1)) for i in range(4)])
    board.register("a")
    board.register("b")
    (first,) = board.lease("a", 5)
    assert board.lease("b", 5) == []  # the cap: one at a time
    board.release("a", [(first.id, first.lease)])  # handed back
    (again,) = board.lease("b", 5)
    assert again is first
    board.cancel(first.id)  # cancelled while running
    (second,) = board.lease("a", 5)
    assert second is tasks[1]
    clock.now += 31  # a: silent past its lease: the run is requeued
    board.seen("b")
    board.expire()
    assert [j.id for j in board.lease("b", 5)] == [tasks[1].id]


def test_a_cold_job_of_higher_priority_is_read_back_at_once(clock):
    board = Board(clock=clock, queue_window=4)
    journal = {}
    low = board.submit([shell("low") for _ in range(6)], publish=False)
    journal.update(saved(board, low))
    board.publish(low)  # 4 in memory, 2 cold
    assert board.cold_span() is None  # the memory is well filled with its own priority
    high = board.submit([shell("high", priority=9) for _ in range(2)], publish=False)
    journal.update(saved(board, high))
    board.publish(high)  # the window is full: they wait cold, at their own priority
    assert all(board.is_cold(j.id) for j in high)
    assert board.cold_span() == (high[0].id, high[-1].id, 9)  # read back now, not later
    assert read_back(board, journal) == 2
    board.register("w")
    assert [j.id for j in board.lease("w", 3)] == [high[0].id, high[1].id, low[0].id]


def test_restored_priorities_and_arrays_keep_their_order_and_cap(clock):
    board = Board(clock=clock)
    tasks = board.submit([shell("t", array=(i, 1)) for i in range(3)])
    board.submit([shell("urgent", priority=2)])
    board.register("w")
    running = board.lease("w", 1)  # the urgent one
    assert running[0].priority == 2
    (task,) = board.lease("w", 5)  # one task: the cap
    assert task is tasks[0]
    rows = [copy.copy(j) for j in board.jobs.values()]
    again = Board(clock=clock)
    assert again.restore(rows) == 2
    again.register("w", Holding(((running[0].id, running[0].lease), (task.id, task.lease))))
    clock.now += RECONNECT_SECONDS + 31
    assert again.lease("w", 5) == []  # tasks[0] still runs: the cap holds after a restart
    again.complete("w", [ok(task)])
    assert [j.id for j in again.lease("w", 5)] == [tasks[1].id]


def test_a_slave_holding_lower_priority_work_ahead_is_told_to_hand_it_back(board):
    board.register("w")
    board.workers["w"].concurrency = 1
    low = board.submit([shell("low") for _ in range(4)])
    assert board.lease("w", 4) == low  # one runs, three are held ahead
    assert board.yield_to("w") is None  # nothing of higher priority waits
    (urgent,) = board.submit([shell("urgent", priority=3)])
    assert board.yield_to("w") == 3  # its unstarted jobs below 3 should come back
    board.register("gpu-less", labels={})
    (gpu,) = board.submit([shell("g", priority=9, requires={"gpu": "1"})])
    assert board.yield_to("w") == 3  # it cannot run the gpu job: that one does not count
    board.release("w", [(j.id, j.lease) for j in low[1:]])
    assert board.yield_to("w") is None  # it holds no more than its slot
    assert board.lease("w", 5)[0] is urgent and gpu.state is State.QUEUED


def test_cancelling_the_task_let_go_at_the_cap_lets_the_next_go(board):
    tasks = board.submit([shell("t", array=(i, 1)) for i in range(3)])
    (first,) = take(board, "w", 5)
    board.complete("w", [ok(first)])  # tasks[1] goes in line...
    board.cancel(tasks[1].id)  # ... and is cancelled before any slave takes it
    assert board.lease("w", 5) == [tasks[2]]


def test_a_failure_reported_for_a_requeued_run_keeps_the_array_count(board, clock):
    tasks = board.submit([shell("t", array=(i, 2), retries=1) for i in range(3)])
    (first,) = take(board, "w", 1)
    (second,) = take(board, "v", 1)
    clock.now += 31
    board.seen("v")
    board.expire()  # w went silent: its run is requeued
    board.complete("w", [Outcome(first.id, first.lease, False, exit_code=1)])  # late, failed
    assert first.state is State.QUEUED and first.not_before is not None
    assert board._running_in == {tasks[0].id: 1}  # the second task, still running on v
    assert board.lease("v", 5) == [tasks[2]]  # not the one backing off
    board.schedule(board.retried)  # (once the failure is saved)
    clock.now += 3600
    board.release_due()
    assert board.lease("v", 5) == []  # the cap: two run
    board.complete("v", [ok(second)])
    assert board.lease("v", 5) == [first]


def test_mixed_priorities_going_cold_make_one_range_per_priority(clock):
    board = Board(clock=clock, queue_window=2)
    jobs = board.submit([shell("x", priority=i % 2) for i in range(20)], publish=False)
    journal = saved(board, jobs)
    board.publish(jobs)
    assert sorted(c[4] for c in board.cold) == [0, 1]
    assert board.cold_span() is None  # job 2 (priority 1) is in line: enough for now
    board.register("w")
    handed = []
    while len(handed) < 20:
        read_back(board, journal)
        handed += board.lease("w", 1)
    assert [j.priority for j in handed] == [1] * 10 + [0] * 10
    assert [j.id for j in handed] == sorted(j.id for j in handed if j.priority) + sorted(
        j.id for j in handed if not j.priority)  # fmt: skip


def test_an_idle_slave_gets_work_back_though_jobs_for_others_wait(board):
    board.register("busy")
    board.register("idle")
    board.workers["busy"].concurrency = 1
    board.workers["busy"].avg_seconds = 10.0  # long jobs: worth moving
    board.submit([shell("long") for _ in range(5)])
    assert len(board.lease("busy", 5)) == 5
    board.submit([shell("g", requires={"gpu": "1"})])  # nobody here can run it
    assert board.lease("idle", 5) == []
    assert board.give_back("busy") == 2

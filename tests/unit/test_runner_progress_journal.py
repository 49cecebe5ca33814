from __future__ import annotations

import contextlib
import logging
import time

import pytest

from scheduler.board import Board
from scheduler.errors import JournalError
from scheduler.job import Job, JobSpec, State
from scheduler.journal import Journal
from scheduler.progress import Progress, RateLimit
from scheduler.runner import Tail


def test_tail_keeps_the_last_bytes_and_counts_the_rest():
    tail = Tail(10)
    for chunk in (b"0123456789", b"abcdef", b"XYZ"):
        tail.write(chunk)
    assert tail.text() == "[... 9 bytes dropped ...]\n9abcdefXYZ"
    small = Tail(100)
    small.write(b"hi\n")
    assert small.text() == "hi\n" and Tail(5).text() is None


def test_tail_stays_bounded_under_many_writes():
    tail = Tail(1024)
    for _ in range(10_000):
        tail.write(b"x" * 100)
    assert sum(map(len, tail._chunks)) <= 1024 + 100


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_rate_limit_allows_a_few_per_second_and_counts_the_rest():
    clock = Clock()
    limit = RateLimit(clock, per_second=3)
    assert [limit() for _ in range(5)] == [True, True, True, False, False]
    clock.now = 1.0
    assert limit() and limit.suppressed == 2


def test_progress_line_has_done_total_rate_and_eta(caplog):
    clock = Clock()
    progress = Progress(clock, interval=5, lines_per_second=2)
    counts = {s: 0 for s in State}
    counts.update({State.SUCCEEDED: 40, State.FAILED: 10, State.QUEUED: 100, State.RUNNING: 4})
    clock.now = 10.0
    with caplog.at_level(logging.INFO, logger="scheduler.progress"):
        progress.tick(counts, total=154)
    line = caplog.messages[-1]
    assert line.startswith("progress: 50/154 done, 4 running, 100 queued, 10 failed")
    assert "5.0 jobs/s" in line and "ETA 21s" in line
    caplog.clear()
    clock.now = 20.0
    progress.tick(counts, total=154)
    assert caplog.messages == []  # nothing changed, nothing said


def test_journal_round_trip_and_group_commit(tmp_path):
    state = tmp_path / "state"
    journal = Journal(state)
    assert state.stat().st_mode & 0o777 == 0o700  # job arguments are private
    board = Board()
    jobs = board.submit([JobSpec("shell", (["echo", "hi"], False), "n", {"k": "v"}, 3.0, 2),
                         JobSpec("python", ("d1", b"args"))])  # fmt: skip
    board.register("w")
    board.lease("w", 1)
    tickets = [journal.append(board.take_dirty(), {"d1": b"body"}) for _ in range(3)]
    journal.wait(tickets[-1])
    journal.close()
    again = Journal(state)
    loaded, funcs, _ = again.load(keep_finished=10)
    again.close()
    assert funcs == {"d1": b"body"}
    by_id = {j.id: j for j in loaded}
    assert by_id[1].payload == (["echo", "hi"], False) and by_id[1].labels == {"k": "v"}
    assert by_id[1].state is State.RUNNING and by_id[1].lease == jobs[0].lease
    assert by_id[2].state is State.QUEUED


def test_a_journal_of_another_format_is_refused_clearly(tmp_path):
    import sqlite3

    import pytest

    from scheduler.errors import JournalError

    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, payload BLOB)")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="has format 0, this master reads format 4"):
        Journal(tmp_path)


def test_restart_loads_unfinished_and_recent_finished_jobs_only(tmp_path):
    from scheduler.board import Outcome

    journal = Journal(tmp_path)
    board = Board()
    board.submit([JobSpec("shell", (["true"], False)) for _ in range(6)])
    board.register("w")
    for job in board.lease("w", 4):
        board.complete("w", [Outcome(job.id, job.lease, True)])
    board.lease("w", 1)  # job 5 running, job 6 queued
    journal.wait(journal.append(board.take_dirty()))
    loaded, _, stored = journal.load(keep_finished=2)
    assert sorted(j.id for j in loaded) == [3, 4, 5, 6]
    assert stored.total == 6 and stored.counts == {"succeeded": 4, "running": 1, "queued": 1}
    again = Board()
    assert again.restore(loaded, stored) == 1  # job 5 waits for its slave to come back
    assert again.status()["counts"] == {
        "queued": 1, "running": 1, "succeeded": 4, "failed": 0, "cancelled": 0,
    }  # fmt: skip
    assert again.submit([JobSpec("shell", (["true"], False))])[0].id == 7
    assert journal.fetch(1).state is State.SUCCEEDED and journal.fetch(99) is None
    journal.close()


def old_journal(directory, schema: str, version: int) -> None:
    """A journal as an earlier version wrote it, with one queued job (lease 9)."""
    import sqlite3

    db = sqlite3.connect(directory / "journal.sqlite3")
    db.executescript(schema)
    db.execute(f"PRAGMA user_version = {version}")
    db.execute(
        "INSERT INTO jobs (id, kind, args, state, lease) VALUES (1, 'shell', ?, 'queued', 9)",
        (b'[["true"], false]',),
    )
    db.commit()
    db.close()


def test_a_journal_of_format_1_is_upgraded_in_place(tmp_path):
    from scheduler import journal as journal_module

    old_journal(tmp_path, journal_module._SCHEMA, 1)
    journal = Journal(tmp_path)
    jobs, _, stored = journal.load(10)
    journal.close()
    assert [j.id for j in jobs] == [1] and stored.max_lease == 9


def test_a_journal_of_format_2_is_upgraded_and_keeps_retries_and_history(tmp_path):
    from scheduler import journal as journal_module
    from scheduler.board import Outcome

    old_journal(tmp_path, journal_module._SCHEMA + journal_module._SCHEMA_V2, 2)
    journal = Journal(tmp_path)
    (old,), _, _ = journal.load(10)
    assert (old.retries, old.failures, old.history) == (0, 0, None)
    board = Board(clock=lambda: 1000.0)
    board.restore([old])
    (job,) = board.submit([JobSpec("shell", (["false"], False), retries=2, retry_backoff=5.0)])
    board.register("w")
    board.lease("w", 2)
    board.complete("w", [Outcome(job.id, job.lease, False, error="boom", exit_code=1)])
    journal.wait(journal.append(board.take_dirty()))
    journal.close()
    again = {j.id: j for j in Journal(tmp_path).load(10)[0]}[job.id]
    assert (again.retries, again.retry_backoff, again.failures) == (2, 5.0, 1)
    assert again.state is State.QUEUED and 1002.5 <= again.not_before <= 1005.0
    assert [(h["worker"], h["exit_code"], h["error"]) for h in again.history] == [("w", 1, "boom")]


def test_text_that_is_not_utf8_is_stored_escaped_not_fatal(tmp_path):
    from scheduler.board import Outcome

    journal = Journal(tmp_path)
    board = Board()
    (job,) = board.submit([JobSpec("shell", (["ls", "caf\udce9"], False), "n\udcff")])
    board.register("w")
    board.lease("w", 1)
    board.complete("w", [Outcome(job.id, job.lease, False, error="name \udcff",
                                 stdout="out \udcfe", stderr="\ud800")])  # fmt: skip
    assert journal.wait(journal.append(board.take_dirty()), timeout=10)
    assert journal.failing is None
    again = journal.fetch(job.id)
    journal.close()
    assert again.error == "name \\udcff" and again.stdout == "out \\udcfe"
    assert again.payload == (["ls", "caf\udce9"], False)  # the command itself is exact


def test_a_lease_reservation_is_loaded_as_the_highest_lease(tmp_path):
    journal = Journal(tmp_path)
    journal.wait(journal.append([], meta={"lease_ceiling": 5000}))
    assert journal.load(10)[2].max_lease == 5000
    journal.close()


def test_a_failed_write_is_retried_and_an_abandoned_entry_is_never_written(tmp_path):
    journal = Journal(tmp_path)
    board = Board()
    journal._db.execute("PRAGMA query_only = ON")  # every write fails until switched off
    (a,) = board.submit([JobSpec("shell", (["a"], False))])
    kept = journal.append(board.take_dirty())
    (b,) = board.submit([JobSpec("shell", (["b"], False))])
    dropped = journal.append(board.take_dirty())
    import pytest

    from scheduler.errors import JournalError

    with pytest.raises(JournalError, match="cannot write"):
        journal.wait(dropped, give_up=True)
    assert journal.failing and journal.abandon(dropped)
    journal._db.execute("PRAGMA query_only = OFF")
    assert journal.wait(kept, timeout=10)
    assert journal.fetch(a.id) is not None and journal.fetch(b.id) is None
    assert journal.failing is None
    journal.close()


def test_a_journal_of_format_3_is_upgraded_and_keeps_priority_placement_and_arrays(tmp_path):
    from scheduler import journal as journal_module

    schema = journal_module._SCHEMA + journal_module._SCHEMA_V2 + journal_module._SCHEMA_V3
    old_journal(tmp_path, schema, 3)
    journal = Journal(tmp_path)
    (old,), _, _ = journal.load(10)
    assert (old.priority, old.requires, old.array, old.array_cap) == (0, None, None, 0)
    board = Board()
    board.restore([old])
    new = board.submit([
        JobSpec("shell", (["a"], False), priority=-3, requires={"gpu": "1"}),
        *(JobSpec("shell", (["t"], False), array=(i, 2)) for i in (7, 8)),
    ])  # fmt: skip
    journal.wait(journal.append(board.take_dirty()))
    journal.close()
    again = {j.id: j for j in Journal(tmp_path).load(10)[0]}
    assert [(again[j.id].priority, again[j.id].requires) for j in new] == [
        (-3, {"gpu": "1"}), (0, None), (0, None)]  # fmt: skip
    assert [(again[j.id].array, again[j.id].array_index, again[j.id].array_cap)
            for j in new[1:]] == [(new[1].id, 7, 2), (new[1].id, 8, 2)]  # fmt: skip


def test_the_queue_window_loads_the_highest_priorities_and_leaves_the_rest_cold(tmp_path):
    journal = Journal(tmp_path)
    board = Board()
    jobs = board.submit([JobSpec("shell", (["x"], False), priority=p) for p in (0, 5, 0, 5, 1, 0)])
    journal.wait(journal.append(board.take_dirty()))
    loaded, _, stored = journal.load(10, queue_window=3)
    # ids 1..6 with priorities 0 5 0 5 1 0: in line 2, 4 (priority 5), then 5 (1); cold:
    # priority 0's 1..6 (1, 3, 6)
    assert [j.id for j in loaded] == [2, 4, 5]
    assert stored.cold == ((1, 6, 0),)
    assert [j.id for j in journal.queued_between(1, 6, 10, priority=0)] == [1, 3, 6]
    again = Board(queue_window=3)
    again.restore(loaded, stored)
    again.register("w")
    assert [j.id for j in again.lease("w", 10)] == [2, 4, 5]
    assert again.cold_span() == (1, 6, 0)
    journal.close()
    assert len(jobs) == 6


def test_a_long_call_ends_its_batch_and_the_rest_comes_back_unstarted():
    """Batches are made of calls that were tiny so far; one that is long (BATCH_BREAK)
    must not hold the rest in the child, where no other slot or priority can get at them."""
    import pickle
    import time as clock

    from scheduler.protocol import Lease
    from scheduler.runner import BATCH_BREAK, Abort, PythonSlot

    digest, body = "sleep", pickle.dumps(clock.sleep)
    batch = [Lease(i, i, "python", (digest, pickle.dumps(((s,), {}))), None)
             for i, s in enumerate([0.0, BATCH_BREAK * 2, 0.0, 0.0], 1)]  # fmt: skip
    slot = PythonSlot(1024, 1 << 20)
    try:
        done: list = []
        rest = slot.run(batch, {digest: body}, Abort(), done.append)
        assert [o.job_id for o in done] == [1, 2] and all(o.ok for o in done)
        assert [x.job_id for x in rest] == [3, 4]
        assert slot.run(rest, {digest: body}, Abort(), done.append) == []  # in step still
        assert [o.job_id for o in done] == [1, 2, 3, 4]
    finally:
        slot.close()


def test_a_slot_child_killed_before_it_made_its_process_group_dies():
    """A timeout or cancel right after a child was (re)started, before its first step
    (os.setsid): killing only the group missed it, and it ran the job on regardless."""
    import os
    import signal

    from scheduler.runner import PythonSlot

    slot = PythonSlot(1024, 1 << 20)
    slot._ensure()
    proc = slot._proc
    try:
        slot.kill()  # at once: a spawned child takes a good 50 ms to get there
        proc.join(5)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(5)
        slot._conn.close()


def test_a_slot_sends_its_child_work_with_plain_pickle(monkeypatch):
    """The pipe to the job process pickles plainly (protocol.PlainConnection): the
    stdlib's ForkingPickler costs five times more per message, twice a job."""
    import pickle
    from multiprocessing import reduction

    from scheduler.protocol import Lease
    from scheduler.runner import Abort, PythonSlot

    def forbidden(*args, **kwargs):
        raise AssertionError("a message went through ForkingPickler")

    slot = PythonSlot(1024, 1 << 20)
    try:
        monkeypatch.setattr(reduction.ForkingPickler, "dumps", classmethod(forbidden))
        done: list = []
        lease = Lease(1, 1, "python", ("abs", pickle.dumps(((-3,), {}))), None)
        assert slot.run([lease], {"abs": pickle.dumps(abs)}, Abort(), done.append) == []
        assert [(o.ok, pickle.loads(o.result)) for o in done] == [(True, 3)]
    finally:
        slot.close()


def test_an_empty_append_queues_nothing_and_its_ticket_follows_the_queue(tmp_path):
    """The tick appends what changed ten times a second; on an idle master that is nothing,
    and each woke the writer thread for an empty transaction."""
    journal = Journal(tmp_path)
    try:
        kicks, writes = [], []
        notify, write = journal._kick.notify, journal._write
        journal._kick.notify = lambda n=1: (kicks.append(n), notify(n))  # type: ignore
        journal._write = lambda entries: (writes.append(len(entries)), write(entries))  # type: ignore
        assert journal.saved(journal.append([])) and kicks == [] and writes == []
        board = Board()
        board.submit([JobSpec("shell", (["true"], False))])
        held = journal.append(board.take_dirty(), wake=False)  # queued, not written yet
        empty = journal.append([], roster=[])
        assert empty == held and not journal.saved(empty) and kicks == []
        assert journal.wait(empty) and journal.saved(held) and writes == [1]
    finally:
        journal.close()


def test_the_writer_thread_wakes_only_for_what_nobody_waits_for(tmp_path):
    """Commits a caller waits for are written in the caller's thread and wake nobody else
    (a wake-up of the writer thread at each was two context switches per commit); an entry
    nobody waits for, appended while another thread writes, is written once that write ends."""
    import threading
    import time

    journal = Journal(tmp_path)
    board = Board()
    kicks = []
    notify = journal._kick.notify
    journal._kick.notify = lambda n=1: (kicks.append(n), notify(n))  # type: ignore[method-assign]
    writers: list[str] = []
    journal.on_commit = lambda took: writers.append(threading.current_thread().name)
    for i in range(20):
        board.submit([JobSpec("shell", ([f"job{i}"], False))])
        journal.wait(journal.append(board.take_dirty(), wake=False))
    assert kicks == [] and writers == ["MainThread"] * 20

    inside, release = threading.Event(), threading.Event()
    write = journal._write

    def slow_write(entries):
        inside.set()
        release.wait(10)
        write(entries)

    journal._write = slow_write  # type: ignore[method-assign]
    board.submit([JobSpec("shell", (["slow"], False))])
    slow = journal.append(board.take_dirty(), wake=False)
    waiter = threading.Thread(target=journal.wait, args=(slow,), name="waiter")
    waiter.start()
    assert inside.wait(10)
    journal._write = write  # type: ignore[method-assign]
    (late,) = board.submit([JobSpec("shell", (["unattended"], False))])
    unattended = journal.append(board.take_dirty())  # wake=True: the writer thread's
    kicked = len(kicks)
    release.set()
    waiter.join(10)
    assert len(kicks) > kicked  # the inline write ending handed the rest to the writer
    deadline = time.monotonic() + 10
    while not journal.saved(unattended) and time.monotonic() < deadline:
        time.sleep(0.01)  # not wait(): that would write it in this thread
    assert journal.fetch(late.id) is not None
    assert writers[-2:] == ["waiter", "journal"]

    journal._db.execute("PRAGMA query_only = ON")  # a write a waiter makes fails:
    board.submit([JobSpec("shell", (["fails"], False))])
    failing = journal.append(board.take_dirty(), wake=False)
    kicked = len(kicks)
    with pytest.raises(JournalError):
        journal.wait(failing, give_up=True)
    assert len(kicks) > kicked  # the writer thread retries it now, not in a second
    journal._db.execute("PRAGMA query_only = OFF")
    assert journal.wait(failing, timeout=10)
    journal.close()


@pytest.mark.parametrize("update_from", [True, False])
def test_many_jobs_written_many_rows_a_statement_each_keep_their_own_values(
    tmp_path, monkeypatch, update_from
):
    """Plain submits and plain finishes are written 64, 16, 4 and 1 rows a statement (and
    without UPDATE ... FROM on an SQLite before 3.33): 150 jobs, each its own result."""
    import scheduler.journal as journal_module
    from scheduler.protocol import Outcome

    monkeypatch.setattr(journal_module, "_UPDATE_FROM", update_from)
    journal, board = Journal(tmp_path), Board()
    board.register("w")
    jobs = board.submit([JobSpec("python", ("d1", f"args{i}".encode())) for i in range(150)])
    journal.wait(journal.append(board.take_dirty(), {"d1": b"body"}))
    leased = board.lease("w", 150)
    board.complete("w", [Outcome(j.id, j.lease, True, f"result{j.id}".encode()) for j in leased])
    journal.wait(journal.append(board.take_dirty()))
    journal.close()
    again = Journal(tmp_path)
    loaded = {j.id: j for j in again.load(keep_finished=1000)[0]}
    again.close()
    assert sorted(loaded) == [j.id for j in jobs]
    for job in jobs:
        got = loaded[job.id]
        assert got.state is State.SUCCEEDED and got.worker == "w" and got.lease == job.lease
        assert got.payload == ("d1", f"args{job.id - 1}".encode())
        assert got.result == f"result{job.id}".encode()


def test_the_load_reads_the_states_of_what_running_jobs_come_after(tmp_path):
    """A job saved running after a job the journal still has queued (a master that saw it
    succeed died before saving that): the load says that job's state even when it stays
    cold, so the restored job waits for it again if its own run is lost."""
    from scheduler.job import Job

    journal, board = Journal(tmp_path), Board()
    a, b, c = board.submit([JobSpec("shell", ([x], False)) for x in "abc"])
    journal.wait(journal.append(board.take_dirty()))
    running = Job(4, "shell", (["d"], False), state=State.RUNNING, worker="w", lease=7,
                  attempts=1, after=(c.id,))  # fmt: skip
    journal.wait(journal.append([running]))
    jobs, _, stored = journal.load(keep_finished=10, queue_window=1)
    journal.close()
    assert {j.id for j in jobs} == {a.id, running.id}  # b and c stay cold
    assert stored.dep_states == {c.id: "queued"}


# -- the WAL checkpoint, off the path of commits -------------------------------------------


def _fat_jobs(first: int, n: int) -> list[Job]:
    """Finished jobs of about a page each (their output): n commits of them fill n pages."""
    return [Job(i, "shell", (["true"], False), state=State.SUCCEEDED, ended=1.0,
                stdout="x" * 3000) for i in range(first, first + n)]  # fmt: skip


def _commit_one_by_one(journal: Journal, jobs: list[Job]) -> None:
    for job in jobs:
        assert journal.wait(journal.append([job], wake=False), timeout=30)


def test_no_commit_copies_the_wal_into_the_database_itself(tmp_path, monkeypatch):
    """SQLite's own checkpoint ran inside the commit that crossed 1,000 WAL pages, fsyncs
    and all, with every other writer (a submit) waiting; the checkpointer thread does it."""
    from scheduler import journal as journal_module

    monkeypatch.setattr(journal_module, "CHECKPOINT_SECONDS", 3600.0)
    monkeypatch.setattr(journal_module, "CHECKPOINT_COMMITS", 10**9)
    journal = Journal(tmp_path)
    try:
        _commit_one_by_one(journal, _fat_jobs(1, 1500))
        wal = journal.path.with_name(journal.path.name + "-wal")
        # with a checkpoint at 1,000 pages the WAL starts over and stays near 4 MB
        assert wal.stat().st_size > 1400 * 4096
        assert journal.path.stat().st_size < 100 * 4096 and journal.checkpoints == 0
    finally:
        journal.close()
    assert not wal.exists()  # the last connection to close copies it all
    again = Journal(tmp_path)
    try:
        assert len(again.select(None, 10_000, None)) == 1500
    finally:
        again.close()


def test_the_checkpointer_copies_the_wal_a_while_after_commits_or_after_many(
    tmp_path, monkeypatch
):
    from scheduler import journal as journal_module

    monkeypatch.setattr(journal_module, "CHECKPOINT_SECONDS", 0.05)
    journal = Journal(tmp_path)
    try:
        _commit_one_by_one(journal, _fat_jobs(1, 300))
        deadline = time.monotonic() + 10
        while journal.path.stat().st_size < 300 * 3000 or not journal.checkpoints:
            assert time.monotonic() < deadline, "the WAL was never copied in"
            time.sleep(0.01)
    finally:
        journal.close()
    monkeypatch.setattr(journal_module, "CHECKPOINT_SECONDS", 3600.0)
    monkeypatch.setattr(journal_module, "CHECKPOINT_COMMITS", 50)
    journal = Journal(tmp_path)
    try:
        _commit_one_by_one(journal, _fat_jobs(301, 49))
        time.sleep(0.2)
        assert journal.checkpoints == 0  # neither due yet
        _commit_one_by_one(journal, _fat_jobs(350, 1))
        deadline = time.monotonic() + 10
        while journal.checkpoints == 0:
            assert time.monotonic() < deadline, "no checkpoint after CHECKPOINT_COMMITS"
            time.sleep(0.01)
    finally:
        journal.close()


def test_the_wal_starts_over_under_steady_writes(tmp_path, monkeypatch):
    """Only a WAL copied to its end starts over; copied beside writers that never pause,
    it never was, and grew for as long as they wrote (1 GB in 10 s). The checkpointer
    copies the rest in the writers' turn."""
    import threading

    from scheduler import journal as journal_module

    monkeypatch.setattr(journal_module, "CHECKPOINT_SECONDS", 0.02)
    monkeypatch.setattr(journal_module, "CHECKPOINT_COMMITS", 500)
    journal = Journal(tmp_path)
    wal = journal.path.with_name(journal.path.name + "-wal")
    stop, biggest = threading.Event(), [0]

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                biggest[0] = max(biggest[0], wal.stat().st_size)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        writers = [threading.Thread(target=_commit_one_by_one,
                                    args=(journal, _fat_jobs(1 + k * 3000, 3000)))
                   for k in range(3)]  # fmt: skip
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(60)
        assert journal.checkpoints >= 2
        assert biggest[0] < 6000 * 4096  # 9,000 commits of a page or more: it started over
    finally:
        stop.set()
        watcher.join()
        journal.close()

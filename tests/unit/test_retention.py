"""Retention: which finished jobs leave the journal, in chunks beside the writer; the
settings, the service's prune and its background pass (injected clock); backup."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

import pytest

from scheduler.board import Board
from scheduler.errors import ConfigError, JournalError, SchedulerError
from scheduler.job import Job, JobSpec, State
from scheduler.journal import Journal, Pruned, backup
from scheduler.progress import Progress
from scheduler.service import Service
from scheduler.settings import format_duration, load, parse_duration

KEY = "k" * 20
DAY = 86400.0
NOW = 100 * DAY


def job(id_: int, state: State = State.SUCCEEDED, ended: float | None = NOW, func: str = "",
        ) -> Job:  # fmt: skip
    """A job as the board leaves it; ``func``: a python job calling that digest."""
    kind, payload = ("python", (func, b"args")) if func else ("shell", (["true"], False))
    return Job(id_, kind, payload, state=state, submitted=(ended or NOW) - 1,
               ended=ended if state.terminal else None)  # fmt: skip


def save(journal: Journal, jobs: list[Job], funcs: dict[str, bytes] | None = None) -> None:
    assert journal.wait(journal.append(jobs, funcs), timeout=30)


def ids(journal: Journal) -> list[int]:
    return sorted(j.id for j in journal.select(None, 1_000_000, None))


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "state")
    yield j
    j.close()


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("1.5", 1.5), ("30s", 30.0), ("30m", 1800.0), ("12h", 43200.0),
    ("7d", 7 * DAY), ("2w", 14 * DAY), (" 7D ", 7 * DAY), ("0", 0.0),
])  # fmt: skip
def test_durations_take_seconds_and_units(text, seconds):
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("text", ["", "-1", "soon", "7y", "7 d", "d", "nan", "inf", "1e400"])
def test_a_bad_duration_is_one_line_naming_the_option(text):
    with pytest.raises(ConfigError) as bad:
        parse_duration(text, "--older-than")
    assert str(bad.value).startswith("--older-than: expected a duration") and "\n" not in str(
        bad.value
    )


def test_retain_settings_default_to_a_week_and_no_count_limit():
    cfg = load({"SCHEDULER_AUTHKEY": KEY})
    assert cfg.retain == 7 * DAY and cfg.retain_count is None
    for off in ("0", "off", "OFF"):
        assert load({"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_RETAIN": off}).retain is None
    cfg = load({"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_RETAIN": "12h",
                "SCHEDULER_RETAIN_COUNT": "2000"})  # fmt: skip
    assert (cfg.retain, cfg.retain_count) == (43200.0, 2000)
    assert format_duration(7 * DAY) == "7d" and format_duration(90) == "90s"


@pytest.mark.parametrize("name, value, message", [
    ("SCHEDULER_RETAIN", "soon", "SCHEDULER_RETAIN: expected a duration .* or 0/off"),
    ("SCHEDULER_RETAIN", "-3d", "SCHEDULER_RETAIN: expected a duration"),
    ("SCHEDULER_RETAIN_COUNT", "0", "SCHEDULER_RETAIN_COUNT: expected a positive integer"),
    ("SCHEDULER_RETAIN_COUNT", "many", "SCHEDULER_RETAIN_COUNT: expected a positive integer"),
])  # fmt: skip
def test_bad_retain_settings_are_one_line(name, value, message):
    with pytest.raises(ConfigError, match=message) as bad:
        load({"SCHEDULER_AUTHKEY": KEY, name: value})
    assert "\n" not in str(bad.value)


# -- the pruning rules -------------------------------------------------------------------


def test_age_rule_removes_jobs_that_ended_before_the_limit_only(journal):
    save(journal, [job(1, ended=NOW - 9 * DAY), job(2, State.FAILED, NOW - 8 * DAY),
                   job(3, State.CANCELLED, NOW - 7 * DAY - 1), job(4, ended=NOW - 6 * DAY),
                   job(5, ended=NOW - 1)])  # fmt: skip
    pruned = journal.prune(NOW, 7 * DAY, None)
    assert pruned.jobs == 3 and ids(journal) == [4, 5]
    assert journal.prune(NOW, 7 * DAY, None).jobs == 0  # nothing left to do


def test_count_rule_keeps_the_newest_finished_ones(journal):
    save(journal, [job(i) for i in range(1, 11)] + [job(11, State.QUEUED)])
    assert journal.prune(NOW, None, 3).jobs == 7
    assert ids(journal) == [8, 9, 10, 11]  # queued 11 does not count as finished


def test_either_rule_is_enough_when_both_are_set(journal):
    save(journal, [job(1, ended=NOW), job(2, ended=NOW - 10 * DAY), job(3), job(4), job(5)])
    assert journal.prune(NOW, 7 * DAY, 3).jobs == 2  # 1: beyond the newest 3; 2: too old
    assert ids(journal) == [3, 4, 5]


def test_queued_and_running_jobs_are_never_removed_however_old(journal):
    old = NOW - 365 * DAY
    save(journal, [job(1, State.QUEUED, old), job(2, State.RUNNING, old), job(3, ended=old),
                   job(4, State.QUEUED, old), job(5, ended=old)])  # fmt: skip
    assert journal.prune(NOW, 0.0, 0).jobs == 1  # 5 is the newest job: kept, see below
    assert ids(journal) == [1, 2, 4, 5]
    assert {j.id: j.state for j in journal.select(None, 10, None)}[2] is State.RUNNING


def test_the_newest_job_stays_so_a_restarted_master_never_reuses_an_id(journal):
    save(journal, [job(i) for i in range(1, 6)])
    journal.prune(NOW, 0.0, 0)
    assert ids(journal) == [5]
    assert journal.load(10)[2].max_id == 5  # a restart numbers on from 6


def test_no_rule_removes_nothing(journal):
    save(journal, [job(1, ended=0.0), job(2, ended=0.0)])
    assert journal.prune(NOW, None, None) == Pruned(size=journal.prune(NOW, None, None).size)
    assert ids(journal) == [1, 2]


def test_function_bodies_go_with_the_last_job_calling_them(journal):
    old = NOW - 30 * DAY
    save(journal, [job(1, ended=old, func="gone"), job(2, ended=old, func="kept"),
                   job(3, State.QUEUED, old, func="kept"), job(4, ended=old, func="held"),
                   job(5)], {"gone": b"g", "kept": b"k", "held": b"h"})  # fmt: skip
    asked: list[list[str]] = []

    def held_funcs(digests: list[str]) -> set[str]:
        asked.append(sorted(digests))
        return {"held"} & set(digests)

    pruned = journal.prune(NOW, DAY, None, held_funcs=held_funcs)
    assert (pruned.jobs, pruned.funcs) == (3, 1)
    assert asked == [["gone", "held"]]  # "kept" is still called by queued job 3
    assert journal.func("gone") is None and journal.func("kept") == b"k"
    assert journal.func("held") == b"h"  # the master holds it: jobs may come without it


def test_a_body_a_new_job_brings_while_the_pass_runs_stays(journal):
    save(journal, [job(1, ended=0.0, func="f"), job(2)], {"f": b"body"})

    def held_funcs(digests: list[str]) -> set[str]:
        # between the pass's read and its deletion: a new job calling "f" is saved
        save(journal, [job(3, State.QUEUED, func="f")], {"f": b"body"})
        return set()

    assert journal.prune(NOW, DAY, None, held_funcs=held_funcs).funcs == 0
    assert journal.func("f") == b"body"


def test_verify_marks_older_than_the_age_limit_go(journal):
    marks = [("r1", i, "w", NOW - 10 * DAY) for i in range(5)] + [("r2", 0, "w", NOW - 1)]
    assert journal.wait(journal.append([], marks=marks), timeout=30)
    assert journal.prune(NOW, 7 * DAY, None, chunk=2).marks == 5
    assert journal.marks("r1") == [] and len(journal.marks("r2")) == 1
    assert journal.prune(NOW, None, 0).marks == 0  # the count rule leaves marks alone


def test_deletions_free_pages_for_reuse_and_report_sizes(journal):
    save(journal, [Job(i, "shell", (["true"], False), state=State.SUCCEEDED, ended=0.0,
                       stdout="x" * 2000) for i in range(1, 2001)])  # fmt: skip
    pruned = journal.prune(NOW, DAY, None)
    assert pruned.jobs == 1999 and pruned.freed > 1999 * 2000
    with sqlite3.connect(journal.path) as db:  # the WAL copied in (the checkpointer's job)
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    assert pruned.size >= journal.path.stat().st_size > pruned.freed


# -- chunks beside the writer ------------------------------------------------------------


def test_a_submit_commits_between_the_chunks_of_a_big_prune(journal):
    save(journal, [job(i, ended=0.0) for i in range(1, 20_002)])
    board = Board()
    board.restore([], journal.load(0)[2])
    chunks, committed_at = [], []
    submitted = threading.Event()

    def submit() -> None:
        board.submit([JobSpec("shell", (["true"], False))])
        assert journal.wait(journal.append(board.take_dirty(), wake=False), timeout=60)
        committed_at.append(len(chunks))
        submitted.set()

    def stop() -> bool:  # asked between chunks
        chunks.append(1)
        if len(chunks) == 2:
            threading.Thread(target=submit).start()
            # the pass goes on only once the submit committed: had the prune held the
            # writer for the whole pass, this would wait in vain
            assert submitted.wait(timeout=60)
        return False

    pruned = journal.prune(NOW, DAY, None, stop=stop, chunk=1_000)
    assert pruned.jobs == 20_000 and committed_at == [2] and len(chunks) > 10
    assert ids(journal) == [20_001, 20_002]  # the new job came in the middle and stayed


def test_a_deletion_waits_for_entries_queued_before_it(journal):
    save(journal, [job(i, ended=0.0) for i in range(1, 5)] + [job(6)])
    # queued before the pass, nobody waiting for it: the pass writes it first
    late = journal.append([job(5, State.QUEUED)], wake=False)
    assert journal.prune(NOW, DAY, None).jobs == 4
    assert journal.saved(late) and ids(journal) == [5, 6]


def test_a_stop_ends_the_pass_between_chunks(journal):
    save(journal, [job(i, ended=0.0) for i in range(1, 101)])
    asked = []
    pruned = journal.prune(NOW, DAY, None, stop=lambda: len(asked) > 2 or asked.append(1),
                           chunk=10)  # fmt: skip
    assert pruned.jobs == 30 and len(ids(journal)) == 70


def test_a_failing_journal_stops_the_pass_with_one_line(journal):
    save(journal, [job(i, ended=0.0) for i in range(1, 5)])
    journal._db.execute("PRAGMA query_only = ON")
    journal.append([job(9, State.QUEUED)])
    try:
        with pytest.raises(JournalError, match="cannot write"):
            journal.prune(NOW, DAY, None)
    finally:
        journal._db.execute("PRAGMA query_only = OFF")


# -- the service: prune, and the background pass -----------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recording(Journal):
    """A real journal that notes the thread each pass runs in."""

    passes: list[str]

    def prune(self, *args, **kwargs) -> Pruned:  # type: ignore[no-untyped-def]
        self.passes.append(threading.current_thread().name)
        return super().prune(*args, **kwargs)


def finish(svc: Service, n: int, clock: Clock, func: str = "") -> None:
    """Submit, run and finish ``n`` jobs through the service at the clock's time."""
    from scheduler.protocol import VERSION, Lease

    spec = JobSpec("python", (func, b"a")) if func else JobSpec("shell", (["true"], False))
    svc.submit([spec] * n, {func: b"body"} if func else None)
    if "w" not in svc._board.workers:
        svc.register("w", version=VERSION)
    leases, _ = svc.lease("w", n)
    svc.report("w", [(Lease._make(x).job_id, Lease._make(x).lease, True) for x in leases])


@pytest.fixture
def recording(tmp_path):
    j = Recording(tmp_path / "state")
    j.passes = []
    yield j
    j.close()


def make(journal: Journal, clock: Clock, keep: int = 100_000) -> Service:
    return Service(Board(clock=clock), journal, {}, Progress(clock), clock=clock,
                   keep_finished=keep)  # fmt: skip


def test_prune_asked_of_the_service_uses_its_clock_and_returns_counts(recording):
    clock = Clock(NOW)
    svc = make(recording, clock)
    finish(svc, 5, clock)
    clock.now += 2 * DAY
    finish(svc, 3, clock)
    done = svc.prune(older_than=DAY)
    assert (done["jobs"], done["older_than"], done["keep"]) == (5, DAY, None)
    assert done["rules"] == "ended over 1d ago" and done["journal_bytes"] > 0
    assert svc.prune(keep=1)["jobs"] == 2
    assert svc.get(1)["state"] == "succeeded"  # still shown from memory: never rewritten
    assert recording.passes == ["MainThread", "MainThread"]


def test_prune_without_rules_follows_the_masters_settings(recording):
    clock = Clock(NOW)
    svc = make(recording, clock)
    finish(svc, 4, clock)
    assert svc.prune()["jobs"] == 0 and svc.prune()["rules"] == ""  # retention off
    svc._retain = (None, 2)
    assert svc.prune()["jobs"] == 2


@pytest.mark.parametrize("args, message", [
    ((-1, None), "older_than must be a number of seconds >= 0"),
    ((float("nan"), None), "older_than must be"),
    (("1d", None), "older_than must be"),
    ((None, -2), "keep must be a whole number >= 0"),
    ((None, 1.5), "keep must be"),
    ((None, True), "keep must be"),
])  # fmt: skip
def test_prune_refuses_bad_arguments(recording, args, message):
    with pytest.raises(SchedulerError, match=message):
        make(recording, Clock(NOW)).prune(*args)


def test_background_passes_start_from_tick_at_most_every_interval(recording):
    clock = Clock(NOW)
    svc = make(recording, clock)
    svc.start_retention(60.0, None)  # a short age limit: a pass every 6 s (a tenth)
    svc.tick()  # the first pass at once: the journal may hold years
    wait_for(lambda: len(recording.passes) == 1 and not svc._pruning.locked())
    finish(svc, 3, clock)
    for _ in range(5):
        clock.now += 1.0
        svc.tick()
    assert len(recording.passes) == 1  # not due yet: 5 s
    clock.now += 61.0
    svc.tick()
    wait_for(lambda: len(recording.passes) == 2)
    assert recording.passes == ["retention", "retention"]  # never in tick's thread
    wait_for(lambda: ids(recording) == [3])
    svc.close()
    assert not svc._retainer.is_alive()  # type: ignore[union-attr]


def test_a_background_pass_starts_once_many_jobs_finished(recording):
    clock = Clock(NOW)
    svc = make(recording, clock, keep=100)
    svc.start_retention(None, 100)  # passes after max(1000, 100 // 2) finished jobs
    svc.tick()
    wait_for(lambda: len(recording.passes) == 1 and not svc._pruning.locked())
    finish(svc, 999, clock)
    clock.now += 5.0
    svc.tick()
    assert len(recording.passes) == 1
    finish(svc, 1, clock)
    svc.tick()
    wait_for(lambda: len(recording.passes) == 2)
    finish(svc, 2000, clock)
    svc.tick()  # many finished again, but a pass started less than a second ago
    assert len(recording.passes) == 2
    clock.now += 1.0
    svc.tick()
    wait_for(lambda: len(recording.passes) == 3)
    wait_for(lambda: len(ids(recording)) == 100)
    svc.close()


def test_a_background_pass_logs_one_line_when_it_removed_something(recording, caplog):
    clock = Clock(NOW)
    svc = make(recording, clock)
    finish(svc, 10, clock, func="f")
    clock.now += 10 * DAY
    caplog.set_level("INFO", logger="scheduler.service")
    svc.start_retention(7 * DAY, None)
    svc.tick()
    wait_for(lambda: any("left the journal" in m for m in caplog.messages))
    (line,) = [m for m in caplog.messages if "retention" in m]
    assert line.startswith("retention: 9 job(s) left the journal (ended over 7d ago)")
    svc.close()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- backup ------------------------------------------------------------------------------


def test_a_backup_is_a_journal_a_master_starts_from(journal, tmp_path):
    save(journal, [job(1), job(2, State.QUEUED)], {"f": b"body"})
    source, jobs, size = backup(journal.path.parent, tmp_path / "copy.sqlite3")
    assert (source, jobs) == (journal.path, 2) and size > 0
    assert (tmp_path / "copy.sqlite3").stat().st_mode & 0o777 == 0o600
    restored = tmp_path / "restored"
    restored.mkdir()
    (tmp_path / "copy.sqlite3").rename(restored / "journal.sqlite3")
    again = Journal(restored)
    loaded, _, stored = again.load(10)
    again.close()
    assert sorted(j.id for j in loaded) == [1, 2] and stored.counts["queued"] == 1


def test_a_backup_refuses_to_overwrite_unless_forced(journal, tmp_path):
    dest = tmp_path / "copy.sqlite3"
    dest.write_text("precious")
    with pytest.raises(JournalError, match="exists; give --force"):
        backup(journal.path.parent, dest)
    assert dest.read_text() == "precious"
    backup(journal.path.parent, dest, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.sqlite3", "state"]
    with contextlib.closing(sqlite3.connect(dest)) as copy:
        assert copy.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_a_backup_of_no_journal_or_a_foreign_file_says_so(tmp_path):
    with pytest.raises(JournalError, match="no journal at .*give the master's state directory"):
        backup(tmp_path / "nowhere", tmp_path / "copy")
    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / "journal.sqlite3").execute("CREATE TABLE t (x)").close()
    with pytest.raises(JournalError, match="not a scheduler journal"):
        backup(other, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()

"""The journal: jobs persisted to SQLite (WAL) so a master restart loses nothing.

Callers hand it entries (rows, in the order the board changed them) and, when they must,
wait until those are committed. A waiter finding no write under way writes what is queued
itself (no hand-off to another thread on the single-job path); otherwise it waits, and
everything queued meanwhile goes into the next transaction (group commit). A writer
thread writes what nobody waits for, and retries. A write that fails
(disk full, a read-only or vanished directory) is kept and retried, in order, until it
succeeds; meanwhile ``failing`` says why, and a caller that cannot wait (a submit) may
``abandon`` its entry if it was not written yet. Nothing counts as saved before COMMIT.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .board import QUEUE_WINDOW, Journaled
from .errors import JournalError
from .job import DEFAULT_BACKOFF, Job, State

log = logging.getLogger(__name__)


SCHEMA_VERSION = 4
LEASE_BLOCK = 1 << 24  # leases reserved per journal write (about 11 minutes at 25k jobs/s)
RETRY_SECONDS = (0.1, 0.5, 1.0, 2.0)  # backoff between attempts at a failing write
# The WAL is copied into the database file by a thread of its own (``_checkpoint_loop``),
# this long after a commit, or sooner after this many: SQLite's automatic checkpoint ran
# in the commit that crossed 1,000 pages, fsyncs included (4 ms here, tens of ms on a slow
# disk), while every other writer, a submit among them, waited.
CHECKPOINT_SECONDS = 1.0
CHECKPOINT_COMMITS = 1_000
WAL_KEEP_BYTES = 16 << 20  # a WAL that grew past this (a burst) shrinks back when it restarts
PRUNE_CHUNK = 1_000  # rows one pruning transaction deletes: the writer waits at most that long
_FINISHED = "state IN ('succeeded', 'failed', 'cancelled')"
_FIXED = (
    "id, kind, func, args, name, labels, timeout, max_attempts, submitted, retries, "
    "retry_backoff, after, priority, requires, array_id, array_index, array_cap"
)
_CHANGING = (
    "state, attempts, worker, lease, started, ended, exit_code, result, error, stdout, stderr, "
    "failures, not_before, history"
)
_COLUMNS = f"{_FIXED}, {_CHANGING}"
_INSERT = f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 31)})"
# a new job, as submitted: the changing columns keep their defaults (fewer to bind)
_INSERT_QUEUED = f"INSERT OR REPLACE INTO jobs ({_FIXED}, state) VALUES ({', '.join('?' * 18)})"
# ... and without retries, dependencies, priority, placement or array (most jobs): the
# columns of format 2, fewer again; many rows a statement (_many, _insert_plain_rows)
_PLAIN = "id, kind, func, args, name, labels, timeout, max_attempts, submitted, state"
# a job changed without error text or output, never retried (most python jobs): fewer
# columns to bind; its row's error/stdout/stderr/history are NULL then, as a job's never
# go back to None once set unless it is retried (failures > 0); many rows a statement
# where SQLite has UPDATE ... FROM (_update_done_rows)
_DONE = ("state", "attempts", "worker", "lease", "started", "ended", "exit_code", "result")
_UPDATE_DONE = f"UPDATE jobs SET {', '.join(c + ' = ?' for c in _DONE)} WHERE id = ?"
_UPDATE = f"UPDATE jobs SET {', '.join(c + ' = ?' for c in _CHANGING.split(', '))} WHERE id = ?"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, func TEXT, args BLOB NOT NULL, name TEXT,
    labels TEXT, timeout REAL, max_attempts INTEGER, submitted REAL, state TEXT NOT NULL,
    attempts INTEGER, worker TEXT, lease INTEGER, started REAL, ended REAL, exit_code INTEGER,
    result BLOB, error TEXT, stdout TEXT, stderr TEXT
);
CREATE TABLE IF NOT EXISTS funcs (digest TEXT PRIMARY KEY, body BLOB NOT NULL);
"""
_SCHEMA_V3 = """
ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN retry_backoff REAL;
ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN not_before REAL;
ALTER TABLE jobs ADD COLUMN history TEXT;
ALTER TABLE jobs ADD COLUMN after TEXT;
"""
_SCHEMA_V4 = """
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN requires TEXT;
ALTER TABLE jobs ADD COLUMN array_id INTEGER;
ALTER TABLE jobs ADD COLUMN array_index INTEGER;
ALTER TABLE jobs ADD COLUMN array_cap INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS jobs_array ON jobs (array_id) WHERE array_id IS NOT NULL;
"""
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS marks (run TEXT NOT NULL, item INTEGER NOT NULL, worker TEXT,
                                  at REAL);
CREATE TABLE IF NOT EXISTS slaves (name TEXT PRIMARY KEY);
"""


def safe_text(text: str | None) -> str | None:
    """``text`` as SQLite (UTF-8) can store it: lone surrogates become ``\\udcff`` escapes.

    Such surrogates are what Python makes of bytes that are not UTF-8 (file names,
    a program's output read with ``surrogateescape``).
    """
    if text is None or text.isascii():
        return text
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()


def _changing(job: Job) -> tuple:
    return (
        str(job.state), job.attempts, safe_text(job.worker), job.lease, job.started, job.ended,
        job.exit_code, job.result, safe_text(job.error), safe_text(job.stdout),
        safe_text(job.stderr), job.failures, job.not_before,
        safe_text(json.dumps(job.history)) if job.history else None,
    )  # fmt: skip


def _fixed(job: Job) -> tuple:
    if job.kind == "python":  # (function digest, pickled arguments) as they came
        func, args = job.payload
    else:  # a shell command stays readable with the sqlite3 tool; \udcxx survive JSON
        func, args = None, json.dumps(job.payload).encode()
    labels = json.dumps(job.labels) if job.labels else None
    return (job.id, job.kind, func, args, safe_text(job.name), labels, job.timeout,
            job.max_attempts, job.submitted, job.retries, job.retry_backoff,
            json.dumps(job.after) if job.after else None, job.priority,
            json.dumps(job.requires) if job.requires else None, job.array, job.array_index,
            job.array_cap)  # fmt: skip


def _row_job(row: tuple, shared: dict[str, str] | None = None) -> Job:
    """The job of a journal row. ``shared``: one string object for equal texts (function
    digests, kinds, names, workers) across the rows of one load, which SQLite returns
    as a new object each: a million loaded jobs then take 200 MB less."""
    (id_, kind, func, args, name, labels, timeout, max_attempts, submitted, retries, backoff,
     after, priority, requires, array, array_index, array_cap, state, attempts, worker, lease,
     started, ended, exit_code, result, error, stdout, stderr, failures, not_before,
     history) = row  # fmt: skip
    if shared is not None:
        kind = shared.setdefault(kind, kind)
        name = shared.setdefault(name, name) if name else name
        worker = shared.setdefault(worker, worker) if worker else worker
        func = shared.setdefault(func, func) if func else func
    payload = (func, args) if kind == "python" else tuple(json.loads(args))
    return Job(
        id=id_, kind=kind, payload=payload, name=name or "",
        labels=json.loads(labels) if labels else None, timeout=timeout,
        max_attempts=max_attempts, state=State(state), attempts=attempts or 0, worker=worker,
        lease=lease or 0, submitted=submitted, started=started, ended=ended, exit_code=exit_code,
        result=result, error=error, stdout=stdout, stderr=stderr, retries=retries or 0,
        retry_backoff=DEFAULT_BACKOFF if backoff is None else backoff, failures=failures or 0,
        not_before=not_before, history=json.loads(history) if history else None,
        after=tuple(json.loads(after)) if after else None, priority=priority or 0,
        requires=json.loads(requires) if requires else None, array=array,
        array_index=array_index, array_cap=array_cap or 0, journaled=True,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one pruning pass removed from the journal."""

    jobs: int = 0
    funcs: int = 0  # function bodies no job calls any more
    marks: int = 0  # `scheduler verify` marks older than the age limit
    freed: int = 0  # bytes of the file left free for reuse by the deletions (about)
    size: int = 0  # the journal file's size afterwards
    held: float = 0.0  # longest one deletion kept the writer out (seconds)


@dataclass(slots=True)
class _Entry:
    seq: int
    new: list[tuple] = field(default_factory=list)
    fresh: list[tuple] = field(default_factory=list)  # new jobs as submitted
    plain: list[tuple] = field(default_factory=list)  # ... with no retries or dependencies
    changed: list[tuple] = field(default_factory=list)
    done: list[tuple] = field(default_factory=list)  # changed, with no error or output
    funcs: list[tuple] = field(default_factory=list)
    meta: list[tuple] = field(default_factory=list)
    marks: list[tuple] = field(default_factory=list)
    roster: list[tuple[str, bool]] = field(default_factory=list)  # (slave, registered)
    unattended: bool = True  # appended with wake=True: nobody waits for it, the writer writes it


class Journal:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        directory = Path(state_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / "journal.sqlite3"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # WAL + NORMAL: a commit survives the process being killed (kill -9, OOM);
        # only an OS crash or power loss can roll back the last transactions.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # see CHECKPOINT_SECONDS
        self._db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        self._check_schema()
        # lookups of jobs evicted from memory run beside the writer (WAL allows it)
        self._reader = sqlite3.connect(self.path, check_same_thread=False)
        self._read_lock = threading.Lock()
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # a commit (or a failed write): waiters look
        # the writer thread waits apart, woken only for what nobody waits for (wake=True,
        # retries, closing): a wake-up of it at every commit cost two context switches
        self._kick = threading.Condition(lock)
        self._checkpoint = threading.Condition(lock)  # the checkpointer waits here
        self._uncopied = 0  # commits since the last checkpoint
        self.checkpoints = 0  # checkpoints run (tests read it)
        self._checkpoint_db = sqlite3.connect(self.path, check_same_thread=False)
        self._pending: list[_Entry] = []
        self._in_flight: list[_Entry] = []
        self._queued_seq = 0
        self._done_seq = 0
        self._error: str | None = None  # why the last write failed, until one succeeds
        self._failures = 0  # failed attempts in a row
        self._writing = False  # a transaction is under way (one writer at a time)
        self._turn_wanted = False  # the checkpointer waits for the writers' turn: none starts
        self._closing = False
        self.on_commit: Callable[[float], None] | None = None  # seconds a transaction took
        self._prune_lock = threading.Lock()  # one pruning pass at a time
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="journal-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _check_schema(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'jobs'")
        # each in one transaction with the new version: a crash half-way changes nothing
        done = f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        if version == 0 and tables.fetchone()[0] == 0:
            self._db.executescript("BEGIN;" + _SCHEMA + _SCHEMA_V2 + _SCHEMA_V3 + _SCHEMA_V4 + done)
        elif version in (1, 2):  # 0.1 and 0.2: add the tables and columns, keep every job
            self._db.executescript("BEGIN;" + _SCHEMA_V2 + _SCHEMA_V3 + _SCHEMA_V4 + done)
        elif version == 3:
            self._db.executescript("BEGIN;" + _SCHEMA_V4 + done)
        elif version != SCHEMA_VERSION:
            self._db.close()
            raise JournalError(
                f"journal {self.path} has format {version}, this master reads format "
                f"{SCHEMA_VERSION}; finish its jobs with the matching version, or move it aside"
            )
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def load(
        self, keep_finished: int, queue_window: int | None = QUEUE_WINDOW
    ) -> tuple[list[Job], dict[str, bytes], Journaled]:
        """Running jobs, the first ``queue_window`` queued ones (None: all), the
        ``keep_finished`` latest finished ones, totals of all, and the bodies of the
        functions that the loaded unfinished jobs call.

        ``Journaled.max_lease`` is the highest lease that may have been handed out;
        ``Journaled.cold`` the queued jobs left in the journal, by priority, highest first:
        (first id, last id, priority) (a range holds other priorities' jobs too).
        """
        shared: dict[str, str] = {}
        limit = -1 if queue_window is None else queue_window  # -1: no LIMIT in SQLite
        queued = [_row_job(r, shared) for r in self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' AND after IS NULL "
            "ORDER BY priority DESC, id LIMIT ?", (limit,),
        )]  # fmt: skip
        cold: tuple[tuple[int, int, int], ...] = ()
        if queue_window is not None and len(queued) == queue_window and queued:
            end = queued[-1]  # the last loaded: what comes after it in line stays cold
            cold = tuple((first, last, priority) for priority, first, last in self._db.execute(
                "SELECT priority, min(id), max(id) FROM jobs WHERE state = 'queued' "
                "AND after IS NULL AND (priority < ? OR (priority = ? AND id > ?)) "
                "GROUP BY priority ORDER BY priority DESC", (end.priority, end.priority, end.id),
            ))  # fmt: skip
        # jobs waiting for others are all loaded: they are in line only once those succeed
        waiting = [_row_job(r, shared) for r in self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' AND after IS NOT NULL"
        )]  # fmt: skip
        running = [_row_job(r, shared) for r in self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'running'"
        )]  # fmt: skip
        unfinished = queued + waiting + running
        finished = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state NOT IN ('queued', 'running') "
            "ORDER BY id DESC LIMIT ?",
            (keep_finished,),
        )
        jobs = [*unfinished, *(_row_job(r, shared) for r in finished)]
        wanted = {j.payload[0] for j in unfinished if j.kind == "python"}
        funcs = {
            digest: body
            for digest, body in self._db.execute("SELECT digest, body FROM funcs")
            if digest in wanted
        }
        counts = dict(self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
        max_id, max_lease = self._db.execute(
            "SELECT coalesce(max(id), 0), coalesce(max(lease), 0) FROM jobs"
        ).fetchone()
        reserved = self._db.execute("SELECT value FROM meta WHERE key = 'lease_ceiling'")
        max_lease = max([max_lease, *(v for (v,) in reserved)])
        slaves = tuple(n for (n,) in self._db.execute("SELECT name FROM slaves"))
        loaded = {j.id for j in jobs}
        # (a running one too: handed out by a master that saw them succeed before this
        # journal did, it waits for them again if its run is lost; see Board._requeue)
        deps = {d for j in (*waiting, *running) for d in j.after or () if d not in loaded}
        stored = Journaled(sum(counts.values()), counts, max_id, max_lease, slaves, cold,
                           self.states(deps))  # fmt: skip
        return jobs, funcs, stored

    def states(self, ids: Iterable[int]) -> dict[int, str]:
        """The states of these jobs, as the journal has them (missing: not there)."""
        found: dict[int, str] = {}
        wanted = list(ids)
        with self._read_lock:
            for at in range(0, len(wanted), 500):
                chunk = wanted[at : at + 500]
                found.update(self._reader.execute(
                    f"SELECT id, state FROM jobs WHERE id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                ))  # fmt: skip
        return found

    def queued_between(self, first: int, last: int, limit: int, priority: int = 0) -> list[Job]:
        """Up to ``limit`` queued jobs of ``priority`` with ids ``first``..``last``, in id
        order (the cold queue read back, see Board.refill)."""
        with self._read_lock:
            rows = self._reader.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id BETWEEN ? AND ? AND state = 'queued' "
                "AND after IS NULL AND priority = ? ORDER BY id LIMIT ?",
                (first, last, priority, limit),
            ).fetchall()  # fmt: skip
        shared: dict[str, str] = {}
        return [_row_job(r, shared) for r in rows]

    def array_states(self, array: int) -> dict[int, str]:
        """The state of every task of an array, as the journal has them."""
        with self._read_lock:
            return dict(self._reader.execute(
                "SELECT id, state FROM jobs WHERE array_id = ?", (array,)
            ))  # fmt: skip

    def fetch(self, job_id: int) -> Job | None:
        """A job that is no longer kept in memory (finished long ago)."""
        with self._read_lock:
            row = self._reader.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return _row_job(row) if row else None

    def select(
        self, state: str | None, limit: int, before: int | None, array: int | None = None
    ) -> list[Job]:
        """Jobs as the journal has them, newest first (for those no longer in memory);
        with ``array``, that array's tasks only."""
        where = ["id < ?"]
        args: list[object] = [before if before is not None else 1 << 62]
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if array is not None:
            where.append("array_id = ?")
            args.append(array)
        with self._read_lock:
            rows = self._reader.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
                "ORDER BY id DESC LIMIT ?", (*args, limit),
            ).fetchall()  # fmt: skip
        return [_row_job(r) for r in rows]

    def func(self, digest: str) -> bytes | None:
        """A function body by digest (the master keeps only those its open jobs use)."""
        with self._read_lock:
            row = self._reader.execute("SELECT body FROM funcs WHERE digest = ?", (digest,))
            found = row.fetchone()
        return found[0] if found else None

    def marks(self, run: str) -> list[tuple[int, str, float]]:
        """The (item, worker, time) marks recorded for a verify run, in order."""
        with self._read_lock:
            return list(self._reader.execute(
                "SELECT item, worker, at FROM marks WHERE run = ? ORDER BY rowid", (run,)
            ))  # fmt: skip

    # -- writing ---------------------------------------------------------------

    def append(
        self,
        jobs: list[Job],
        funcs: dict[str, bytes] | None = None,
        *,
        meta: dict[str, int] | None = None,
        marks: list[tuple] | None = None,
        roster: list[tuple[str, bool]] | None = None,
        wake: bool = True,
    ) -> int:
        """Queue the current state of these jobs for writing; return a ticket for wait().

        Call it under the lock that orders the changes: rows are taken now. ``wake=False``
        when the caller waits for it next: it then writes it itself, with no hand-off,
        unless a write is under way (the writer thread would race it for no gain).
        Nothing to write for the writer thread (the tick of an idle master): no entry, and
        the ticket of the newest one, saved once everything queued so far is. (Not for a
        caller that waits: it may abandon() its ticket, which must then be its own.)
        """
        if wake and not (jobs or funcs or meta or marks or roster):
            with self._cond:
                return self._queued_seq
        new, fresh, plain, changed, done = [], [], [], [], []
        for j in jobs:
            if j.journaled:
                if j.error is None and j.stdout is None and j.stderr is None and not j.failures:
                    done.append((str(j.state), j.attempts, safe_text(j.worker), j.lease,
                                 j.started, j.ended, j.exit_code, j.result, j.id))  # fmt: skip
                else:
                    changed.append((*_changing(j), j.id))
            elif (j.state is State.QUEUED and not j.attempts and not j.retries and not j.after
                  and not j.priority and j.requires is None and j.array is None):  # fmt: skip
                plain.append((*_fixed(j)[:9], "queued"))
            elif j.state is State.QUEUED and not j.attempts:
                fresh.append((*_fixed(j), "queued"))
            else:
                new.append((*_fixed(j), *_changing(j)))
        for job in jobs:
            job.journaled = True  # the row exists, or is queued in front of its updates
        with self._cond:
            self._queued_seq += 1
            self._pending.append(_Entry(
                self._queued_seq, new, fresh, plain, changed, done, list((funcs or {}).items()),
                list((meta or {}).items()), list(marks or ()), list(roster or ()), wake,
            ))  # fmt: skip
            if wake:
                self._kick.notify()
            return self._queued_seq

    @property
    def failing(self) -> str | None:
        """Why the journal cannot write at the moment, or None."""
        return self._error

    def saved(self, ticket: int) -> bool:
        return self._done_seq >= ticket

    def wait(self, ticket: int, *, give_up: bool = False, timeout: float | None = None) -> bool:
        """Block until the entry ``ticket`` (and all before it) is committed.

        ``give_up``: raise JournalError as soon as a write fails instead of waiting for
        the retries. Returns False if ``timeout`` passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._done_seq < ticket:
                if give_up and self._error is not None:
                    raise JournalError(f"the journal cannot write ({self._error})")
                if (self._pending and not self._writing and not self._turn_wanted
                        and self._error is None):  # fmt: skip
                    self._write_locked()  # retries, if it fails, are the writer thread's
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def abandon(self, ticket: int) -> bool:
        """Drop entry ``ticket`` if it is not written; False if it was (or is being) saved."""
        with self._cond:
            while any(e.seq == ticket for e in self._in_flight):
                self._cond.wait()
            if self._done_seq >= ticket and not any(e.seq == ticket for e in self._pending):
                return False
            self._pending = [e for e in self._pending if e.seq != ticket]
            return True

    def close(self) -> None:
        """Write what is queued (give up after a few failed attempts), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._kick.notify()
            self._checkpoint.notify()
        self._thread.join()
        self._checkpointer.join()
        self._reader.close()
        self._db.close()

    def _run(self) -> None:  # the writer thread: what nobody waits for, and retries
        with self._cond:
            while True:
                while (not self._pending or self._writing or self._turn_wanted
                       ) and not self._closing:  # fmt: skip
                    if (not self._kick.wait(1.0) and self._error is not None
                            and not self._pending and not self._writing):  # fmt: skip
                        # nothing to write, but a failure to clear: probe with an empty one
                        self._pending.append(_Entry(self._queued_seq))
                while self._writing or self._turn_wanted:
                    self._cond.wait()
                if not self._pending:
                    return
                if self._closing and self._failures > len(RETRY_SECONDS):
                    log.error("journal %s: stopping with %d unsaved change(s): %s",
                              self.path, len(self._pending), self._error)  # fmt: skip
                    return
                if not self._write_locked():
                    delay = RETRY_SECONDS[min(self._failures, len(RETRY_SECONDS)) - 1]
                    self._kick.wait_for(lambda: self._closing, timeout=delay)

    def _write_locked(self) -> bool:
        """Write every pending entry in one transaction; True if it committed.

        Called with ``_cond`` held; released during the write. A failed write goes back
        in front of the queue, in order, for the writer thread to retry.
        """
        self._writing = True
        self._in_flight, self._pending = self._pending, []
        written = any(e.new or e.fresh or e.plain or e.changed or e.done or e.funcs
                      or e.meta or e.marks for e in self._in_flight)  # not idle ticks
        self._cond.release()
        try:
            started = time.perf_counter()
            self._write(self._in_flight)
            took, error = time.perf_counter() - started, None
        except Exception as exc:  # disk full, permissions, anything: keep it, retry
            took, error = 0.0, exc
        finally:
            self._cond.acquire()
        self._writing = False
        self._cond.notify_all()
        if error is not None:
            self._failures += 1
            if self._error is None:
                log.error("journal %s: write failed, retrying: %s", self.path, error)
            self._error = f"{type(error).__name__}: {error}"
            self._pending[:0], self._in_flight = self._in_flight, []
            self._kick_if_unattended()  # the writer thread retries it
            return False
        self._kick_if_unattended()
        if self._error is not None:
            log.warning("journal %s: writing again after %d failed attempt(s)",
                        self.path, self._failures)  # fmt: skip
        self._failures, self._error = 0, None
        self._committed()
        self._done_seq = self._in_flight[-1].seq
        self._in_flight = []
        if self.on_commit is not None and written:
            self.on_commit(took)
        return True

    def _committed(self) -> None:
        """After a commit: tell the checkpointer, at the first since its last checkpoint (it
        then waits CHECKPOINT_SECONDS for more) and at the CHECKPOINT_COMMITS-th. Under
        ``_cond``."""
        self._uncopied += 1
        if self._uncopied == 1 or self._uncopied == CHECKPOINT_COMMITS:
            self._checkpoint.notify()

    def _checkpoint_loop(self) -> None:
        """The checkpointer thread: copy what the WAL holds into the database file, off the
        path of every commit (CHECKPOINT_SECONDS). First beside the writers (PASSIVE: it
        waits for none, none waits for it; the bulk of the copying and the fsyncs), then
        once more in the writers' turn, for what they added meanwhile: only a WAL copied to
        its end starts over at the next write, so under steady writes it grew for good.
        Idle while nothing is committed."""
        db, failing = self._checkpoint_db, False
        try:
            with self._cond:
                while True:
                    self._checkpoint.wait_for(lambda: self._uncopied or self._closing)
                    self._checkpoint.wait_for(
                        lambda: self._uncopied >= CHECKPOINT_COMMITS or self._closing,
                        timeout=CHECKPOINT_SECONDS,
                    )
                    if self._closing:  # the last connection to close checkpoints
                        return
                    self._uncopied = 0
                    failing = self._checkpoint_once(db, failing)
                    if not failing:
                        self._turn_wanted = True
                        while self._writing and not self._closing:
                            self._cond.wait()
                        if self._closing:
                            return  # (the turn is let go below)
                        self._turn_wanted, self._writing = False, True
                        try:
                            failing = self._checkpoint_once(db, failing)
                        finally:
                            self._writing = False
                            self._cond.notify_all()
                            self._kick_if_unattended()
                    self.checkpoints += 1
        finally:  # whatever ended it, no writer waits for a turn that never comes
            with self._cond:
                self._turn_wanted = False
                self._cond.notify_all()
                self._kick_if_unattended()
            db.close()

    def _checkpoint_once(self, db: sqlite3.Connection, failing: bool) -> bool:
        """One PASSIVE checkpoint, ``_cond`` let go meanwhile; whether it failed."""
        self._cond.release()
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            if failing:
                log.warning("journal %s: checkpoints work again", self.path)
            return False
        except sqlite3.Error as exc:  # disk full...: the WAL keeps it all meanwhile
            if not failing:
                log.warning("journal %s: checkpoint failed, will try again: %s", self.path, exc)
            return True
        finally:
            self._cond.acquire()

    def _kick_if_unattended(self) -> None:
        """After a write: wake the writer thread if what is left needs it (nobody waits
        for it, or a write failed and must be retried). Under ``_cond``."""
        if self._error is not None or any(e.unattended for e in self._pending):
            self._kick.notify()

    def _write(self, entries: list[_Entry]) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            for e in entries:
                if e.funcs:
                    db.executemany("INSERT OR IGNORE INTO funcs VALUES (?, ?)", e.funcs)
                if e.plain:
                    _many(db, _insert_plain_rows, e.plain)
                if e.fresh:
                    db.executemany(_INSERT_QUEUED, e.fresh)
                if e.new:
                    db.executemany(_INSERT, e.new)
                if e.changed:
                    db.executemany(_UPDATE, e.changed)
                if e.done and _UPDATE_FROM:
                    _many(db, _update_done_rows, e.done)
                elif e.done:
                    db.executemany(_UPDATE_DONE, e.done)
                if e.meta:
                    db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", e.meta)
                if e.marks:
                    db.executemany("INSERT INTO marks VALUES (?, ?, ?, ?)", e.marks)
                for name, present in e.roster:
                    sql = "INSERT OR IGNORE INTO slaves VALUES (?)" if present else (
                        "DELETE FROM slaves WHERE name = ?")  # fmt: skip
                    db.execute(sql, (name,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- retention ---------------------------------------------------------------

    def prune(
        self,
        now: float,
        older_than: float | None,
        keep: int | None,
        *,
        held_funcs: Callable[[list[str]], set[str]] = lambda digests: set(),
        stop: Callable[[], bool] = lambda: False,
        chunk: int = PRUNE_CHUNK,
    ) -> Pruned:
        """Delete finished jobs that ended more than ``older_than`` seconds before ``now``
        or are beyond the newest ``keep`` finished ones (None: no such rule); then function
        bodies no job calls, unless the master holds them (``held_funcs``: those of the
        digests given that it holds), and verify marks older than ``older_than``.

        Never deleted: a queued or running job, and the newest job (its id is where a
        restarted master numbers on from). Candidates are read on a connection of this
        pass's own, beside the writer; each ``chunk`` of them is deleted in a transaction
        of its own between the writer's entries (``_delete``). ``stop`` is asked
        between chunks. A finished job's row is never written again (the board never
        changes a finished job), so deleting one the master still shows is harmless.
        """
        with self._cond:
            queued = self._queued_seq
        # what the caller counted as finished is in the rows read: its writes come first
        self.wait(queued, give_up=True)
        with self._prune_lock, contextlib.closing(self._connect_reader()) as db:
            page_size, free_before = _free_pages(db)
            holds: list[float] = []
            jobs = self._prune_jobs(db, now, older_than, keep, stop, chunk, holds)
            funcs = self._prune_funcs(db, held_funcs, chunk, holds) if jobs else 0
            marks = 0
            if older_than is not None and not stop():
                marks = self._prune_marks(db, now - older_than, stop, chunk, holds)
            _, free_after = _free_pages(db)
        size = sum(p.stat().st_size for p in (self.path, _wal(self.path)) if p.exists())
        freed = max(0, free_after - free_before) * page_size
        return Pruned(jobs, funcs, marks, freed, size, max(holds, default=0.0))

    def _connect_reader(self) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path))}?mode=ro"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)

    def _prune_jobs(
        self,
        db: sqlite3.Connection,
        now: float,
        older_than: float | None,
        keep: int | None,
        stop: Callable[[], bool],
        chunk: int,
        holds: list[float],
    ) -> int:
        (newest,) = db.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()
        upto, rules, args = newest - 1, [], []
        if keep is not None:
            cut = db.execute(f"SELECT id FROM jobs WHERE {_FINISHED} ORDER BY id DESC "
                             "LIMIT 1 OFFSET ?", (keep,)).fetchone()  # fmt: skip
            if cut is not None:
                rules.append("id <= ?")
                args.append(cut[0])
                if older_than is None:  # the scan can stop there
                    upto = min(upto, cut[0])
        if older_than is not None:
            rules.append("coalesce(ended, submitted, 0) < ?")
            args.append(now - older_than)
        if not rules:
            return 0
        select = (f"SELECT id FROM jobs WHERE id > ? AND id <= ? AND {_FINISHED} "
                  f"AND ({' OR '.join(rules)}) ORDER BY id LIMIT ?")  # fmt: skip
        deleted, after = 0, 0
        while not stop():
            ids = [(i,) for (i,) in db.execute(select, (after, upto, *args, chunk))]
            if ids:
                sql = f"DELETE FROM jobs WHERE id = ? AND {_FINISHED}"
                deleted += self._delete(sql, ids, holds)
                after = ids[-1][0]
            if len(ids) < chunk:
                break
        return deleted

    def _prune_funcs(
        self,
        db: sqlite3.Connection,
        held_funcs: Callable[[list[str]], set[str]],
        chunk: int,
        holds: list[float],
    ) -> int:
        """Bodies no job row calls: read in one snapshot; in each deletion, rows written
        since that snapshot (all of higher ids: ids grow with the order of writing) are
        checked again, so a body a new job brought along stays."""
        db.execute("BEGIN")
        try:
            (newest,) = db.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()
            called = {d for (d,) in db.execute(
                "SELECT DISTINCT func FROM jobs WHERE func IS NOT NULL")}  # fmt: skip
            stored = [d for (d,) in db.execute("SELECT digest FROM funcs")]
        finally:
            db.execute("COMMIT")
        unused = [d for d in stored if d not in called]
        if unused:
            held = held_funcs(unused)
            unused = [d for d in unused if d not in held]
        deleted = 0
        for i in range(0, len(unused), chunk):
            rows = [(d, newest, d) for d in unused[i : i + chunk]]
            deleted += self._delete("DELETE FROM funcs WHERE digest = ? AND NOT EXISTS "
                                    "(SELECT 1 FROM jobs WHERE id > ? AND func = ?)", rows, holds)
        return deleted

    def _prune_marks(
        self,
        db: sqlite3.Connection,
        before: float,
        stop: Callable[[], bool],
        chunk: int,
        holds: list[float],
    ) -> int:
        deleted = 0
        while not stop():
            rows = [(r, before) for (r,) in db.execute(
                "SELECT rowid FROM marks WHERE at < ? LIMIT ?", (before, chunk))]  # fmt: skip
            if rows:
                sql = "DELETE FROM marks WHERE rowid = ? AND at < ?"
                deleted += self._delete(sql, rows, holds)
            if len(rows) < chunk:
                break
        return deleted

    def _delete(self, sql: str, rows: list[tuple], holds: list[float]) -> int:
        """Run ``sql`` over ``rows`` in a transaction of its own on the writer's connection,
        as the next writer: once every entry queued before this call is committed (written
        here if nobody is writing, as a waiter does), ahead of entries queued later, which
        wait for it as for any write. Returns the rows deleted; appends how long it took."""
        with self._cond:
            ticket = self._queued_seq
            while True:
                if self._closing:
                    raise JournalError(f"journal {self.path} is closing")
                if self._error is not None:
                    raise JournalError(f"the journal cannot write ({self._error})")
                free = not (self._writing or self._turn_wanted)
                if free and not (self._pending and self._pending[0].seq <= ticket):
                    break
                if free:
                    self._write_locked()
                else:
                    self._cond.wait(1.0)
            self._writing = True
        started = time.perf_counter()
        db = self._db
        try:
            db.execute("BEGIN")
            try:
                deleted = db.executemany(sql, rows).rowcount
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            holds.append(time.perf_counter() - started)
            with self._cond:
                self._writing = False
                self._cond.notify_all()
                self._kick_if_unattended()
                self._committed()
        return deleted


_CHUNKS = (64, 16, 4, 1)  # rows per statement: few statement texts, few steps
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)  # UPDATE ... FROM came in 3.33


def _many(db: sqlite3.Connection, sql: Callable[[int], str], rows: list[tuple]) -> None:
    """Run ``sql(k)``, a statement of ``k`` rows, over ``rows`` in as few steps as
    _CHUNKS allows: each step of executemany lets go of the GIL and takes it back, which
    under load costs a context switch a row."""
    i, n = 0, len(rows)
    for k in _CHUNKS:
        while n - i >= k:
            db.execute(sql(k), [v for row in rows[i : i + k] for v in row])
            i += k


@functools.cache
def _insert_plain_rows(k: int) -> str:
    row = f"({', '.join('?' * 10)})"
    return f"INSERT OR REPLACE INTO jobs ({_PLAIN}) VALUES {', '.join([row] * k)}"


@functools.cache
def _update_done_rows(k: int) -> str:
    """(A job appears once in an entry's rows: with two, UPDATE FROM would take either.)"""
    row = f"({', '.join('?' * (len(_DONE) + 1))})"
    sets = ", ".join(f"{c} = v.column{i}" for i, c in enumerate(_DONE, 1))
    return (f"UPDATE jobs SET {sets} FROM (VALUES {', '.join([row] * k)}) AS v "
            f"WHERE jobs.id = v.column{len(_DONE) + 1}")  # fmt: skip


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _free_pages(db: sqlite3.Connection) -> tuple[int, int]:
    """(page size, pages on the free list): space SQLite reuses before growing the file."""
    (size,) = db.execute("PRAGMA page_size").fetchone()
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    return size, free


def backup(state_dir: str | os.PathLike[str], dest: str | os.PathLike[str],
           force: bool = False) -> tuple[Path, int, int]:  # fmt: skip
    """Copy the journal in ``state_dir`` to ``dest``, consistent even while a master writes
    it: SQLite's online backup in one step, one read transaction beside the writer (WAL).

    The copy is made under a temporary name beside ``dest``, checked, and renamed: ``dest``
    is never half a copy. An existing ``dest`` is replaced only with ``force``. Returns
    (the journal copied, jobs in the copy, its size in bytes).
    """
    source = Path(state_dir) / "journal.sqlite3"
    target = Path(dest)
    if not source.is_file():
        raise JournalError(f"no journal at {source}; give the master's state directory "
                           "(--state-dir or SCHEDULER_STATE_DIR)")  # fmt: skip
    if target.exists() and not force:
        raise JournalError(f"{target} exists; give --force to replace it")
    if target.exists() and target.resolve() == source.resolve():
        raise JournalError(f"{target} is the journal itself; back it up to another file")
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        # an empty file is an empty database: created 0600 (jobs' commands and output)
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        jobs = _copy(source, partial)
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return source, jobs, target.stat().st_size


def _copy(source: Path, dest: Path) -> int:
    try:
        src = sqlite3.connect(f"file:{quote(str(source))}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open the journal {source}: {exc}") from None
    try:
        tables = src.execute("SELECT count(*) FROM sqlite_master WHERE name = 'jobs'")
        if tables.fetchone()[0] != 1:
            raise JournalError(f"{source} is not a scheduler journal (no jobs table)")
        copy = sqlite3.connect(dest)
        try:
            src.backup(copy)  # all pages in one step: a snapshot, never restarted by writes
            (check,) = copy.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise JournalError(f"the copy of {source} fails SQLite's check: {check}")
            (jobs,) = copy.execute("SELECT count(*) FROM jobs").fetchone()
        finally:
            copy.close()
    except sqlite3.Error as exc:
        raise JournalError(f"cannot copy the journal {source}: {exc}") from None
    finally:
        src.close()
    return int(jobs)

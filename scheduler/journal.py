"""The journal: jobs persisted to SQLite (WAL) so a master restart loses nothing.

One writer thread owns the connection. Callers hand it rows (in the order the
board changed them) and, when they must, wait until those rows are committed;
everything queued meanwhile goes into the same transaction (group commit).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from pathlib import Path

from .board import Journaled
from .errors import JournalError
from .job import Job, State

log = logging.getLogger(__name__)


SCHEMA_VERSION = 1
_FIXED = "id, kind, func, args, name, labels, timeout, max_attempts, submitted"
_CHANGING = (
    "state, attempts, worker, lease, started, ended, exit_code, result, error, stdout, stderr"
)
_COLUMNS = f"{_FIXED}, {_CHANGING}"
_INSERT = f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 20)})"
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


def _changing(job: Job) -> tuple:
    return (
        str(job.state), job.attempts, job.worker, job.lease, job.started, job.ended,
        job.exit_code, job.result, job.error, job.stdout, job.stderr,
    )  # fmt: skip


def _fixed(job: Job) -> tuple:
    if job.kind == "python":  # (function digest, pickled arguments) as they came
        func, args = job.payload
    else:  # a shell command stays readable with the sqlite3 tool
        func, args = None, json.dumps(job.payload).encode()
    labels = json.dumps(job.labels) if job.labels else None
    return (job.id, job.kind, func, args, job.name, labels, job.timeout, job.max_attempts,
            job.submitted)  # fmt: skip


def _row_job(row: tuple) -> Job:
    (id_, kind, func, args, name, labels, timeout, max_attempts, submitted, state, attempts,
     worker, lease, started, ended, exit_code, result, error, stdout, stderr) = row  # fmt: skip
    payload = (func, args) if kind == "python" else tuple(json.loads(args))
    return Job(
        id=id_, kind=kind, payload=payload, name=name or "",
        labels=json.loads(labels) if labels else None, timeout=timeout,
        max_attempts=max_attempts, state=State(state), attempts=attempts, worker=worker,
        lease=lease, submitted=submitted, started=started, ended=ended, exit_code=exit_code,
        result=result, error=error, stdout=stdout, stderr=stderr, journaled=True,
    )  # fmt: skip


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
        self._check_schema()
        # lookups of jobs evicted from memory run beside the writer (WAL allows it)
        self._reader = sqlite3.connect(self.path, check_same_thread=False)
        self._read_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: list[tuple[list[tuple], list[tuple], list[tuple]]] = []
        self._queued_seq = 0
        self._done_seq = 0
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def _check_schema(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'jobs'")
        if version == 0 and tables.fetchone()[0] == 0:
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            self._db.close()
            raise JournalError(
                f"journal {self.path} has format {version}, this master reads format "
                f"{SCHEMA_VERSION}; finish its jobs with the matching version, or move it aside"
            )

    def load(self, keep_finished: int) -> tuple[list[Job], dict[str, bytes], Journaled]:
        """Unfinished jobs, the ``keep_finished`` latest finished ones, and totals of all."""
        unfinished = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('queued', 'running')"
        )
        finished = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state NOT IN ('queued', 'running') "
            "ORDER BY id DESC LIMIT ?",
            (keep_finished,),
        )
        jobs = [_row_job(r) for r in [*unfinished, *finished]]
        funcs = dict(self._db.execute("SELECT digest, body FROM funcs"))
        counts = dict(self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
        max_id, max_lease = self._db.execute(
            "SELECT coalesce(max(id), 0), coalesce(max(lease), 0) FROM jobs"
        ).fetchone()
        return jobs, funcs, Journaled(sum(counts.values()), counts, max_id, max_lease)

    def fetch(self, job_id: int) -> Job | None:
        """A job that is no longer kept in memory (finished long ago)."""
        with self._read_lock:
            row = self._reader.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return _row_job(row) if row else None

    def append(self, jobs: list[Job], funcs: dict[str, bytes] | None = None) -> int:
        """Queue the current state of these jobs for writing; return a ticket for wait().

        Call it under the lock that orders the changes: rows are taken now.
        """
        new = [(*_fixed(j), *_changing(j)) for j in jobs if not j.journaled]
        changed = [(*_changing(j), j.id) for j in jobs if j.journaled]
        for job in jobs:
            job.journaled = True
        with self._cond:
            self._pending.append((new, changed, list((funcs or {}).items())))
            self._queued_seq += 1
            self._cond.notify_all()
            return self._queued_seq

    def wait(self, ticket: int) -> None:
        """Block until everything up to ``ticket`` is committed."""
        with self._cond:
            while self._done_seq < ticket and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise RuntimeError(f"journal write failed: {self._error}")

    def close(self) -> None:
        """Write what is queued, then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._reader.close()
        self._db.close()

    def _run(self) -> None:  # the writer thread
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                batch, self._pending = self._pending, []
                seq = self._queued_seq
                if not batch and self._closing:
                    return
            try:
                self._write(batch)
            except sqlite3.Error as exc:  # disk full, permissions: say so, keep serving
                log.error("journal %s: write failed: %s", self.path, exc)
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                continue
            with self._cond:
                self._done_seq = seq
                self._error = None
                self._cond.notify_all()

    def _write(self, batch: list[tuple[list[tuple], list[tuple], list[tuple]]]) -> None:
        self._db.execute("BEGIN")
        try:
            for new, changed, funcs in batch:
                if funcs:
                    self._db.executemany("INSERT OR IGNORE INTO funcs VALUES (?, ?)", funcs)
                self._db.executemany(_INSERT, new)
                self._db.executemany(_UPDATE, changed)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

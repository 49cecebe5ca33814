"""``python -m bench.retention``: the journal after 1,000,000 no-op jobs, with retention
keeping 100,000 finished jobs and without retention, side by side (issue #12, item 7).

How, honestly: a million jobs through slaves takes long on a small machine, so the jobs go
through the master's own code in this process: ``Service`` over a real ``Journal`` (SQLite,
WAL, on disk), submitted 1,000 a call as clients send them, leased by one slave name,
reported as a slave reports a no-op Python job (result ``None``, no output: the same row a
real cluster writes), with ``tick`` after each batch as the master's loop calls it, and the
retention thread as a master starts it. Paced to 25,000 jobs/s, a master's burst rate, so
that passes come as often per job as on a live master. No sockets, no slave processes:
what is measured is the journal, not the wire.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scheduler import protocol
from scheduler.board import Board
from scheduler.journal import Journal, Pruned
from scheduler.progress import Progress
from scheduler.service import Service
from scheduler.settings import DEFAULT_RETAIN

BATCH = 1_000  # jobs per submit call, as scheduler.Client sends them
KEEP = 100_000  # SCHEDULER_RETAIN_COUNT of the run with retention
RATE = 25_000  # jobs a second: issue #10's burst goal, what a master takes in
DIGEST = "0" * 32  # the no-op function's digest; its body below
RESULT = pickle.dumps(None, protocol=5)  # what a slave reports for a job returning None


class Counted(Journal):
    """The real journal; notes what each retention pass did."""

    passes: list[tuple[Pruned, float]]  # and how long it took

    def prune(self, *args, **kwargs) -> Pruned:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        pruned = super().prune(*args, **kwargs)
        self.passes.append((pruned, time.perf_counter() - started))
        return pruned


@dataclass
class Run:
    label: str
    rows: int = 0
    disk: int = 0  # file + WAL + index at the end, the master still running
    file: int = 0  # the file alone once the master stopped (WAL checkpointed)
    seconds: float = 0.0
    slowest_submit: float = 0.0  # the longest submit call, its commit included
    passes: int = 0
    removed: int = 0
    held: float = 0.0  # the longest one deletion kept the journal's writer
    longest: float = 0.0  # the longest pass


def run(label: str, jobs: int, keep: int | None, state: Path, rate: float) -> Run:
    journal = Counted(state)
    journal.passes = []
    board = Board(lease_seconds=60.0)
    window = min(KEEP, keep or KEEP)  # the master's memory window follows RETAIN_COUNT
    service = Service(board, journal, {}, Progress(time.time, 3600.0), keep_finished=window)
    if keep is not None:
        service.start_retention(DEFAULT_RETAIN, keep)
    service.register("s1", "bench", 1, 1, version=protocol.VERSION)
    result, started = Run(label), time.perf_counter()
    for first in range(0, jobs, BATCH):
        specs = [_spec(i) for i in range(first, min(jobs, first + BATCH))]
        t = time.perf_counter()
        service.submit(specs, {DIGEST: b"body"})
        result.slowest_submit = max(result.slowest_submit, time.perf_counter() - t)
        leases, _ = service.lease("s1", len(specs))
        service.report("s1", [(job_id, lease, True, RESULT, None, None, None, None, 1e-5)
                              for job_id, lease, *_ in leases])  # fmt: skip
        service.tick()
        ahead = (first + BATCH) / rate - (time.perf_counter() - started)
        if ahead > 0:  # as fast as a master takes them in a burst, not faster
            time.sleep(ahead)
    while service._pruning.locked():  # a pass under way finishes, as on a live master
        time.sleep(0.05)
    result.seconds = time.perf_counter() - started
    result.rows = _rows(journal)
    result.disk = sum(p.stat().st_size for p in state.glob("journal.sqlite3*"))
    service.close()
    journal.close()
    result.file = (state / "journal.sqlite3").stat().st_size
    done = [(p, took) for p, took in journal.passes if p.jobs]
    result.passes, result.removed = len(done), sum(p.jobs for p, _ in done)
    result.held = max((p.held for p, _ in done), default=0.0)
    result.longest = max((took for _, took in done), default=0.0)
    return result


def _spec(i: int) -> protocol.JobSpec:
    """``client.apply_async(noop_item, (i,))``'s spec."""
    return protocol.JobSpec("python", (DIGEST, pickle.dumps(((i,), {}), protocol=5)), "noop_item")


def _rows(journal: Journal) -> int:
    uri = f"file:{journal.path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


def table(runs: list[Run], jobs: int, rate: float) -> str:
    def row(name: str, cells: list[str]) -> str:
        return f"{name:<34}" + "".join(f"{c:>22}" for c in cells)

    mb = [f"{r.file / 1e6:.1f} MB" for r in runs]
    lines = [
        f"retention: the journal after {jobs:,} no-op Python jobs submitted and finished at "
        f"{rate:,.0f} jobs/s",
        "  in-process (Service + Journal on disk, 1,000 jobs a submit, one slave name, tick "
        "after each batch; no sockets or slave processes: the rows are a real no-op job's)",
        row("", [r.label for r in runs]),
        row("jobs left in the journal", [f"{r.rows:,}" for r in runs]),
        row("journal file (master stopped)", mb),
        row("on disk while running (+WAL)", [f"{r.disk / 1e6:.1f} MB" for r in runs]),
        row("bytes per job left (file / jobs)", [f"{r.file / max(r.rows, 1):.0f}" for r in runs]),
        row("retention passes (jobs removed)",
            [f"{r.passes} ({r.removed:,})" if r.passes else "-" for r in runs]),  # fmt: skip
        row("longest pass", [f"{r.longest:.2f} s" if r.passes else "-" for r in runs]),
        row("longest a deletion held the writer",
            [f"{r.held * 1e3:.1f} ms" if r.passes else "-" for r in runs]),  # fmt: skip
        row("slowest submit call (1,000 jobs)", [f"{r.slowest_submit * 1e3:.1f} ms" for r in runs]),
        row("time", [f"{r.seconds:.0f} s" for r in runs]),
        "  the file does not shrink by itself: it stops growing once passes free as many pages "
        "as new jobs take (SQLite reuses them)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__)
    p.add_argument("--jobs", type=int, default=1_000_000, help="jobs per run (default 1,000,000)")
    p.add_argument("--rate", type=float, default=RATE,
                   help=f"jobs a second, at most (default {RATE:,}: a master's burst)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        runs = [run("no retention", args.jobs, None, Path(tmp) / "off", args.rate),
                run(f"RETAIN_COUNT={KEEP:,}", args.jobs, KEEP, Path(tmp) / "on", args.rate)]
    print(table(runs, args.jobs, args.rate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

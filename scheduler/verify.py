"""``scheduler verify``: a chaos run that a user points at their own cluster.

It submits a batch of marked jobs longer than the lease, kills a slave that runs some of
them (and, asked to, crashes the master) mid-batch, waits, and accounts for every job
from the jobs' own marks, saved on the master as each run starts: ran once, ran again
because its slave was killed (expected), ran twice on a healthy slave, or lost.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .client import Client
from .errors import JobFailed, SchedulerError
from .settings import authkey_from_environ, parse_address
from .transport import Link


def probe(run: str, item: int, seconds: float) -> int:
    """A verify job: record on the master that it runs (saved before it goes on), then work."""
    master = parse_address(os.environ.get("SCHEDULER_MASTER", "127.0.0.1:8888"), "master")
    link = Link(master, authkey_from_environ(os.environ).reveal(), patience=120.0)
    worker = os.environ.get("SCHEDULER_WORKER_NAME") or socket.gethostname()
    link.call("mark", run, item, worker)
    time.sleep(seconds)
    return item


@dataclass
class Report:
    """What became of each job of a verify run."""

    jobs: int
    seconds: float
    killed: str | None = None
    master_crashes: int = 0
    once: list[int] = field(default_factory=list)
    rerun_after_kill: list[int] = field(default_factory=list)
    twice_on_healthy: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    moved_after: float | None = None  # seconds from the kill to its first job running again

    @property
    def ok(self) -> bool:
        return not self.lost and not self.twice_on_healthy

    def rows(self) -> list[tuple[str, str]]:
        moved = "-" if self.moved_after is None else f"{self.moved_after:.1f} s"
        return [
            ("jobs submitted", f"{self.jobs} x {self.seconds:g} s"),
            ("slave killed", self.killed or "-"),
            ("master crashes", str(self.master_crashes)),
            ("ran once", str(len(self.once))),
            ("ran again after their slave was killed", str(len(self.rerun_after_kill))),
            ("ran twice on a healthy slave", _ids(self.twice_on_healthy)),
            ("lost", _ids(self.lost)),
            ("slave killed -> first of its jobs running again", moved),
        ]

    def print(self, out: TextIO) -> None:
        width = max(len(k) for k, _ in self.rows())
        for key, value in self.rows():
            print(f"{key:<{width}}  {value}", file=out)
        print("verdict: " + ("nothing lost, nothing run twice on a healthy slave" if self.ok
                             else "FAILED"), file=out)  # fmt: skip


def _ids(ids: list[int]) -> str:
    return f"{len(ids)}" + (f" (items {', '.join(map(str, ids[:10]))})" if ids else "")


def run(
    client: Client,
    *,
    jobs: int | None = None,
    seconds: float | None = None,
    kill: bool = True,
    restart_master: bool = False,
    kill_slave: Callable[[dict[str, Any]], None] | None = None,
    crash_master: Callable[[], None] | None = None,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Report:
    """Run the chaos batch on the cluster behind ``client`` and account for every job.

    ``kill_slave(worker)`` and ``crash_master()`` default to asking the master (the
    slave exits as if killed; the master replaces itself as after kill -9 and a restart);
    deployctl passes its own, which kill containers.
    """
    status = client.status()
    workers = [w for w in status["workers"] if w.get("connected", True) and not w["draining"]]
    slots = sum(max(1, w["concurrency"]) for w in workers)
    if not workers:
        raise SchedulerError("no slave is connected; start slaves, then run verify")
    if kill and len(workers) < 2:
        raise SchedulerError("verify kills a slave: it needs two or more (or pass --no-kill)")
    lease = float(status.get("lease_seconds") or 6.0)
    seconds = seconds if seconds is not None else 2 * lease
    jobs = jobs if jobs is not None else max(8, 2 * slots)
    kill_slave = kill_slave or (lambda w: client.call("chaos", "kill-slave", w["name"]))
    crash_master = crash_master or (lambda: client.call("chaos", "crash-master"))
    run_id = uuid.uuid4().hex[:12]
    report = Report(jobs, seconds)
    say(f"verify {run_id}: {jobs} jobs of {seconds:g}s on {len(workers)} slaves ({slots} slots)")
    handles = [client.apply_async(probe, (run_id, i, seconds), name=f"verify-{run_id}")
               for i in range(jobs)]  # fmt: skip
    client.flush()
    killed_at = None
    victim = _busy_slave(client, run_id, seconds) if kill or restart_master else None
    if kill and victim is not None:
        killed_at = client.ping()["time"]
        kill_slave(victim)
        report.killed = victim["name"]
        say(f"verify {run_id}: killed slave {victim['name']} while it ran jobs")
    if restart_master:
        time.sleep(min(1.0, seconds / 4))
        crash_master()
        report.master_crashes = 1
        say(f"verify {run_id}: crashed the master; waiting for it to come back")
        time.sleep(1.0)
    for handle in handles:
        try:
            handle.get(timeout=max(120.0, 4 * seconds * (jobs / slots + 2)))
        except JobFailed:
            pass
    _account(report, handles, client.call("marks", run_id), killed_at)
    return report


def _busy_slave(client: Client, run_id: str, seconds: float) -> dict[str, Any]:
    """Wait until a slave runs some of the batch; return the one running most of it."""
    deadline = time.monotonic() + max(60.0, 4 * seconds)
    while time.monotonic() < deadline:
        marks = client.call("marks", run_id)
        running = {w["name"]: w for w in client.status()["workers"] if w["running"]}
        by_worker: dict[str, int] = {}
        for _, worker, _ in marks:
            if worker in running:
                by_worker[worker] = by_worker.get(worker, 0) + 1
        if by_worker:
            return running[max(by_worker, key=lambda k: by_worker[k])]
        time.sleep(0.2)
    raise SchedulerError("no slave started the verify jobs within a minute; is the cluster busy?")


def _account(report: Report, handles: list, marks: list, killed_at: float | None) -> None:
    runs: dict[int, list[tuple[str, float]]] = {}
    for item, worker, at in marks:
        runs.setdefault(item, []).append((worker, at))
    for item, handle in enumerate(handles):
        seen = runs.get(item, [])
        if not handle.ready() or handle.state != "succeeded" or not seen:
            report.lost.append(item)
        elif len(seen) == 1:
            report.once.append(item)
        elif all(worker == report.killed for worker, _ in seen[:-1]):
            report.rerun_after_kill.append(item)
            if killed_at is not None:
                moved = seen[-1][1] - killed_at
                if report.moved_after is None or moved < report.moved_after:
                    report.moved_after = moved
        else:
            report.twice_on_healthy.append(item)

"""``python -m bench.hops``: where the time of one ``apply_async().get()`` goes.

Each hop of the single-job path is timed on its own, median of many calls, on the same
machine in one run: a round trip to the master, a journal commit, a submit (round trip
plus commit), a job's round trip through a slot's child process, and the whole path.
What the whole path costs beyond the sum of its parts is the hand-offs between threads
and processes (the master waking a slave's long-poll, the slave's threads, the report,
the client's collect long-poll).
"""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from scheduler.board import Board
from scheduler.job import JobSpec
from scheduler.journal import Journal
from scheduler.protocol import Lease
from scheduler.runner import Abort, PythonSlot

from .ours import Cluster
from .procs import Procs
from .workloads import noop

CALLS = 400


def median_ms(call: Callable[[], object], n: int = CALLS) -> float:
    for _ in range(20):
        call()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def journal_commit(tmp: Path) -> float:
    journal, board = Journal(tmp / "journal"), Board()

    def one() -> None:
        board.submit([JobSpec("shell", (["true"], False))])
        journal.wait(journal.append(board.take_dirty()))

    try:
        return median_ms(one)
    finally:
        journal.close()


def child_round_trip() -> float:
    from scheduler.client import dumps_function

    slot, abort, body = PythonSlot(65536, 1 << 24), Abort(), dumps_function(noop)
    args = dumps_function(((1,), {}))
    leases = iter(range(1, 10**9))

    def one() -> None:
        n = next(leases)
        slot.run([Lease(n, n, "python", ("d", args), None)], {"d": body}, abort, lambda o: None)

    try:
        return median_ms(one)
    finally:
        slot.close()


def cluster_hops(tmp: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env["SCHEDULER_AUTHKEY"] = secrets.token_urlsafe(24)
    env["SCHEDULER_HTTP"] = ""
    procs = Procs(tmp, env)
    cluster = Cluster(procs, tmp)
    try:
        client = cluster.start_master()
        ping = median_ms(client.ping)
        submit = median_ms(lambda: client.submit_shell(["true"]).id)  # waits for the commit
        cluster.start_slaves(1, 1)
        cluster.warm_up(50)
        whole = median_ms(lambda: client.apply_async(noop, (1,)).get(10))
        return {"ping": ping, "submit": submit, "whole": whole}
    finally:
        cluster.stop()
        procs.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-hops-") as tmp:
        commit = journal_commit(Path(tmp))
        child = child_round_trip()
        hops = cluster_hops(Path(tmp))
    rpc = hops["ping"]
    rows = [
        ("client -> master -> client, one call (ping)", rpc),
        ("journal commit of one job (in process)", commit),
        ("submit of one job: call + validate + commit + reply", hops["submit"]),
        ("slot -> child process -> slot, a no-op job", child),
        ("apply_async().get(), the whole path", hops["whole"]),
        ("hand-offs: whole - (submit + child + 2 calls)",
         hops["whole"] - hops["submit"] - child - 2 * rpc),
    ]  # fmt: skip
    print(f"per-hop breakdown of one job, median of {CALLS} calls (ms), "
          f"{threading.active_count()} threads here, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name, value in rows:
        print(f"  {name:<52} {value:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

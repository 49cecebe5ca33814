"""``python -m bench.hops``: where the time of one ``apply_async().get()`` goes.

Two tables from one run. First, parts timed on their own (median of many calls): a round
trip to the master, a journal commit, a submit (round trip plus commit), a job's round
trip through a slot's child process, and the whole path. Second, the whole path traced
hop by hop: every process of a cluster records when the job crosses each point (see
bench/tracing/sitecustomize.py; one monotonic clock for all processes on the machine),
and the table gives the median time of each hop, client -> master -> journal -> slave ->
job process -> back. Tracing adds a few microseconds a point; its total is shown beside
the untraced median. Third, what each process spends per job on that path: CPU and
context switches (a wake-up costs tens of microseconds of CPU on a VM; these counts found
the hand-offs the master no longer makes).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from scheduler.board import Board
from scheduler.job import JobSpec
from scheduler.journal import Journal
from scheduler.protocol import Lease
from scheduler.runner import Abort, PythonSlot

from .ours import Cluster
from .procs import Procs, cpu_seconds, descendants
from .workloads import noop

CALLS = 400
TRACING = Path(__file__).parent / "tracing"
# the single-job path: (hop, the event that ends it); each is the first after the last
HOPS = (
    ("client: apply_async(), buffer, send the submit", "C.send>"),
    ("submit message reaches the master", "M.submit>"),
    ("master: validate, journal commit", "M.journal<"),
    ("published; the slave's parked lease answered", "M.dispatch<"),
    ("lease reply reaches the slave's slot", "S.slot>"),
    ("slot -> job process -> slot", "S.finish>"),
    ("outcome reaches the master", "M.report>"),
    ("master: apply, route to the client", "M.route<"),
    ("the client's parked collect answered", "M.answer<"),
    ("outcome reaches the client", "C.resolve>"),
    ("client: resolve, get() returns", "end"),
)


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
        journal.wait(journal.append(board.take_dirty(), wake=False))  # as submit() does

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


@contextlib.contextmanager
def cluster_of(tmp: Path, **env: str) -> Iterator[Cluster]:
    """A cluster of our own (a fresh key, no web server, ``env`` added), stopped after."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    environ.update(SCHEDULER_AUTHKEY=secrets.token_urlsafe(24), SCHEDULER_HTTP="", **env)
    procs = Procs(tmp, environ)
    cluster = Cluster(procs, tmp)
    try:
        yield cluster
    finally:
        cluster.stop()
        procs.close()


def cluster_hops(tmp: Path) -> dict[str, float]:
    with cluster_of(tmp) as cluster:
        client = cluster.start_master()
        ping = median_ms(client.ping)
        submit = median_ms(lambda: client.submit_shell(["true"]).id)  # waits for the commit
        cluster.start_slaves(1, 1)
        cluster.warm_up(50)
        whole = median_ms(lambda: client.apply_async(noop, (1,)).get(10))
        return {"ping": ping, "submit": submit, "whole": whole}


def traced_path(tmp: Path, calls: int = 300) -> tuple[list[tuple[str, float]], float]:
    """Median microseconds of each hop of HOPS over ``calls`` sequential jobs, and the
    median of the whole (traced) path."""
    import importlib

    trace_dir = tmp / "trace"
    trace_dir.mkdir()
    tracer = importlib.import_module("bench.tracing.sitecustomize")
    tracer.patch()  # this process, the client
    windows = []
    path = os.pathsep.join([str(TRACING), os.environ.get("PYTHONPATH", "")])
    with cluster_of(tmp, BENCH_TRACE_DIR=str(trace_dir), PYTHONPATH=path) as cluster:
        client = cluster.start_master("master-traced")
        cluster.start_slaves(1, 1)
        cluster.warm_up(100)
        tracer.events.clear()
        for i in range(calls):
            started = time.monotonic_ns()
            client.apply_async(noop, (i,)).get(10)
            windows.append((started, time.monotonic_ns()))
    events = list(tracer.events)
    for f in trace_dir.glob("*.txt"):
        lines = (line.split() for line in f.read_text().splitlines())
        events += [(int(t), tag) for t, tag in lines]
    events.sort()
    per_hop: list[list[float]] = [[] for _ in HOPS]
    at = 0
    for started, ended in windows:
        while at < len(events) and events[at][0] < started:
            at += 1
        last, found, i = started, [], at
        for _, tag in HOPS:
            if tag == "end":
                found.append(ended)
                break
            while i < len(events) and events[i][1] != tag and events[i][0] <= ended:
                i += 1
            if i >= len(events) or events[i][0] > ended:
                break
            found.append(events[i][0])
        if len(found) == len(HOPS):
            for k, t in enumerate(found):
                per_hop[k].append((t - last) / 1000)
                last = t
    medians = [(name, statistics.median(v) if v else float("nan"))
               for (name, _), v in zip(HOPS, per_hop, strict=True)]  # fmt: skip
    whole = statistics.median((e - s) / 1000 for s, e in windows)
    return medians, whole


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches so far of every thread of ``pid``."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text().splitlines()
        except OSError:  # a thread that ended meanwhile
            continue
        for line in status:
            if line.startswith("voluntary_ctxt_switches"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def per_process(tmp: Path, calls: int = 2000) -> list[tuple[str, float, float, float]]:
    """(process, CPU us, voluntary and involuntary switches) per sequential job."""
    with cluster_of(tmp) as cluster:
        client = cluster.start_master("master-counted")
        cluster.start_slaves(1, 1)
        cluster.warm_up(100)
        assert cluster.master is not None
        slave = cluster.slaves[0].pid
        who = [("client (this process)", os.getpid()), ("master", cluster.master.pid),
               ("slave", slave), *(("job process", p) for p in descendants(slave))]  # fmt: skip
        before = [(cpu_seconds([pid]), switches(pid)) for _, pid in who]
        for i in range(calls):
            client.apply_async(noop, (i,)).get(10)
        after = [(cpu_seconds([pid]), switches(pid)) for _, pid in who]
    return [(name, (c1 - c0) / calls * 1e6, (s1[0] - s0[0]) / calls, (s1[1] - s0[1]) / calls)
            for (name, _), (c0, s0), (c1, s1) in zip(who, before, after, strict=True)
            if c1 > c0 or s1 != s0]  # fmt: skip


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-hops-") as tmp:
        commit = journal_commit(Path(tmp))
        child = child_round_trip()
        hops = cluster_hops(Path(tmp))
        traced, traced_whole = traced_path(Path(tmp))
        counted = per_process(Path(tmp))
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
    print("\nthe single-job path hop by hop, traced, median of 300 jobs (us); "
          "1 slave x 1 process, journal on")  # fmt: skip
    for name, value in traced:
        print(f"  {name:<52} {value:7.0f}")
    print(f"  {'sum of the hops':<52} {sum(v for _, v in traced):7.0f}")
    print(f"  {'whole path, traced (median)':<52} {traced_whole:7.0f}")
    print(f"  {'whole path, untraced (median, above)':<52} {hops['whole'] * 1000:7.0f}")
    print("\nper job on that path, by process (2,000 sequential jobs): CPU (us), context "
          "switches (voluntary, involuntary)")  # fmt: skip
    for name, cpu, voluntary, involuntary in counted:
        print(f"  {name:<34} {cpu:7.0f} us {voluntary:7.1f} {involuntary:7.1f}")
    print(f"  {'all of them':<34} {sum(c for _, c, _, _ in counted):7.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.arrays``: what arrays and priorities cost (issue #12, items 3-5).

A master (journal on) + 2 slaves x 2 processes on loopback, started as ``bench.run`` does:

1. No-op Python tasks as one array capped at 50 running (``map(noop, ..., chunksize=1,
   max_running=50)``) against as many plain jobs (``map(noop, ..., chunksize=1)``); then shell
   tasks, ``submit_array(["true"], ..., max_running=50)`` against ``submit_shell(["true"])``.
   Order ABBA; each figure is the mean of its two runs (the highest, for "at once"). A second
   client polls the master's count of running jobs meanwhile (running from the hand-out: what
   the cap bounds); the master's /metrics gives the journal commits each run took.
2. Priority: slaves busy with a queue of low-priority sleep jobs, then one more job of the
   same length at priority 10: from its submit to its start, and the low jobs that started
   in between. Slaves lease ahead by the job times they measured, so three kinds: slaves
   that never ran a job, the slaves of part 1 (last ran shell `true`), and slaves that just
   ran no-op Python jobs; each with a master of its own. The same job at priority 0 is not
   waited for (it would wait behind the whole queue): its wait is computed.

One run, side by side; nothing is asserted. ``--quick`` shrinks the sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scheduler import Client

from .ours import Cluster
from .procs import BenchError, Procs, cpu_seconds
from .run import Phases, child_env, load_line, note
from .workloads import noop, sleep

SLAVES, SLOTS = 2, 2  # slaves x processes each
POLL = 0.01  # seconds between the watcher's status calls
HIGH = 10  # the urgent job's priority
COMMITS = re.compile(r"^scheduler_journal_commit_seconds_count (\S+)$", re.M)


@dataclass(frozen=True)
class Sizes:
    tasks: int = 10_000  # no-op Python tasks per run
    shell: int = 2_000  # `true` tasks per run
    cap: int = 50  # the arrays' max_running
    low: int = 2_000  # low-priority jobs queued ahead of the urgent one
    length: float = 0.2  # seconds each of them (and the urgent one) sleeps
    settle: float = 1.0  # seconds the low queue runs before the urgent job comes


QUICK = Sizes(tasks=2_000, shell=500, low=400)


@dataclass
class Run:
    """One way of submitting the same tasks, over its runs."""

    seconds: list[float] = field(default_factory=list)
    master_us: list[float] = field(default_factory=list)  # master CPU per task
    commits: list[float] = field(default_factory=list)  # journal commits per 1,000 tasks
    polled: int = 0  # the most running at once, by the master's count
    overlap: int = 0  # the most whose recorded [started, ended] overlap


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


class Watcher:
    """Polls the master's count of running jobs from its own client, keeping the highest."""

    def __init__(self, client: Client) -> None:
        self.client, self.most = client, 0
        self._stop = threading.Event()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        self.most = 0
        self._stop.clear()
        thread = threading.Thread(target=self._poll, name="bench-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(POLL):
            self.most = max(self.most, self.client.status()["counts"]["running"])


def commits(url: str) -> float:
    """Journal commits so far, from the master's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        found = COMMITS.search(reply.read().decode())
    if found is None:
        raise BenchError(f"no journal commit count in {url}/metrics")
    return float(found[1])


def most_at_once(infos: list[dict]) -> int:
    """The most jobs whose [started, ended] overlap (an end before a start at the same time)."""
    events = sorted([(i["started"], 1) for i in infos] + [(i["ended"], -1) for i in infos])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def infos(client: Client, ids: list[int], array: int | None = None) -> list[dict]:
    """The records of jobs ``ids`` (``array``: the tasks of that array), 1,000 a call."""
    wanted, found, before = set(ids), [], max(ids) + 1
    while before > min(ids) and (page := client.jobs(limit=1000, before=before, array=array)):
        found += [i for i in page if i["id"] in wanted]
        before = page[-1]["id"]
    if len(found) != len(wanted):
        raise BenchError(f"found {len(found)} of {len(wanted)} job records")
    return found


@dataclass
class Bench:
    """The cluster of part 1, the watcher's client and the master's /metrics address."""

    cluster: Cluster
    client: Client
    watcher: Watcher
    url: str

    def timed(self, run: Run, submit: Callable[[], list[int]], array: bool, n: int) -> None:
        """One run of ``submit``, which waits for its ``n`` tasks and returns their ids."""
        assert self.cluster.master is not None
        master = [self.cluster.master.pid]
        cpu, done, started = cpu_seconds(master), commits(self.url), time.perf_counter()
        with self.watcher.watching():
            ids = submit()
        run.seconds.append(time.perf_counter() - started)
        run.master_us.append((cpu_seconds(master) - cpu) / n * 1e6)
        run.commits.append((commits(self.url) - done) / n * 1000)
        run.polled = max(run.polled, self.watcher.most)
        records = infos(self.client, ids, ids[0] if array else None)
        run.overlap = max(run.overlap, most_at_once(records))

    def compare(self, runs: dict[str, Callable[[], list[int]]], n: int) -> dict[str, Run]:
        """ABBA: plain, array, array, plain."""
        result = {"plain": Run(), "array": Run()}
        for kind in ("plain", "array", "array", "plain"):
            note(f"  {kind}, {n:,} tasks")
            self.timed(result[kind], runs[kind], kind == "array", n)
        return result


def python_runs(client: Client, n: int, cap: int) -> dict[str, Callable[[], list[int]]]:
    def run(max_running: int | None) -> list[int]:
        first = client.status()["total"] + 1  # one master, one submitter: ids in a row
        if client.map(noop, range(n), chunksize=1, max_running=max_running) != list(range(n)):
            raise BenchError("map returned wrong or reordered results")
        return list(range(first, first + n))

    return {"plain": lambda: run(None), "array": lambda: run(cap)}


def shell_runs(client: Client, n: int, cap: int) -> dict[str, Callable[[], list[int]]]:
    def wait(handles: list) -> list[int]:
        for handle in handles:
            handle.get(120)
        return [handle.id for handle in handles]

    return {
        "plain": lambda: wait([client.submit_shell(["true"]) for _ in range(n)]),
        "array": lambda: wait(client.submit_array(["true"], range(n), max_running=cap)),
    }


@dataclass
class Urgent:
    """One job at priority HIGH submitted behind a queue of low ones of the same length."""

    slots: int = 0
    wait: float = 0.0  # its started - submitted, by the master's clock
    ahead: int = 0  # low jobs that started after its submit and before it
    behind: int = 0  # jobs not started when it came: queued, or leased ahead by slaves
    held: int = 0  # of those, leased ahead (the master's running count beyond the slots)


def urgent(client: Client, s: Sizes) -> Urgent:
    """The low queue, ``settle`` seconds of it running, then the urgent job."""
    low = [client.apply_async(sleep, (s.length,), name="low") for _ in range(s.low)]
    client.flush()
    time.sleep(s.settle)
    status = client.status()
    handle = client.apply_async(sleep, (s.length,), name="urgent", priority=HIGH)
    handle.get(120)
    time.sleep(2 * s.length)  # what started before it has ended: those records are final
    mine = client.job(handle.id)
    found = Urgent(slots=sum(w["concurrency"] for w in status["workers"]))
    found.wait = mine["started"] - mine["submitted"]
    found.ahead = sum(1 for i in infos(client, [h.id for h in low]) if i["ended"] is not None
                      and mine["submitted"] < i["started"] < mine["started"])  # fmt: skip
    found.held = max(0, status["counts"]["running"] - found.slots)
    found.behind = status["counts"]["queued"] + found.held
    return found


def _row(name: str, *cells: str) -> str:
    return f"  {name:<52}" + "".join(f"{c:>16}" for c in cells)


def arrays_table(title: str, runs: dict[str, Run], n: int) -> list[str]:
    plain, array = runs["plain"], runs["array"]
    secs = [mean(r.seconds) for r in (plain, array)]
    cpu = [mean(r.master_us) for r in (plain, array)]
    done = [mean(r.commits) for r in (plain, array)]
    per_task = [v / n * 1e6 for v in secs]
    return [
        title,
        _row("wall time (s)", *(f"{v:.2f}" for v in secs), f"{secs[1] - secs[0]:+.2f}"),
        _row("jobs/s", *(f"{n / v:,.0f}" for v in secs), f"{secs[0] / secs[1]:.2f}x"),
        _row("wall time per task (us)", *(f"{v:.0f}" for v in per_task),
             f"{per_task[1] - per_task[0]:+.0f}"),  # fmt: skip
        _row("master CPU per task (us)", *(f"{v:.0f}" for v in cpu), f"{cpu[1] - cpu[0]:+.0f}"),
        _row("journal commits per 1,000 tasks", *(f"{v:.1f}" for v in done),
             f"{done[1] - done[0]:+.1f}"),  # fmt: skip
        _row("most running at once (master's count, polled)", str(plain.polled),
             str(array.polled)),  # fmt: skip
        _row("most running at once (tasks' started/ended)", str(plain.overlap),
             str(array.overlap)),  # fmt: skip
    ]


def priority_table(runs: list[Urgent], s: Sizes) -> list[str]:
    waits = [u.behind * s.length / max(u.slots, 1) for u in runs]
    bound = 1.5 * s.length
    return [
        f"priority: {s.low:,} low jobs of {s.length:g} s (Python sleep), all slots busy for "
        f"{s.settle:g} s; then one job of {s.length:g} s at priority {HIGH}",
        _row("slaves before the queue came", "no job yet", "shell `true`", "no-op Python"),
        _row("slots", *(str(u.slots) for u in runs)),
        _row(f"priority {HIGH}: submit -> start (s)", *(f"{u.wait:.3f}" for u in runs)),
        _row("  the same, in low job lengths", *(f"{u.wait / s.length:.2f}" for u in runs)),
        _row("low jobs started after its submit, before it", *(str(u.ahead) for u in runs)),
        _row("jobs not started when it came", *(f"{u.behind:,}" for u in runs)),
        _row("  of which held by slaves (leased ahead)", *(f"{u.held:,}" for u in runs)),
        _row("priority 0: submit -> start, computed (s)", *(f"{w:.1f}" for w in waits)),
        _row(f"waited at most about one low job (<= {bound:g} s)",
             *("yes" if u.wait <= bound else "NO" for u in runs)),  # fmt: skip
    ]


LEGEND = """\
most running at once: the master's count (hand-out to report, what the cap bounds) polled
every 10 ms from a second client; and from the tasks' records, where a run is [its report -
its duration, its report]: a batch reported together overlaps there, however short the jobs.
leased ahead: jobs a slave took beyond its slots, sized by the job times it last measured
(up to 256 a slave); an urgent job submitted later waits behind them.
priority 0, computed: (jobs not started when it came) x (low job length) / slots."""


def part_one(bench: Bench, s: Sizes, phase: Phases) -> list[str]:
    lines = [f"arrays: master + {SLAVES} slaves x {SLOTS} processes, journal on, loopback; "
             "ABBA, means of 2 runs each (most at once: the higher)",
             _row("", "plain jobs", f"array, cap {s.cap}", "array vs plain")]  # fmt: skip
    with phase(f"{s.tasks:,} no-op Python tasks, plain and as an array", 120):
        runs = bench.compare(python_runs(bench.client, s.tasks, s.cap), s.tasks)
    lines += arrays_table(f"{s.tasks:,} no-op Python tasks (map, chunksize=1)", runs, s.tasks)
    with phase(f"{s.shell:,} shell tasks, plain and as an array", 120):
        runs = bench.compare(shell_runs(bench.client, s.shell, s.cap), s.shell)
    return lines + arrays_table(f"{s.shell:,} shell `true` tasks (submit_shell / submit_array)",
                                runs, s.shell)  # fmt: skip


def start(cluster: Cluster, name: str, warm: int) -> Client:
    """A master, its slaves, and ``warm`` no-op jobs through them."""
    client = cluster.start_master(name)
    cluster.start_slaves(SLAVES, SLOTS)
    if warm:
        cluster.warm_up(warm)
    return client


def urgent_fresh(procs: Procs, workdir: Path, s: Sizes, warm: int) -> Urgent:
    cluster = Cluster(procs, workdir)
    try:
        return urgent(start(cluster, f"master-priority-{warm}", warm), s)
    finally:
        cluster.stop()


def run_all(s: Sizes, procs: Procs, workdir: Path, phase: Phases) -> list[str]:
    cluster = Cluster(procs, workdir)
    try:
        with phase("master and slaves", 60):
            client = start(cluster, "master", 500)
            assert cluster.master is not None
            url = cluster.master.wait_for_line(r"dashboard on (http://[\d.:]+)/", 30)[1]
            watcher = Watcher(Client(cluster.address, procs.env["SCHEDULER_AUTHKEY"]))
        lines = part_one(Bench(cluster, client, watcher, url), s, phase)
        watcher.client.close()
        with phase("priority, slaves that never ran a job", 60):
            runs = [urgent_fresh(procs, workdir, s, 0)]
        with phase("priority, the slaves of part 1", 120):
            runs.append(urgent(client, s))
            cluster.stop()
        with phase("priority, slaves that just ran no-op jobs", 120):
            runs.append(urgent_fresh(procs, workdir, s, 500))
        return [*lines, "", *priority_table(runs, s), "", LEGEND]
    finally:
        with contextlib.suppress(BenchError):
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.arrays", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help=f"smaller sizes ({QUICK.tasks:,} "
                   f"Python tasks, {QUICK.shell:,} shell, {QUICK.low:,} low-priority)")  # fmt: skip
    sizes = QUICK if p.parse_args(argv).quick else Sizes()
    load_start, started = os.getloadavg()[0], time.monotonic()
    env = {**child_env(secrets.token_urlsafe(32)), "SCHEDULER_HTTP": "127.0.0.1:0"}
    with tempfile.TemporaryDirectory(prefix="bench-arrays-") as tmp:
        procs = Procs(Path(tmp), env)
        try:
            lines = run_all(sizes, procs, Path(tmp), Phases())
        finally:
            procs.close()
    note(f"done in {time.monotonic() - started:.0f}s")
    print("\n".join(lines))
    print(load_line((load_start, os.getloadavg()[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

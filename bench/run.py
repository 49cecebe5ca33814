"""``python -m bench.run``: one run, one table. Stdout carries the table (or ``--json``);
progress goes to stderr. Every process started is stopped, also on Ctrl-C or errors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType

from . import measure
from .baselines import classic, pool_pids, stdlib_pool
from .ours import Cluster, fill
from .procs import ROOT, BenchError, Procs, cpu_seconds, rss_mb
from .report import Row, table, to_json

# issue #10's goals
TARGET_RATE = 25_000  # no-op jobs/s, one tracked, journaled job per item, 2 slaves x 1 process
TARGET_P50_MS = 0.5
TARGET_P99_MS = 1.0
TARGET_MASTER_US = 15.0  # the master process's own CPU per no-op job
TARGET_SUBMIT_S = 20.0  # for 1,000,000 jobs
TARGET_RSS_MB = 250.0  # with 1,000,000 queued
TARGET_RESTART_S = 10.0  # with 1,000,000 queued
FULL_QUEUE = 1_000_000  # the size the last three goals are for
TOLERANCE = 0.05


@dataclass(frozen=True)
class Sizes:
    jobs: int = 20_000  # no-op jobs, one per item
    warm: int = 2_000
    chunked: int = 200_000  # items for chunked map
    calls: int = 500  # sequential calls for latency
    sleeps: int = 200
    sleep_seconds: float = 0.05
    queued: int = 1_000_000


QUICK = Sizes(jobs=5_000, warm=500, chunked=50_000, calls=200, queued=100_000)


@dataclass
class Rows:
    burst: Row
    cpu: Row
    master_cpu: Row
    scale1: Row
    scale2: Row
    scale4: Row
    map1: Row
    chunked: Row
    p50: Row
    p99: Row
    sleep: Row
    submit: Row
    rss: Row
    restart: Row

    @classmethod
    def empty(cls, s: Sizes) -> Rows:
        ideal = s.sleeps * s.sleep_seconds / 4
        rate = f">= {TARGET_RATE:,}"
        full = s.queued == FULL_QUEUE  # the queue goals are for a million jobs
        return cls(
            burst=Row("no-op apply_async burst, 1 job/item", "jobs/s", target=rate,
                      bar=lambda v: v >= TARGET_RATE),
            cpu=Row("CPU per no-op job, all processes", "us"),
            master_cpu=Row("CPU per no-op job, master process only", "us",
                           target=f"<= {TARGET_MASTER_US:g} us",
                           bar=lambda v: v <= TARGET_MASTER_US),
            scale1=Row("no-op burst, 1 slave x 1 process", "jobs/s"),
            scale2=Row("no-op burst, 2 slaves x 1 process", "jobs/s"),
            scale4=Row("no-op burst, 4 slaves x 1 process", "jobs/s"),
            map1=Row("no-op map chunksize=1", "jobs/s", target=rate,
                     bar=lambda v: v >= TARGET_RATE),
            chunked=Row("no-op map default chunksize", "items/s"),
            p50=Row("apply_async().get() p50", "ms", target=f"<= {TARGET_P50_MS:g} ms",
                    bar=lambda v: v <= TARGET_P50_MS),
            p99=Row("apply_async().get() p99", "ms", target=f"<= {TARGET_P99_MS:g} ms",
                    bar=lambda v: v <= TARGET_P99_MS),
            sleep=Row(f"{s.sleeps} x {s.sleep_seconds * 1000:g} ms sleep, 4 processes", "s",
                      target=f"{ideal:.2f} s +-{TOLERANCE:.0%}",
                      bar=lambda v: abs(v - ideal) <= TOLERANCE * ideal),
            submit=Row(f"submit {s.queued:,} jobs (journal on)", "s",
                       target=f"<= {TARGET_SUBMIT_S:g} s" if full else "",
                       bar=(lambda v: v <= TARGET_SUBMIT_S) if full else None),
            rss=Row(f"master RSS, {s.queued:,} queued", "MB",
                    target=f"<= {TARGET_RSS_MB:g} MB" if full else "",
                    bar=(lambda v: v <= TARGET_RSS_MB) if full else None),
            restart=Row(f"master restart, {s.queued:,} queued (until it listens)", "s",
                        target=f"<= {TARGET_RESTART_S:g} s" if full else "",
                        bar=(lambda v: v <= TARGET_RESTART_S) if full else None),
        )  # fmt: skip

    def all(self) -> list[Row]:
        return list(vars(self).values())


def note(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Phases:
    """Names what is running and bounds it with SIGALRM, so a hang cannot block forever."""

    def __init__(self) -> None:
        self.current = ""
        signal.signal(signal.SIGALRM, self._expired)

    def _expired(self, signum: int, frame: FrameType | None) -> None:
        raise BenchError(f"{self.current}: still running after its time budget; giving up")

    @contextlib.contextmanager
    def __call__(self, name: str, budget: int) -> Iterator[None]:
        self.current = name
        note(f"{name} ...")
        started = time.monotonic()
        signal.alarm(budget)
        try:
            yield
        finally:
            signal.alarm(0)
        note(f"{name}: {time.monotonic() - started:.1f}s")


def latency_ms(samples: list[float], q: float) -> float:
    return measure.percentile(samples, q) * 1000


def bench_pool(rows: Rows, s: Sizes, phase: Phases) -> None:
    with phase("multiprocessing.Pool(2): no-op jobs and latency", 120), stdlib_pool(2) as pool:
        measure.burst(pool, s.warm)
        rows.burst.pool, rows.cpu.pool = measure.burst_cpu(pool, s.jobs, pool_pids(pool))
        rows.map1.pool = measure.mapped(pool, s.jobs, 1)
        rows.chunked.pool = measure.mapped(pool, s.chunked, None)
        samples = measure.latency(pool, s.calls)
        rows.p50.pool, rows.p99.pool = latency_ms(samples, 50), latency_ms(samples, 99)
    with phase("multiprocessing.Pool(4): sleep jobs", 60), stdlib_pool(4) as pool:
        measure.sleeps(pool, 8, s.sleep_seconds)
        rows.sleep.pool = measure.sleeps(pool, s.sleeps, s.sleep_seconds)


def bench_classic(rows: Rows, s: Sizes, procs: Procs, phase: Phases) -> None:
    with phase("classic design, 2 slaves: no-op jobs and latency", 120):
        with classic(procs, slaves=2) as cluster:
            rows.burst.classic, rows.cpu.classic = measure.burst_cpu(
                cluster.pool, s.jobs, cluster.pids()
            )
            samples = measure.latency(cluster.pool, s.calls)
            rows.p50.classic, rows.p99.classic = latency_ms(samples, 50), latency_ms(samples, 99)
            cluster.add_slaves(2)
            rows.sleep.classic = measure.sleeps(cluster.pool, s.sleeps, s.sleep_seconds)


def bench_ours(rows: Rows, s: Sizes, procs: Procs, workdir: Path, phase: Phases) -> None:
    cluster = Cluster(procs, workdir)
    with phase("ours: master and 2 slaves x 1 process", 60):
        client = cluster.start_master()
        cluster.start_slaves(2, concurrency=1)
        cluster.warm_up(s.warm)
    with phase("ours: no-op jobs, 1 job/item", 120):
        assert cluster.master is not None
        before = cpu_seconds([cluster.master.pid])
        rows.burst.ours, rows.cpu.ours = measure.burst_cpu(client, s.jobs, cluster.pids())
        rows.master_cpu.ours = (cpu_seconds([cluster.master.pid]) - before) / s.jobs * 1e6
        rows.map1.ours = measure.mapped(client, s.jobs, 1)
    with phase("ours: chunked map", 60):
        rows.chunked.ours = measure.mapped(client, s.chunked, None)
    with phase("ours: latency", 60):
        samples = measure.latency(client, s.calls)
        rows.p50.ours, rows.p99.ours = latency_ms(samples, 50), latency_ms(samples, 99)
    with phase("ours: scaling, 1, 2 and 4 slaves x 1 process", 180):
        cluster.stop_slaves()
        for count, row in ((1, rows.scale1), (2, rows.scale2), (4, rows.scale4)):
            cluster.start_slaves(count - len(cluster.slaves), concurrency=1)
            cluster.warm_up(s.warm)
            row.ours = measure.burst(client, s.jobs)
    with phase("ours: 2 slaves x 2 processes, sleep jobs", 90):
        cluster.stop_slaves()
        cluster.start_slaves(2, concurrency=2)
        # Warm the slots up with the same jobs: slaves size their prefetch by past job
        # times, so no-op jobs first would measure that instead (see the closing note).
        measure.sleeps(client, 20, s.sleep_seconds)
        rows.sleep.ours = measure.sleeps(client, s.sleeps, s.sleep_seconds)
        cluster.stop()
    bench_queue(rows, s, Cluster(procs, workdir), phase)


def bench_queue(rows: Rows, s: Sizes, cluster: Cluster, phase: Phases) -> None:
    """A fresh master with no slaves, so every submitted job stays queued."""
    with phase(f"ours: submit {s.queued:,} jobs, nobody running them", 30 + s.queued // 2000):
        client = cluster.start_master("master-queue")
        rows.submit.ours = fill(client, s.queued)
        assert cluster.master is not None
        rows.rss.ours = rss_mb(cluster.master.pid)
        cluster.stop_master()
    with phase(f"ours: restart the master with {s.queued:,} queued", 60 + s.queued // 10000):
        started = time.perf_counter()
        cluster.start_master("master-queue-again", state="master-queue")
        rows.restart.ours = time.perf_counter() - started
        cluster.stop()


def child_env(authkey: str) -> dict[str, str]:
    """This environment without SCHEDULER_* / CLASSIC_*, plus the run's key and our path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDULER_", "CLASSIC_"))}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "SCHEDULER_AUTHKEY": authkey, "CLASSIC_AUTHKEY": authkey, "PYTHONPATH": path}


def run_all(rows: Rows, s: Sizes, workdir: Path) -> None:
    phase = Phases()
    procs = Procs(workdir, child_env(secrets.token_urlsafe(32)))
    try:
        # Forking ones first: the classic master forks its server, and our client has threads.
        bench_pool(rows, s, phase)
        bench_classic(rows, s, procs, phase)
        bench_ours(rows, s, procs, workdir, phase)
    finally:
        procs.close()


LEGEND = """\
ours: master + 2 slaves x 1 process (2 x 2, warmed up, for the sleep row; 1, 2, 4 for the
scaling rows), journal on, loopback. Restart: from SIGTERM'd master to the new one listening,
its journal loaded.
classic: bench/classic, 2 slave processes (4 for the sleep row), one job per round trip.
Pool: multiprocessing.Pool(2) (Pool(4) for the sleep row). us, ms, s, MB: lower is better.
CPU per job counts every process of the contender, client included."""


def load_line(load: tuple[float, float]) -> str:
    cpus = os.cpu_count() or 1
    busy = " (busy machine: rates are lower than on an idle one)" if max(load) > cpus / 2 else ""
    return f"load average {load[0]:.1f} at start, {load[1]:.1f} at end, {cpus} CPUs{busy}."


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so that everything started is stopped."""
    raise KeyboardInterrupt


def _default_sigterm() -> None:
    # Forked children (Pool workers, the classic manager's server) must not inherit the
    # unwinding handler: a Pool worker blocked on its queue's lock then ignores terminate().
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (100,000 queued jobs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--jobs", type=int, help="no-op jobs per throughput measurement")
    p.add_argument("--queued", type=int, help="jobs for the queued-memory measurement")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    sizes = replace(sizes, jobs=args.jobs or sizes.jobs, queued=args.queued or sizes.queued)
    signal.signal(signal.SIGTERM, _interrupt)
    os.register_at_fork(after_in_child=_default_sigterm)
    rows, status, started = Rows.empty(sizes), 0, time.monotonic()
    load_start = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="scheduler-bench-") as tmp:
            run_all(rows, sizes, Path(tmp))
    except (BenchError, KeyboardInterrupt) as exc:
        note(f"error: {str(exc) or type(exc).__name__}; the table below is partial")
        status = 1
    except Exception:  # a scheduler bug is a result too: show it, keep the partial table
        note(f"error:\n{traceback.format_exc()}the table below is partial")
        status = 1
    seconds, load = time.monotonic() - started, (load_start, os.getloadavg()[0])
    note(f"done in {seconds:.0f}s")
    context = {"sizes": asdict(sizes), "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "load_average": load, "seconds": round(seconds, 1)}  # fmt: skip
    if args.json:
        print(to_json(rows.all(), context))
    else:
        print(f"{table(rows.all())}\n\n{LEGEND}\n{load_line(load)}")
    return status


if __name__ == "__main__":
    sys.exit(main())

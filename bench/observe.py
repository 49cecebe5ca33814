"""``python -m bench.observe``: what watching the master costs.

1. No-op ``apply_async`` bursts on a master + 2 slaves x 1 process (journal on, loopback),
   in alternating rounds without and with ``/metrics`` scraped every second: jobs/s and
   the master's CPU per job.
2. A master holding 10,000 jobs: the time it takes to answer ``/``, ``/api/status``
   (what the page draws), ``/api/jobs`` and ``/metrics``, server side (the handler's
   ``Server-Timing``) and as a client on loopback sees it.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import measure
from .ours import Cluster, fill
from .procs import Procs, cpu_seconds
from .run import child_env, note

RENDER_GOAL_MS = 200.0
PAGES = ("/", "/api/status", "/api/jobs?limit=50", "/api/jobs?state=failed&limit=50", "/metrics")


class Scraper:
    """GETs /metrics every ``period`` seconds from a thread; keeps the server-side times."""

    def __init__(self, address: tuple[str, int], period: float = 1.0) -> None:
        self.address, self.period = address, period
        self.server_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(*self.address, timeout=10)
        while True:  # the first at once, then every period
            self.server_ms.append(get(conn, "/metrics")[0])
            if self._stop.wait(self.period):
                break
        conn.close()

    @contextmanager
    def running(self) -> Iterator[Scraper]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def get(conn: http.client.HTTPConnection, path: str) -> tuple[float, float]:
    """(server-side ms from Server-Timing, round-trip ms) of one GET on a kept-alive connection."""
    started = time.perf_counter()
    conn.request("GET", path, headers={"Host": "127.0.0.1"})
    reply = conn.getresponse()
    reply.read()
    took = (time.perf_counter() - started) * 1000
    if reply.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {reply.status}")
    found = re.search(r"dur=([\d.]+)", reply.getheader("Server-Timing") or "")
    return (float(found[1]) if found else float("nan")), took


def http_address(cluster: Cluster) -> tuple[str, int]:
    assert cluster.master is not None
    found = cluster.master.wait_for_line(r"dashboard on http://([\d.]+):(\d+)/", 30)
    return found[1], int(found[2])


def scrape_cost(procs: Procs, workdir: Path, jobs: int, rounds: int) -> dict[str, list[float]]:
    cluster = Cluster(procs, workdir / "throughput")
    results: dict[str, list[float]] = {"rate": [], "rate+scrape": [], "cpu": [],
                                       "cpu+scrape": [], "scrape ms": []}  # fmt: skip
    try:
        client = cluster.start_master("master-throughput")
        cluster.start_slaves(2, concurrency=1)
        cluster.warm_up(2000)
        assert cluster.master is not None
        master = [cluster.master.pid]
        for n in range(rounds):
            # ABBA: later rounds find more finished jobs in memory; neither kind always goes last
            for scraped in (False, True) if n % 2 == 0 else (True, False):
                note(f"round {n + 1}/{rounds}, {'scraped every 1 s' if scraped else 'no scrape'}")
                before = cpu_seconds(master)
                if scraped:
                    with Scraper(http_address(cluster)).running() as scraper:
                        rate = measure.burst(client, jobs)
                    results["scrape ms"] += scraper.server_ms
                else:
                    rate = measure.burst(client, jobs)
                cpu = (cpu_seconds(master) - before) / jobs * 1e6
                results["rate+scrape" if scraped else "rate"].append(rate)
                results["cpu+scrape" if scraped else "cpu"].append(cpu)
    finally:
        cluster.stop()
    return results


def hook_cost(jobs: int = 100_000) -> float:
    """Microseconds the metric hooks add per finished job (in this process, no I/O)."""
    from scheduler.job import Job, State
    from scheduler.metrics import Metrics

    metrics = Metrics()
    done = [Job(i, "shell", ((["true"], False)), state=State.SUCCEEDED, started=1.0, ended=1.01)
            for i in range(jobs)]  # fmt: skip
    started = time.perf_counter()
    for batch in range(0, jobs, 100):  # as slaves report: in batches
        metrics.submitted(100)
        metrics.finished(done[batch : batch + 100])
    return (time.perf_counter() - started) / jobs * 1e6


def render_times(procs: Procs, workdir: Path, jobs: int, repeat: int) -> dict[str, tuple]:
    """Median (server ms, round-trip ms) per page with ``jobs`` queued jobs in memory."""
    cluster = Cluster(procs, workdir / "render")
    try:
        client = cluster.start_master("master-render")
        fill(client, jobs)
        in_memory = client.status()["in_memory"]
        conn = http.client.HTTPConnection(*http_address(cluster), timeout=30)
        times = {}
        for page in PAGES:
            samples = [get(conn, page) for _ in range(repeat)]
            times[page] = (statistics.median(s[0] for s in samples),
                           statistics.median(s[1] for s in samples))  # fmt: skip
        conn.close()
        times["in memory"] = (in_memory, in_memory)
    finally:
        cluster.stop()
    return times


def _spread(values: list[float], fmt: str) -> str:
    """``median (min-max)``."""
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(cost: dict[str, list[float]], pages: dict[str, tuple], jobs: int, hooks: float) -> str:
    med = {k: statistics.median(v) if v else float("nan") for k, v in cost.items()}
    lines = [
        f"observability: master + 2 slaves x 1 process, journal on; {len(cost['rate'])} "
        f"alternating rounds of {jobs:,} no-op jobs each; median (min-max)",
        f"{'measurement':<46}{'no scrape':>24}{'/metrics every 1 s':>24}{'change':>9}",
    ]
    for name, key, fmt in (("no-op apply_async burst (jobs/s)", "rate", ",.0f"),
                           ("master CPU per job (us)", "cpu", ".1f")):  # fmt: skip
        change = (med[f"{key}+scrape"] / med[key] - 1) * 100
        lines.append(f"{name:<46}{_spread(cost[key], fmt):>24}"
                     f"{_spread(cost[key + '+scrape'], fmt):>24}{change:>+8.1f}%")  # fmt: skip
    lines += [
        f"{'one /metrics scrape, server side (ms)':<70}{_spread(cost['scrape ms'], '.2f'):>24}",
        f"{'so a scrape a second takes of one core':<70}{med['scrape ms'] / 10:>23.3f}%",
        f"{'metric hooks per finished job (us, in-process)':<46}{hooks:>24.2f}",
        "",
        f"{int(pages.pop('in memory')[0]):,} jobs in the master's memory     server ms"
        "  round trip ms  goal (server side)",
    ]
    for page, (server, trip) in pages.items():
        goal = f"<= {RENDER_GOAL_MS:g} ms: {'yes' if server <= RENDER_GOAL_MS else 'NO'}"
        lines.append(f"GET {page:<42}{server:>10.2f}{trip:>15.2f}  "
                     f"{goal if page in ('/', '/api/status') else '-'}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.observe", description=__doc__)
    p.add_argument("--jobs", type=int, default=20_000, help="no-op jobs per round")
    p.add_argument("--rounds", type=int, default=6, help="rounds of each kind (ABBA order)")
    p.add_argument("--in-memory", type=int, default=10_000, help="jobs held for the page times")
    p.add_argument("--repeat", type=int, default=20, help="requests per page")
    args = p.parse_args(argv)
    env = child_env(secrets.token_urlsafe(32))
    env["SCHEDULER_HTTP"] = "127.0.0.1:0"
    with tempfile.TemporaryDirectory(prefix="bench-observe-") as tmp:
        procs = Procs(Path(tmp), env)
        try:
            cost = scrape_cost(procs, Path(tmp), args.jobs, args.rounds)
            pages = render_times(procs, Path(tmp), args.in_memory, args.repeat)
        finally:
            procs.close()
    print(table(cost, pages, args.jobs, hook_cost()))
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

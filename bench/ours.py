"""Our scheduler as the benchmark runs it: real master and slave processes on loopback."""

from __future__ import annotations

import os
import time
from pathlib import Path

from scheduler import Client

from .procs import BenchError, Proc, Procs, descendants
from .workloads import noop


class Cluster:
    """A master (journal on, in a temp dir), its slaves, and one client in this process."""

    def __init__(self, procs: Procs, workdir: Path) -> None:
        self.procs = procs
        self.workdir = workdir
        self.master: Proc | None = None
        self.slaves: list[Proc] = []
        self.client: Client | None = None
        self.address = ""

    def start_master(self, name: str = "master", state: str | None = None) -> Client:
        """A master (its journal in ``state``, default ``name``), and a client of it."""
        env = {"SCHEDULER_BIND": "127.0.0.1:0",
               "SCHEDULER_STATE_DIR": str(self.workdir / (state or name))}  # fmt: skip
        self.master = self.procs.start(name, ["-m", "scheduler.master"], **env)
        found = self.master.wait_for_line(r"master listening on (\S+):(\d+);", 30)
        self.address = f"{found[1]}:{found[2]}"
        self.client = Client(self.address, self.procs.env["SCHEDULER_AUTHKEY"])
        return self.client

    def pids(self) -> list[int]:
        """This process (the client), the master, the slaves and their job processes."""
        slaves = [s.pid for s in self.slaves]
        below = [pid for s in slaves for pid in descendants(s)]
        return [os.getpid(), *([self.master.pid] if self.master else []), *slaves, *below]

    def start_slaves(self, count: int, concurrency: int) -> None:
        names = [f"bench-s{i + 1}" for i in range(len(self.slaves), len(self.slaves) + count)]
        for name in names:
            argv = ["-m", "scheduler.slave", "--master", self.address,
                    "--concurrency", str(concurrency), "--name", name]  # fmt: skip
            health = str(self.workdir / f"{name}.health")
            self.slaves.append(self.procs.start(name, argv, SCHEDULER_HEALTH_FILE=health))
        self._wait_workers(names, concurrency)

    def _wait_workers(self, names: list[str], concurrency: int, timeout: float = 30) -> None:
        assert self.client is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = {w["name"]: w for w in self.client.status()["workers"]}
            if all(workers.get(n, {}).get("concurrency") == concurrency for n in names):
                return
            for slave in self.slaves:
                if slave.popen.poll() is not None:
                    raise BenchError(f"{slave.name} exited:\n{slave.tail()}")
            time.sleep(0.05)
        raise BenchError(f"slaves {names} not listed by the master after {timeout}s")

    def warm_up(self, jobs: int) -> None:
        """Start every slot's child process and ship the function once."""
        assert self.client is not None
        for handle in [self.client.apply_async(noop, (i,)) for i in range(jobs)]:
            handle.get(60)

    def stop_slaves(self) -> None:
        for slave in self.slaves:
            if self.procs.stop(slave, timeout=30) != 0:
                raise BenchError(f"{slave.name} did not drain cleanly:\n{slave.tail()}")
        self.slaves = []

    def stop(self) -> None:
        """Slaves, client, master, in that order; the master must exit 0 on SIGTERM."""
        self.stop_slaves()
        self.stop_master()

    def stop_master(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.master is not None:
            master, self.master = self.master, None
            if self.procs.stop(master, timeout=60) != 0:
                raise BenchError(f"{master.name} did not stop cleanly:\n{master.tail()}")


def fill(client: Client, n: int) -> float:
    """Seconds to submit ``n`` no-op jobs with ``apply_async`` (nobody runs them)."""
    started = time.perf_counter()
    for i in range(n):
        client.apply_async(noop, (i,))
    client.flush()
    took = time.perf_counter() - started
    queued = client.status()["counts"]["queued"]
    if queued < n:
        raise BenchError(f"submitted {n} jobs but the master has {queued} queued")
    return took

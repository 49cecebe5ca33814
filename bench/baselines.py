"""The references: the classic design (bench/classic) and ``multiprocessing.Pool``.

``ClassicPool`` gives the classic master the two calls the measurements use. It adds
nothing to the wire: ``apply_async`` is one ``put`` of a Job on the dispatched queue,
``get`` reads the finished queue (keeping jobs that come back out of order by id).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
from collections.abc import Callable, Iterator
from typing import Any

from .classic import Job, Master
from .procs import BenchError, Procs


class _ClassicResult:
    def __init__(self, pool: ClassicPool, job_id: int) -> None:
        self._pool, self._id = pool, job_id

    def get(self, timeout: float | None = None) -> Any:
        return self._pool.wait(self._id, timeout)


class ClassicPool:
    def __init__(self, master: Master) -> None:
        self.master = master
        self._next_id = 0
        self._finished: dict[int, Job] = {}

    def apply_async(self, func: Callable, args: tuple = ()) -> _ClassicResult:
        self._next_id += 1
        self.master.dispatch(Job(self._next_id, func, args))
        return _ClassicResult(self, self._next_id)

    def wait(self, job_id: int, timeout: float | None) -> Any:
        while job_id not in self._finished:
            try:
                job = self.master.finished(timeout=60 if timeout is None else timeout)
            except queue.Empty:
                raise BenchError(f"classic: job {job_id} not finished after {timeout}s") from None
            self._finished[job.job_id] = job
        return self._finished.pop(job_id).result


class ClassicCluster:
    """A classic master in this process (its manager server forked) and slave processes."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.master = Master(("127.0.0.1", 0), procs.env["CLASSIC_AUTHKEY"].encode(), False)
        self.pool = ClassicPool(self.master)
        self.slaves: list = []

    def start(self, slaves: int) -> None:
        host, port = self.master.start()
        self.address = f"{host}:{port}"
        self.add_slaves(slaves)

    def add_slaves(self, count: int) -> None:
        for _ in range(count):
            name = f"classic-s{len(self.slaves) + 1}"
            argv = ["-m", "bench.classic.slave", "--master", self.address, "--quiet"]
            self.slaves.append(self.procs.start(name, argv))
        # The classic design keeps no list of slaves: wait for each to say it connects,
        # then warm up with a few round trips.
        for slave in self.slaves:
            slave.wait_for_line(r"Connect to server", 30)
        for i in range(200 * len(self.slaves)):
            self.pool.apply_async(int, (i,)).get(30)

    def pids(self) -> list[int]:
        """This process (the master), its manager's server process, and the slaves."""
        server = self.master.manager._process.pid  # type: ignore[union-attr]
        return [os.getpid(), server, *(s.pid for s in self.slaves)]

    def close(self) -> None:
        for slave in self.slaves:
            self.procs.stop(slave, timeout=5.0)
        self.master.shutdown()


@contextlib.contextmanager
def classic(procs: Procs, slaves: int) -> Iterator[ClassicCluster]:
    cluster = ClassicCluster(procs)
    try:
        cluster.start(slaves)
        yield cluster
    finally:
        cluster.close()


def pool_pids(pool: Any) -> list[int]:
    """This process (with the pool's handler threads) and the pool's workers."""
    return [os.getpid(), *(p.pid for p in pool._pool)]


@contextlib.contextmanager
def stdlib_pool(processes: int) -> Iterator[Any]:
    """``multiprocessing.Pool`` (fork): closed when done, terminated on errors."""
    pool = multiprocessing.get_context("fork").Pool(processes)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()

"""The tutorial's master: publishes two queues, dispatches jobs, reads finished ones.

Ported to Python 3 (``queue.Queue``, a bytes authkey, ``get(timeout=...)``). Two
departures, both for the benchmark: the address and key are parameters instead of
``0.0.0.0:8888`` and ``'jobs'``, and the manager class is our own subclass so that
registering does not change ``BaseManager`` for everyone in the process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from multiprocessing.managers import BaseManager
from queue import Queue
from typing import Any

from .job import Job


class JobManager(BaseManager):
    pass


class Master:
    def __init__(self, address: tuple[str, int] = ("0.0.0.0", 8888),
                 authkey: bytes = b"jobs", verbose: bool = True) -> None:  # fmt: skip
        # The queue of dispatched jobs and the queue of finished jobs.
        self.dispatched_job_queue: Queue = Queue()
        self.finished_job_queue: Queue = Queue()
        self.address = address
        self.authkey = authkey
        self.verbose = verbose
        self.manager: JobManager | None = None
        self.dispatched_jobs: Any = None
        self.finished_jobs: Any = None

    def get_dispatched_job_queue(self) -> Queue:
        return self.dispatched_job_queue

    def get_finished_job_queue(self) -> Queue:
        return self.finished_job_queue

    def start(self) -> tuple[str, int]:
        """Publish both queues and start the manager's server process; return its address."""
        JobManager.register("get_dispatched_job_queue", callable=self.get_dispatched_job_queue)
        JobManager.register("get_finished_job_queue", callable=self.get_finished_job_queue)
        # The registered callables are bound methods: the server must be forked, not spawned.
        ctx = multiprocessing.get_context("fork")
        self.manager = JobManager(address=self.address, authkey=self.authkey, ctx=ctx)
        self.manager.start()
        self.dispatched_jobs = self.manager.get_dispatched_job_queue()  # type: ignore[attr-defined]
        self.finished_jobs = self.manager.get_finished_job_queue()  # type: ignore[attr-defined]
        return self.manager.address  # type: ignore[return-value]

    def dispatch(self, job: Job) -> None:
        if self.verbose:
            print(f"Dispatch job: {job.job_id}")
        self.dispatched_jobs.put(job)

    def finished(self, timeout: float = 60) -> Job:
        job = self.finished_jobs.get(timeout=timeout)
        if self.verbose:
            print(f"Finished Job: {job.job_id}")
        return job

    def run_forever(self) -> None:
        """The tutorial's loop: dispatch 10 jobs, wait until they are taken, read results."""
        job_id = 0
        while True:
            for _ in range(10):
                job_id += 1
                self.dispatch(Job(job_id))
            while not self.dispatched_jobs.empty():
                self.finished()

    def shutdown(self) -> None:
        if self.manager is not None:
            self.manager.shutdown()
            self.manager = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.classic.master")
    p.add_argument("--port", type=int, default=8888)
    args = p.parse_args(argv)
    key = os.environ.get("CLASSIC_AUTHKEY", "jobs").encode()
    master = Master(("0.0.0.0", args.port), key)
    master.start()
    try:
        master.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        master.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

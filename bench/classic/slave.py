"""The tutorial's slave: connect, get one job, run it, put it on the finished queue.

Ported to Python 3. Unlike the tutorial's, an empty queue is not fatal (the original
died on ``Queue.Empty`` after a second without work), and a master that goes away
ends the slave quietly.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
from multiprocessing.managers import BaseManager


class JobManager(BaseManager):
    pass


class Slave:
    def __init__(self, address: tuple[str, int] = ("127.0.0.1", 8888),
                 authkey: bytes = b"jobs", verbose: bool = True) -> None:  # fmt: skip
        self.address = address
        self.authkey = authkey
        self.verbose = verbose

    def start(self) -> None:
        JobManager.register("get_dispatched_job_queue")
        JobManager.register("get_finished_job_queue")
        print(f"Connect to server {self.address[0]}...", flush=True)
        manager = JobManager(address=self.address, authkey=self.authkey)
        manager.connect()
        dispatched_jobs = manager.get_dispatched_job_queue()  # type: ignore[attr-defined]
        finished_jobs = manager.get_finished_job_queue()  # type: ignore[attr-defined]
        while True:
            try:
                job = dispatched_jobs.get(timeout=1)
            except queue.Empty:
                continue
            if self.verbose:
                print(f"Run job: {job.job_id}", flush=True)
            job.run()
            finished_jobs.put(job)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.classic.slave")
    p.add_argument("--master", default="127.0.0.1:8888", help="host:port of the master")
    p.add_argument("--quiet", action="store_true", help="no line per job")
    args = p.parse_args(argv)
    host, _, port = args.master.rpartition(":")
    key = os.environ.get("CLASSIC_AUTHKEY", "jobs").encode()
    try:
        Slave((host, int(port)), key, verbose=not args.quiet).start()
    except (EOFError, ConnectionError, KeyboardInterrupt):
        return 0  # the master went away (or Ctrl-C): the classic design's only way out
    return 0


if __name__ == "__main__":
    sys.exit(main())

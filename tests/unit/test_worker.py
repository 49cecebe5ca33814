"""The slave's bookkeeping (scheduler/worker.py) without a master: what it says it holds."""

from __future__ import annotations

import threading

from scheduler import settings
from scheduler.protocol import Lease
from scheduler.worker import Worker


def worker(concurrency: int = 1) -> Worker:
    cfg = settings.load({"SCHEDULER_AUTHKEY": "k" * 32, "SCHEDULER_MASTER": "127.0.0.1:9"},
                        concurrency=concurrency, worker_name="w")  # fmt: skip
    return Worker(cfg, threading.Event())


def lease(job_id: int) -> Lease:
    return Lease(job_id, 100 + job_id, "shell", (["true"], False), None)


def test_a_job_taken_by_a_slot_is_held_at_every_moment():
    """Taken off the queue and entered as running in one step: a heartbeat in between
    would show the master a slave without the job, taken for lost in transit."""
    w = worker()
    with w._cond:
        w._queue.extend([lease(1), lease(2)])
        w._fetched = 1
    taken = w._take(w._slots[0])
    assert taken is not None
    batch, _, _ = taken
    held = w.holding()
    for job in [*batch, lease(2)]:
        assert (job.job_id, job.lease) in held.held
    assert {job.job_id for job in batch}.isdisjoint(held.waiting)  # started, not waiting

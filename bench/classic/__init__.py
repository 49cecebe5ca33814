"""The classic design, ported from the Python 2 tutorial to Python 3 as the reference.

A master registers two queues (dispatched jobs, finished jobs) on a ``BaseManager``
bound to a TCP port with an authkey; slaves connect, ``get()`` one job, run it and
``put()`` it back: one network round trip per job each way. Nothing else: no states,
no retries, no persistence. ``python -m bench.classic.master`` and
``python -m bench.classic.slave`` run it by hand, as the tutorial does.
"""

from __future__ import annotations

from .job import Job
from .master import Master

__all__ = ["Job", "Master"]

"""``python -m bench.chain``: what a dependency costs. 1,000 no-op jobs, each after the one
before it, against 1,000 sequential ``apply_async().get()`` calls (the same hand-off with the
client in the loop), one master and 1 slave x 1 process, journal on, loopback."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from .ours import Cluster
from .procs import Procs
from .workloads import noop

LINKS = 1000


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
        env.update(SCHEDULER_AUTHKEY=secrets.token_urlsafe(24), SCHEDULER_HTTP="")
        procs = Procs(Path(tmp), env)
        cluster = Cluster(procs, Path(tmp))
        try:
            client = cluster.start_master()
            cluster.start_slaves(1, 1)
            cluster.warm_up(100)
            started = time.perf_counter()
            last = None
            for i in range(LINKS):  # submitted at once; each waits for the one before
                last = client.apply_async(noop, (i,), after=[last] if last else None)
            client.flush()
            submitted = time.perf_counter() - started
            assert last is not None and last.get(120) == LINKS - 1
            chained = time.perf_counter() - started
            started = time.perf_counter()
            for i in range(LINKS):
                client.apply_async(noop, (i,)).get(60)
            sequential = time.perf_counter() - started
        finally:
            cluster.stop()
            procs.close()
    print(f"{LINKS:,} no-op jobs, 1 slave x 1 process, load {os.getloadavg()[0]:.1f}")
    rows = (("chained by after=, submitted at once (ms a link)", chained),
            ("one after another, apply_async().get() (ms a job)", sequential))
    for name, seconds in rows:
        print(f"  {name:<52} {seconds / LINKS * 1e3:7.3f}")
    print(f"  (submitting the chain took {submitted:.2f} s: each job needs the id of the one "
          "before it, so each is sent on its own)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

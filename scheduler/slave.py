"""``python -m scheduler.slave``: a slave process (wiring, signals, logging)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading

from . import entry, settings
from .tls import TLSRefused
from .worker import Worker

log = logging.getLogger("scheduler.slave")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scheduler slave", description="Run a slave.")
    p.add_argument("--master", help="host:port of the master (SCHEDULER_MASTER)")
    p.add_argument("--concurrency", type=int,
                   help="jobs run at once (SCHEDULER_CONCURRENCY, default: the CPU count)")
    p.add_argument("--name", help="worker name in status and logs (SCHEDULER_WORKER_NAME)")
    p.add_argument("--grace-seconds", type=float,
                   help="how long a drain (SIGTERM) lets running jobs finish "
                        "(SCHEDULER_GRACE_SECONDS, default 60); a second SIGTERM ends it")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body(stop: threading.Event) -> int:
        master = settings.parse_address(args.master, "--master") if args.master else None
        if args.concurrency is not None and args.concurrency < 1:
            raise settings.ConfigError("--concurrency: must be >= 1")
        cfg = settings.load(
            master=master, concurrency=args.concurrency, worker_name=args.name,
            grace_seconds=args.grace_seconds,
        )  # fmt: skip
        worker = Worker(cfg, stop)
        refused: list[TLSRefused] = []

        def stop_refused(exc: TLSRefused) -> None:
            """Our certificate was revoked (or expired) while we ran: no call will ever pass
            again. Stop now, jobs and all (the master gives them to others), and exit 3."""
            if refused:
                return
            refused.append(exc)
            log.error("slave %s stops: %s", worker.name, exc)
            worker.settings = dataclasses.replace(worker.settings, grace_seconds=0.0)
            stop.set()

        worker.link.on_refused = stop_refused
        code = worker.run()
        return 3 if refused else code  # 3: as for a key the master refuses at start

    return entry.serve(body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m scheduler.master``: the master process (wiring, signals, logging)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

from . import entry, metrics, settings, transport
from .board import RECONNECT_SECONDS, Board
from .errors import SchedulerError
from .job import State
from .journal import LEASE_BLOCK, Journal
from .progress import Progress
from .service import Service

if TYPE_CHECKING:
    from .web import WebServer

log = logging.getLogger("scheduler.master")
TICK = 0.1
CUT_SECONDS = 2.0  # how often open connections are checked against the revocation list
# The master makes and drops job records by the ten thousand. At the collector's default
# (a pass each 700 objects more than freed) it went over a burst's records again and again:
# 1.1-1.8 us of the master's 13-14 per job. Now fewer passes, of a few ms each.
GC_THRESHOLDS = (10_000, 10, 10)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scheduler master", description="Run the master.")
    p.add_argument("--bind", help="host:port to listen on (SCHEDULER_BIND, default 127.0.0.1:8888)")
    p.add_argument("--state-dir", help="journal directory (SCHEDULER_STATE_DIR)")
    p.add_argument("--lease-seconds", type=float,
                   help="silence after which a slave counts as dead (SCHEDULER_LEASE_SECONDS, "
                        "default 6)")  # fmt: skip
    p.add_argument("--max-attempts", type=int, help="SCHEDULER_MAX_ATTEMPTS (default 3)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(cfg: settings.Settings, stop: threading.Event) -> int:
    gc.set_threshold(*GC_THRESHOLDS)
    journal = Journal(cfg.state_dir)
    # memory holds no more finished jobs than the journal keeps (what `jobs` shows stays there)
    keep = min(cfg.keep_finished, cfg.retain_count or cfg.keep_finished)
    jobs, funcs, stored = journal.load(keep)
    # lease numbers above any an earlier master may have used, reserved before use
    ceiling = stored.max_lease + LEASE_BLOCK
    journal.wait(journal.append([], meta={"lease_ceiling": ceiling}))
    board = Board(lease_seconds=cfg.lease_seconds, max_attempts=cfg.max_attempts,
                  first_lease=stored.max_lease + 1, lease_ceiling=ceiling,
                  retries=cfg.retries, retry_backoff=cfg.retry_backoff)  # fmt: skip
    running = board.restore(jobs, stored)
    progress = Progress(time.time, cfg.progress_seconds)
    counted = _metrics(cfg)
    service = Service(board, journal, funcs, progress, keep_finished=keep,
                      heartbeat_seconds=cfg.heartbeat_seconds, metrics=counted,
                      crash=lambda: _crash_and_restart(str(host), int(port)))  # fmt: skip
    try:
        server = transport.serve(service, cfg.bind, cfg.authkey.reveal())
    except SchedulerError:
        journal.close()
        raise
    threading.Thread(target=server.serve_forever, name="manager", daemon=True).start()
    host, port = server.address  # type: ignore[misc,str-unpack]
    log.info("master listening on %s:%d; journal %s (%d jobs, %d running on slaves that "
             "have %.0fs to come back)", host, port, journal.path, stored.total, running,
             cfg.lease_seconds + RECONNECT_SECONDS)  # fmt: skip
    if server.tls is not None:
        crl = server.tls.config.crl
        log.info("TLS on: every connection is mutual TLS 1.3 with a certificate of the CA %s; "
                 "revocation list %s", server.tls.config.ca,
                 f"{crl} (re-read when it changes)" if crl else "none")  # fmt: skip
    web = _serve_http(cfg.http, service, journal, counted)
    _start_retention(cfg, service)
    next_cut = time.monotonic() + CUT_SECONDS
    while not stop.wait(TICK):
        service.tick()
        server.flush()
        if time.monotonic() >= next_cut:
            next_cut = time.monotonic() + CUT_SECONDS
            _cut_revoked(server)
    server.flush(force=True)
    log.info("master stopping: refusing new work, flushing the journal")
    if web is not None:
        web.close()
    service.close()
    journal.close()
    log.info("master stopped")
    return 0


def _start_retention(cfg: settings.Settings, service: Service) -> None:
    service.start_retention(cfg.retain, cfg.retain_count)
    if cfg.retain is None and cfg.retain_count is None:
        log.info("retention off: finished jobs stay in the journal (SCHEDULER_RETAIN=off, "
                 "no SCHEDULER_RETAIN_COUNT)")  # fmt: skip
        return
    rules = [] if cfg.retain is None else [f"after {settings.format_duration(cfg.retain)}"]
    rules += [] if cfg.retain_count is None else [f"beyond the newest {cfg.retain_count}"]
    log.info("retention: finished jobs leave the journal %s", " or ".join(rules))


def _cut_revoked(server: transport._Server) -> None:
    """Cut the connections of peers whose certificates were revoked since they connected
    (an unreadable revocation list keeps the last good one, and says so once)."""
    cut = server.cut_revoked()
    if cut:
        counts = Counter(cut)
        log.warning("cut %d connection(s) of revoked certificate(s): %s", len(cut),
                    ", ".join(f"{role} {name!r} ({n})"
                              for (name, role), n in sorted(counts.items())))  # fmt: skip


def _metrics(cfg: settings.Settings) -> metrics.NoMetrics:
    """Counting costs a little per job: only when something serves the numbers."""
    if cfg.http is None:
        return metrics.NoMetrics()
    try:
        return metrics.Metrics()
    except ImportError:
        log.error("dashboard and /metrics off: prometheus_client is not installed "
                  "(pip install prometheus_client), or set SCHEDULER_HTTP to nothing")  # fmt: skip
        return metrics.NoMetrics()


def _serve_http(address: tuple[str, int] | None, service: Service, journal: Journal,
                counted: metrics.NoMetrics) -> WebServer | None:  # fmt: skip
    """The dashboard and /metrics on ``address``; None if off or the port is taken."""
    if address is None or not isinstance(counted, metrics.Metrics):
        return None
    from .web import Api, loopback_only, start

    counted.watch(service.snapshot)
    counted.seed_failures(service.recent(State.FAILED, metrics.KEEP_FAILURES))
    journal.on_commit = counted.journal_committed
    loopback = loopback_only(address[0])
    try:
        api = Api(service, counted, loopback=loopback)
    except OSError as exc:  # the page's files missing from an install: no page, still a master
        log.error("dashboard and /metrics off: cannot read the dashboard's files (%s); "
                  "reinstall scheduler-kit", exc)  # fmt: skip
        return None
    served = start(address, api)
    if served is not None:
        log.info("dashboard on %s (Prometheus metrics at %smetrics)", served.url, served.url)
        if not loopback:
            log.warning("dashboard bound to %s: whoever reaches that port reads every job's "
                        "command and output (no login); prefer loopback and an SSH tunnel",
                        address[0])  # fmt: skip
    return served


def _crash_and_restart(host: str, port: int) -> None:
    """For `scheduler verify`: replace this process with a fresh master at once, without
    a clean stop (nothing flushed, nothing said goodbye to), as kill -9 and a restart would.
    """
    time.sleep(0.2)  # let the reply to the chaos call go out
    argv = list(sys.orig_argv)
    for i, arg in enumerate(argv):  # listen where we listened, even if we were given port 0
        if arg == "--bind" and i + 1 < len(argv):
            argv[i + 1] = f"{host}:{port}"
        elif arg.startswith("--bind="):
            argv[i] = f"--bind={host}:{port}"
    os.environ["SCHEDULER_BIND"] = f"{host}:{port}"
    os.execv(sys.executable, argv)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body(stop: threading.Event) -> int:
        bind = settings.parse_address(args.bind, "--bind") if args.bind else None
        cfg = settings.load(
            bind=bind, state_dir=args.state_dir, lease_seconds=args.lease_seconds,
            max_attempts=args.max_attempts,
        )  # fmt: skip
        return run(cfg, stop)

    return entry.serve(body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())

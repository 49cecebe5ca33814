"""The ``scheduler`` command: run a master or slave, submit and follow jobs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from . import jobsfile, master, slave, verify
from .client import Client
from .errors import JobFailed, SchedulerError
from .job import State
from .settings import load

STATES = [str(s) for s in State]


def _client(args: argparse.Namespace) -> Client:
    return Client(master=args.master)


def cmd_submit(args: argparse.Namespace) -> int:
    if args.file:
        commands: list[Any] = jobsfile.read(args.file)
        use_shell = True
    elif args.command:
        commands, use_shell = [args.shell and " ".join(args.command) or args.command], args.shell
    else:
        raise SchedulerError("nothing to submit; give `-- CMD ARGS...` or `--file FILE`")
    with _client(args) as client:
        handles = [
            client.submit_shell(cmd, shell=use_shell, name=args.name, timeout=args.timeout)
            for cmd in commands
        ]
        client.flush()
        for handle in handles:
            print(handle.id)
        if not args.wait:
            return 0
        failed = 0
        for handle in handles:
            try:
                handle.get()
            except JobFailed as exc:
                failed += 1
                print(exc, file=sys.stderr)
        print(f"{len(handles) - failed} succeeded, {failed} failed", file=sys.stderr)
        return 1 if failed else 0


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S") if ts else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.limit is not None:
            jobs = client.jobs(state=args.state, limit=args.limit)
        else:
            jobs = list(client.iter_jobs(state=args.state))
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    print(f"{'ID':>7}  {'STATE':<10} {'TRIES':>5}  {'WORKER':<20} {'ENDED':>8}  COMMAND")
    for j in jobs:
        label = f"{j['name']}: {j['command']}" if j["name"] else j["command"]
        print(f"{j['id']:>7}  {j['state']:<10} {j['attempts']:>5}  {(j['worker'] or '-'):<20} "
              f"{_when(j['ended']):>8}  {label[:60]}")  # fmt: skip
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    counts = status["counts"]
    print("jobs: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATES))
    print(f"slaves: {len(status['workers'])}")
    now = time.time()
    for w in status["workers"]:
        running = ",".join(map(str, w["running"][:10])) or "-"
        more = f" (+{len(w['running']) - 10})" if len(w["running"]) > 10 else ""
        flag = " draining" if w["draining"] else ""
        beat = now - w["last_heartbeat"]
        print(
            f"  {w['name']:<24} {w['concurrency']:>3} procs  heartbeat {beat:.1f}s ago"
            f"{flag}  running {running}{more}"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for job_id in args.ids:
            info = client.cancel(job_id)
            print(f"job {job_id}: {info['state']}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.wait(args.ids or None, timeout=args.timeout)
    failed = [j for j in jobs if j["state"] != State.SUCCEEDED]
    for j in failed:
        print(f"job {j['id']} {j['state']}: {j['error']}", file=sys.stderr)
    print(f"{len(jobs) - len(failed)} succeeded, {len(failed)} not", file=sys.stderr)
    return 1 if failed else 0


def cmd_ping(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.ping()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        report = verify.run(client, jobs=args.jobs, seconds=args.seconds, kill=not args.no_kill,
                            restart_master=args.restart_master)  # fmt: skip
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "ok": report.ok}, indent=2))
    else:
        report.print(sys.stdout)
    return 0 if report.ok else 1


def cmd_slave_health(args: argparse.Namespace) -> int:
    cfg = load(authkey="x" * 16)  # health needs no key
    try:
        age = time.time() - os.stat(cfg.health_file).st_mtime
    except OSError:
        raise SchedulerError(f"slave not connected yet ({cfg.health_file} missing)") from None
    limit = max(cfg.lease_seconds, 3 * (cfg.heartbeat_seconds or cfg.lease_seconds / 3))
    if age > limit:
        raise SchedulerError(f"slave has not heard from the master for {age:.0f}s")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scheduler", description=__doc__)
    p.add_argument("--master", help="host:port of the master (SCHEDULER_MASTER)")
    sub = p.add_subparsers(dest="command_name", metavar="COMMAND")
    sub.add_parser("master", help="run the master", add_help=False)
    sub.add_parser("slave", help="run a slave", add_help=False)

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(func=func)
        # accepted after the command too: `scheduler jobs --master host:port`
        sp.add_argument("--master", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    s = add("submit", cmd_submit, "submit shell commands")
    s.add_argument("--wait", action="store_true", help="wait; exit 1 if any job failed")
    s.add_argument("--file", help="one shell command per line")
    s.add_argument("--shell", action="store_true", help="run CMD through /bin/sh")
    s.add_argument("--name", help="job name")
    s.add_argument("--timeout", type=float, help="seconds before the job is killed")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    j = add("jobs", cmd_jobs, "list jobs")
    j.add_argument("--state", choices=STATES)
    j.add_argument("--limit", type=int)
    j.add_argument("--json", action="store_true")
    st = add("status", cmd_status, "job counts and slaves")
    st.add_argument("--json", action="store_true")
    c = add("cancel", cmd_cancel, "cancel jobs")
    c.add_argument("ids", type=int, nargs="+")
    w = add("wait", cmd_wait, "wait for jobs (default: all unfinished); exit 1 if any failed")
    w.add_argument("ids", type=int, nargs="*")
    w.add_argument("--timeout", type=float)
    v = add("verify", cmd_verify, "chaos check: kill a slave mid-batch, account for every job")
    v.add_argument("--jobs", type=int, help="how many jobs (default: twice the slots, >= 8)")
    v.add_argument("--seconds", type=float, help="how long each runs (default: 2 x the lease)")
    v.add_argument("--restart-master", action="store_true",
                   help="also crash the master mid-batch (it restarts itself from its journal)")
    v.add_argument("--no-kill", action="store_true", help="kill no slave")
    v.add_argument("--json", action="store_true")
    add("ping", cmd_ping, "exit 0 if the master answers with our key")
    add("slave-health", cmd_slave_health, "exit 0 if this host's slave heartbeats")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("master", "slave"):
        return {"master": master.main, "slave": slave.main}[argv[0]](argv[1:])
    args = parser().parse_args(argv)
    if not hasattr(args, "func"):
        parser().print_help()
        return 2
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        return args.func(args)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 124
    except SchedulerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The scheduler command: run a master or a slave, submit jobs and follow them."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from . import __version__, certs, jobsfile, master, slave, verify
from .client import AsyncResult, Client
from .errors import SchedulerError
from .job import State, parse_array, parse_labels
from .journal import backup
from .settings import load, parse_duration

STATES = [str(s) for s in State]
SHOWN_FAILURES = 5  # `submit --wait` tells this many failures in full, then counts
DEFAULT_LIMIT = 20
EPILOG = (
    "The master's address comes from --master (before or after the command), else "
    "SCHEDULER_MASTER, else 127.0.0.1:8888; the key from SCHEDULER_AUTHKEY or "
    "SCHEDULER_AUTHKEY_FILE."
)


def _client(args: argparse.Namespace) -> Client:
    return Client(master=args.master)


def _tail(text: str | None, lines: int = 10) -> str:
    body = (text or "").rstrip("\n").splitlines()
    return "\n".join(("  " + line) for line in body[-lines:])


# -- submitting -------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    if args.file:
        commands: list[Any] = jobsfile.read(args.file)
        use_shell = True
    elif args.command:
        commands, use_shell = [args.shell and " ".join(args.command) or args.command], args.shell
    else:
        raise SchedulerError("nothing to submit; give `-- CMD ARGS...` or `--file FILE`")
    env = _env_pairs(args.env)
    if args.array and len(commands) != 1:
        raise SchedulerError("--array runs one command per index: give it after --, "
                             "with {} where the index goes (not --file)")  # fmt: skip
    placed = {"priority": args.priority, "requires": args.requires}
    with _client(args) as client:
        if args.array:
            indices, cap = args.array
            handles = client.submit_array(
                commands[0], indices, max_running=cap, shell=use_shell, name=args.name,
                timeout=args.timeout, cwd=args.cwd, env=env, retries=args.retries,
                retry_backoff=args.retry_backoff, after=args.after, **placed,
            )  # fmt: skip
            print(f"array {handles[0].id}: {len(handles)} tasks, jobs {handles[0].id}.."
                  f"{handles[-1].id}" + (f", at most {cap} at once" if cap else ""),
                  file=sys.stderr)  # fmt: skip
        else:
            handles = [
                client.submit_shell(cmd, shell=use_shell, name=args.name, timeout=args.timeout,
                                    cwd=args.cwd, env=env, retries=args.retries,
                                    retry_backoff=args.retry_backoff, after=args.after,
                                    **placed)  # fmt: skip
                for cmd in commands
            ]
        client.flush()
        for handle in handles:
            print(handle.id, flush=True)
        return _report(client, handles) if args.wait else 0


def _env_pairs(pairs: Iterable[str] | None) -> dict[str, str] | None:
    env = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SchedulerError(f"--env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env or None


def _report(client: Client, handles: list[AsyncResult]) -> int:
    """Wait for every job; show what each printed, and why the failed ones failed."""
    failed = []
    for handle in handles:
        handle.wait()
        info = client.job(handle.id)
        if info["state"] == State.SUCCEEDED:
            if info["stdout"] and len(handles) <= SHOWN_FAILURES:
                print(f"job {info['id']} succeeded; stdout:\n{_tail(info['stdout'])}")
            continue
        failed.append(info)
        if len(failed) <= SHOWN_FAILURES:
            print(_failure(info), file=sys.stderr)
    if len(failed) > SHOWN_FAILURES:
        rest = [str(j["id"]) for j in failed[SHOWN_FAILURES:]]
        print(f"... and {len(rest)} more failed (jobs {', '.join(rest[:20])}"
              f"{', ...' if len(rest) > 20 else ''}); see `scheduler job ID`", file=sys.stderr)
    ok = len(handles) - len(failed)
    print(f"{ok} succeeded, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


def _failure(info: dict) -> str:
    reason = (info["error"] or "").strip().splitlines()[-1:] or ["(no reason given)"]
    lines = [f"job {info['id']} {info['state']}: {reason[0]}"]
    if info.get("stderr"):
        lines.append(f"stderr:\n{_tail(info['stderr'])}")
    return "\n".join(lines)


# -- looking -----------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S") if ts else "-"


def _took(job: dict, now: float) -> str:
    if job["started"] is None:
        return "-"
    seconds = (job["ended"] or now) - job["started"]
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _id_list(text: str) -> list[int]:
    """``12,13`` -> [12, 13], for argparse (its error says what was wrong)."""
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected job ids like 12,13, got {text!r}") from None
    if not ids or min(ids) < 1:
        raise argparse.ArgumentTypeError(f"expected job ids like 12,13, got {text!r}")
    return ids


def _array_spec(text: str) -> tuple[list[int], int | None]:
    try:
        return parse_array(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _labels_arg(text: str) -> dict[str, str]:
    try:
        labels = parse_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not labels:
        raise argparse.ArgumentTypeError("expected labels like gpu=1,zone=a")
    return labels


def cmd_job(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.job(args.id)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    now = time.time()
    rows = [
        ("job", f"{info['id']}" + (f" ({info['name']})" if info["name"] else "")),
        ("state", info["state"]),
        ("command", info["command"]),
        ("attempts", f"{info['attempts']} of {info['max_attempts']}"),
        ("retries", f"{info.get('failures', 0)} of {info.get('retries', 0)} used"),
        ("worker", info["worker"] or "-"),
        ("submitted", _when(info["submitted"])),
        ("started", _when(info["started"])),
        ("ended", _when(info["ended"])),
        ("took" if info["ended"] else "running for", _took(info, now)),
        ("exit code", "-" if info["exit_code"] is None else str(info["exit_code"])),
        ("error", (info["error"] or "-").rstrip()),
    ]
    if info.get("reason"):
        rows.insert(2, ("waiting", info["reason"]))
    if info.get("priority"):
        rows.insert(3, ("priority", str(info["priority"])))
    if info.get("requires"):
        rows.insert(3, ("requires", ",".join(f"{k}={v}" for k, v in info["requires"].items())))
    if info.get("array") is not None:
        cap = f", at most {info['max_running']} at once" if info.get("max_running") else ""
        rows.insert(3, ("array", f"{info['array']}, index {info['array_index']}{cap}"))
    for key, value in rows:
        print(f"{key:<12} {value}")
    for n, run in enumerate(info.get("history") or (), 1):  # the failed runs tried again
        reason = (run["error"] or "").strip().splitlines()[-1:] or ["-"]
        print(f"{'failed run ' + str(n):<12} {run['worker']}, {_when(run['started'])}, exit "
              f"{'-' if run['exit_code'] is None else run['exit_code']}: {reason[0][:80]}")
    for stream in ("stdout", "stderr"):
        if info[stream]:
            print(f"{stream}:\n{_tail(info[stream], 40)}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        counts: dict[str, int] = {}
        if args.array is not None:
            jobs = client.jobs(state=args.state, limit=None, array=args.array)
            while args.all and len(jobs) % 1000 == 0 and jobs:  # the next page
                more = client.jobs(state=args.state, limit=None, before=jobs[-1]["id"],
                                   array=args.array)  # fmt: skip
                if not more:
                    break
                jobs += more
        elif args.all:
            jobs = list(client.iter_jobs(state=args.state))
        else:
            jobs = client.jobs(state=args.state, limit=args.limit)
            counts = client.status()["counts"]
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    now = time.time()
    print(f"{'ID':>7}  {'STATE':<10} {'TRIES':>5}  {'WORKER':<20} {'STARTED':>8} {'TOOK':>7}  "
          "COMMAND")  # fmt: skip
    for j in jobs:
        label = f"{j['name']}: {j['command']}" if j["name"] else j["command"]
        if "tasks" in j:  # an array, as one line: its tasks by state
            shown = ", ".join(f"{j['counts'][s]} {s}" for s in STATES if j["counts"].get(s))
            cap = f", at most {j['max_running']} at once" if j.get("max_running") else ""
            print(f"{j['id']:>7}  {'array':<10} {'':>5}  {j['tasks']:,} tasks: {shown}{cap}"
                  f" (--array {j['id']})")  # fmt: skip
            print(f"{'':>7}  {'':<10} {'':>5}  {label[:60]}")
            continue
        print(f"{j['id']:>7}  {j['state']:<10} {j['attempts']:>5}  {(j['worker'] or '-'):<20} "
              f"{_when(j['started']):>8} {_took(j, now):>7}  {label[:60]}")  # fmt: skip
        if j.get("reason"):  # a queued job: why it waits, as Slurm's REASON column
            print(f"{'':>7}  waiting: {j['reason']}")
    matching = counts.get(args.state, 0) if args.state else sum(counts.values())
    listed = sum(j.get("tasks", 1) for j in jobs)  # an array's line stands for its tasks
    if matching > listed:
        print(f"... {matching - listed} more (newest first; --limit N, --all, --json)",
              file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    counts = status["counts"]
    print("jobs: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATES))
    if status.get("journal_error"):
        print(f"journal: cannot write ({status['journal_error']})")
    print(f"slaves: {len(status['workers'])}")
    now = time.time()
    for w in status["workers"]:
        running = ",".join(map(str, w["running"][:10])) or "-"
        more = f" (+{len(w['running']) - 10})" if len(w["running"]) > 10 else ""
        flag = " draining" if w["draining"] else ""
        flag += "" if w.get("connected", True) else " not back since the master restarted"
        if w.get("labels"):
            flag += " [" + ",".join(f"{k}={v}" for k, v in sorted(w["labels"].items())) + "]"
        beat = now - w["last_heartbeat"]
        print(f"  {w['name']:<24} {w['concurrency']:>3} procs  heartbeat {beat:.1f}s ago"
              f"{flag}  running {running}{more}")  # fmt: skip
    return 0


# -- changing ------------------------------------------------------------------------------


def cmd_cancel(args: argparse.Namespace) -> int:
    untouched = 0
    with _client(args) as client:
        for job_id in args.ids:
            before = client.job(job_id)["state"]
            if State(before).terminal:
                print(f"job {job_id}: already {before}; nothing cancelled", file=sys.stderr)
                untouched += 1
                continue
            print(f"job {job_id}: {client.cancel(job_id)['state']}")
    return 1 if untouched else 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.wait(args.ids or None, timeout=args.timeout)
    failed = [j for j in jobs if j["state"] != State.SUCCEEDED]
    for j in failed[:SHOWN_FAILURES]:
        print(_failure(j), file=sys.stderr)
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


def cmd_top(args: argparse.Namespace) -> int:
    top = importlib.import_module("scheduler.top")  # it needs rich, not in the images

    with _client(args) as client:
        return int(top.run(client, interval=args.interval, once=args.once))


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


# -- the journal ----------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> int:
    older = None if args.older_than is None else parse_duration(args.older_than, "--older-than")
    if args.keep is not None and not args.keep.isdigit():
        raise SchedulerError(f"--keep: expected a whole number >= 0, got {args.keep!r}")
    keep = None if args.keep is None else int(args.keep)
    with _client(args) as client:
        try:  # the client has no method of its own for it (verify calls its link the same way)
            done = client.prune(older, keep)
        except AttributeError:  # not in the master's EXPOSED list
            host, port = client.address
            raise SchedulerError(f"the master at {host}:{port} cannot prune (an older "
                                 "version); upgrade it") from None  # fmt: skip
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    why = done["rules"] or "no rule given, and the master's retention is off"
    print(f"{done['jobs']} job(s) left the journal ({why}); {done['funcs']} function body(ies), "
          f"{done['marks']} verify mark(s); {done['freed_bytes'] / 1e6:.1f} MB free for reuse, "
          f"journal {done['journal_bytes'] / 1e6:.1f} MB")  # fmt: skip
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or load(authkey="x" * 16).state_dir  # a file copy needs no key
    source, jobs, size = backup(state_dir, args.file, force=args.force)
    print(f"{args.file}: a consistent copy of {source} ({jobs} jobs, {size / 1e6:.1f} MB); "
          "a master starts from it as journal.sqlite3 in its SCHEDULER_STATE_DIR")  # fmt: skip
    return 0


# -- certificates --------------------------------------------------------------------------


def cmd_certs(args: argparse.Namespace) -> int:
    """Run a `certs` action; its refusals (no CA, unknown name, a loose key...) exit 1."""
    try:
        return int(args.certs_func(args))
    except SchedulerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_certs_init(args: argparse.Namespace) -> int:
    path = certs.init(args.dir)
    print(f"{path}: cluster CA; keep {certs.CA_KEY_FILE} on the machine that issues")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    path = certs.issue(args.dir, args.name, args.role, days=args.days, addresses=args.address)
    print(f"{path}: {args.name} ({args.role}), valid {args.days} days")
    return 0


def cmd_certs_revoke(args: argparse.Namespace) -> int:
    serials = certs.revoke(args.dir, args.name)
    if not serials:
        print(f"{args.name}: already revoked")
        return 0
    print(f"{args.name}: {len(serials)} certificate(s) revoked; copy {certs.CRL_FILE} to the "
          "master (it reads the new list without a restart)")  # fmt: skip
    return 0


def cmd_certs_list(args: argparse.Namespace) -> int:
    print(f"{'NAME':<24} {'ROLE':<7} {'EXPIRES':<17} STATUS")
    for cert in certs.list_certs(args.dir):
        status = "revoked" if cert.revoked else "expired" if cert.expired() else "valid"
        print(f"{cert.name:<24} {cert.role:<7} {cert.not_after:%Y-%m-%d %H:%M}  {status}")
    return 0


def _cert_name(text: str) -> str:
    try:
        return certs.check_name(text)
    except certs.CertsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _days(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of days >= 1, got {text!r}")
    return int(text)


def _add_certs(sub: Any) -> None:
    help = "the cluster's certificates for mutual TLS: a CA, one per node, revocations"
    c = sub.add_parser("certs", help=help, description=help[:1].upper() + help[1:] + ".")
    c.set_defaults(func=cmd_certs)
    actions = c.add_subparsers(dest="certs_action", metavar="ACTION", required=True)

    def action(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        a = actions.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
        a.set_defaults(certs_func=func)
        a.add_argument("dir", metavar="DIR", help="the certificates directory")
        return a

    action("init", cmd_certs_init, "make a cluster CA and an empty revocation list in DIR")
    i = action("issue", cmd_certs_issue, "issue DIR/NAME.pem and DIR/NAME.key (0600)")
    i.add_argument("name", metavar="NAME", type=_cert_name, help="the node's name (its CN)")
    i.add_argument("--role", required=True, choices=certs.ROLES, help="what the node may do")
    i.add_argument("--days", type=_days, default=certs.NODE_DAYS,
                   help=f"how long it is valid (default {certs.NODE_DAYS})")
    i.add_argument("--address", action="append", default=[], metavar="A",
                   help="a DNS name or IP address the node is reached at (repeatable)")
    r = action("revoke", cmd_certs_revoke, "revoke every certificate issued under NAME")
    r.add_argument("name", metavar="NAME", type=_cert_name, help="the node's name")
    action("list", cmd_certs_list, "list the node certificates: name, role, expiry, status")


# -- parsing -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scheduler", description=__doc__, epilog=EPILOG)
    p.add_argument("--master", help="host:port of the master (SCHEDULER_MASTER)")
    p.add_argument("--version", action="version", version=f"scheduler {__version__}")
    sub = p.add_subparsers(dest="command_name", metavar="COMMAND")
    sub.add_parser("master", help="run the master (see: scheduler master --help)", add_help=False)
    sub.add_parser("slave", help="run a slave (see: scheduler slave --help)", add_help=False)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        sp = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                            epilog=EPILOG)  # fmt: skip
        sp.set_defaults(func=func)
        # accepted after the command too: `scheduler jobs --master host:port`
        sp.add_argument("--master", default=argparse.SUPPRESS,
                        help="host:port of the master (SCHEDULER_MASTER)")  # fmt: skip
        return sp

    s = add("submit", cmd_submit, "submit shell commands")
    s.add_argument("--wait", action="store_true",
                   help="wait for the jobs, show their output; exit 1 if any failed")
    s.add_argument("--file", help="a jobs file: one shell command per line, # for comments")
    s.add_argument("--shell", action="store_true", help="run CMD through /bin/sh")
    s.add_argument("--name", help="a name for the job(s), shown in logs and listings")
    s.add_argument("--timeout", type=float, help="seconds before the job is killed")
    s.add_argument("--retries", type=int, metavar="N",
                   help="run a failed job again, up to N times (default: the master's)")
    s.add_argument("--after", type=_id_list, metavar="ID,ID",
                   help="run once these jobs succeeded (cancelled if one fails)")
    s.add_argument("--retry-backoff", type=float, metavar="SECONDS",
                   help="wait before the first retry, doubled each time (default: the master's)")
    s.add_argument("--cwd", help="directory to run in, on the slave (default: the slave's)")
    s.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="add a variable to the job's environment (repeatable)")
    s.add_argument("--priority", type=int, metavar="N",
                   help="higher runs first (default 0; may be negative)")
    s.add_argument("--requires", type=_labels_arg, metavar="KEY=VALUE,...",
                   help="run only on slaves with these labels (SCHEDULER_WORKER_LABELS)")
    s.add_argument("--array", type=_array_spec, metavar="SPEC",
                   help="an array: one task per index, {} in the command is the index "
                        "(also $SCHEDULER_ARRAY_INDEX); 1-1000%%50 runs 50 at most at once")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    one = add("job", cmd_job, "show one job: state, attempts, times, error, output")
    one.add_argument("id", type=int, help="the job id")
    one.add_argument("--json", action="store_true", help="print it as JSON")
    j = add("jobs", cmd_jobs, "list jobs, newest first")
    j.add_argument("--state", choices=STATES, help="only jobs in this state")
    j.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"show this many (default {DEFAULT_LIMIT}, at most 1000)")
    j.add_argument("--all", action="store_true", help="show every job, a page at a time")
    j.add_argument("--json", action="store_true", help="print them as JSON")
    j.add_argument("--array", type=int, metavar="ID", help="the tasks of this array")
    st = add("status", cmd_status, "job counts and slaves")
    st.add_argument("--json", action="store_true", help="print it as JSON")
    c = add("cancel", cmd_cancel, "cancel jobs; exit 1 if one had already finished")
    c.add_argument("ids", type=int, nargs="+", help="job ids")
    w = add("wait", cmd_wait, "wait for jobs (default: all unfinished); exit 1 if any failed")
    w.add_argument("ids", type=int, nargs="*", help="job ids (default: every unfinished job)")
    w.add_argument("--timeout", type=float, help="give up after this many seconds (exit 124)")
    v = add("verify", cmd_verify, "chaos check: kill a slave mid-batch, account for every job")
    v.add_argument("--jobs", type=int, help="how many jobs (default: twice the slots, >= 8)")
    v.add_argument("--seconds", type=float, help="how long each runs (default: 2 x the lease)")
    v.add_argument("--restart-master", action="store_true",
                   help="also crash the master mid-batch (it restarts itself from its journal)")
    v.add_argument("--no-kill", action="store_true", help="kill no slave")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    t = add("top", cmd_top, "a live view of counts, rate and slaves (Ctrl-C to leave)")
    t.add_argument("--once", action="store_true", help="draw once and exit")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    pr = add("prune", cmd_prune, "remove finished jobs from the master's journal now")
    pr.add_argument("--older-than", metavar="DURATION",
                    help="jobs that ended longer ago than this (7d, 12h, 30m, seconds; 0: all)")
    pr.add_argument("--keep", metavar="N", help="keep only the newest N finished jobs")
    pr.add_argument("--json", action="store_true", help="print the counts as JSON")
    pr.epilog = ("Without --older-than or --keep, the master's SCHEDULER_RETAIN and "
                 "SCHEDULER_RETAIN_COUNT. Queued and running jobs are never removed. " + EPILOG)
    b = sub.add_parser("backup", help="copy the journal consistently while the master runs",
                       description="Copy the master's journal with SQLite's online backup, "
                       "on the master's machine; the master may be running.")  # fmt: skip
    b.set_defaults(func=cmd_backup)
    b.add_argument("file", metavar="FILE", help="where to write the copy")
    b.add_argument("--force", action="store_true", help="replace FILE if it exists")
    b.add_argument("--state-dir", help="the master's journal directory (SCHEDULER_STATE_DIR, "
                   "default ./scheduler-state)")  # fmt: skip
    add("ping", cmd_ping, "exit 0 if the master answers with our key")
    add("slave-health", cmd_slave_health, "exit 0 if this host's slave heartbeats")
    _add_certs(sub)
    return p


def _split_globals(argv: list[str]) -> tuple[list[str], list[str]]:
    """Global options given before the command, and the rest (command first)."""
    before: list[str] = []
    while argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        takes_value = argv[0] == "--master"
        before, argv = before + argv[: 1 + takes_value], argv[1 + takes_value :]
    return before, argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    before, rest = _split_globals(argv)
    if rest and rest[0] in ("master", "slave"):
        if rest[0] == "master" and before:
            print("error: the master takes --bind, not --master", file=sys.stderr)
            return 2
        run = {"master": master.main, "slave": slave.main}[rest[0]]
        return run([*rest[1:], *before])
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
    except BrokenPipeError:  # `scheduler jobs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.faults``: jobs three times the lease, under faults, default settings.

For each fault (a slave killed with SIGKILL, a slave drained with SIGTERM, the master
killed with SIGKILL and started again at once) during a batch on 2 slaves x 2 slots:
jobs lost, jobs run twice on a healthy slave, and the time from the slave's death to
its first job running again elsewhere. Executions are counted by the jobs themselves
(``scheduler verify``'s marks, saved on the master as each run starts).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

from scheduler import settings, verify

from .ours import Cluster
from .procs import Procs

SCENARIOS = {"slave kill -9": "kill", "slave drain (SIGTERM)": "drain", "master kill -9": "master"}


def scenario(kind: str, procs: Procs, workdir: Path, jobs: int, seconds: float) -> verify.Report:
    cluster = Cluster(procs, workdir / kind)
    client = cluster.start_master(f"master-{kind}")
    cluster.start_slaves(2, 2)
    by_name = {s.name: s for s in cluster.slaves}

    def hit_slave(worker: dict) -> None:
        os.kill(by_name[worker["name"]].pid, signal.SIGTERM if kind == "drain" else signal.SIGKILL)

    def crash_master() -> None:
        assert cluster.master is not None
        os.kill(cluster.master.pid, signal.SIGKILL)
        cluster.master.popen.wait()
        state = str(workdir / kind / f"master-{kind}")
        cluster.master = procs.start(f"master-{kind}-again", ["-m", "scheduler.master"],
                                     SCHEDULER_BIND=cluster.address, SCHEDULER_STATE_DIR=state)
        cluster.master.wait_for_line("master listening on", 30)

    try:
        return verify.run(client, jobs=jobs, seconds=seconds, kill=kind != "master",
                          restart_master=kind == "master", kill_slave=hit_slave,
                          crash_master=crash_master, say=lambda line: None)  # fmt: skip
    finally:
        client.close()
        procs.close()


def table(results: dict[str, verify.Report], jobs: int, seconds: float) -> str:
    lines = [
        f"faults: {jobs} jobs of {seconds:g} s (3 x the default {settings.DEFAULT_LEASE_SECONDS:g}"
        " s lease) on 2 slaves x 2 slots, default settings",
        f"{'fault during the batch':<24}{'lost':>6}{'twice on healthy':>18}"
        f"{'ran again (killed)':>20}{'death -> running elsewhere':>28}",
    ]
    for name, r in results.items():
        moved = "-" if r.moved_after is None else f"{r.moved_after:.1f} s"
        lines.append(f"{name:<24}{len(r.lost):>6}{len(r.twice_on_healthy):>18}"
                     f"{len(r.rerun_after_kill):>20}{moved:>28}")  # fmt: skip
    lines.append(f"{'goal':<24}{0:>6}{0:>18}{'':>20}{'<= 10 s':>28}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    p.add_argument("--jobs", type=int, default=3, help="fewer than the slots: a rerun "
                   "finds a free slot, so the last column measures detection, not queueing")
    p.add_argument("--seconds", type=float, default=3 * settings.DEFAULT_LEASE_SECONDS)
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env["SCHEDULER_AUTHKEY"] = secrets.token_urlsafe(24)
    os.environ["SCHEDULER_AUTHKEY"] = env["SCHEDULER_AUTHKEY"]  # the verify jobs' probes
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        for name, kind in SCENARIOS.items():
            started = time.monotonic()
            print(f"[bench faults] {name} ...", file=sys.stderr, flush=True)
            (Path(tmp) / kind).mkdir()
            procs = Procs(Path(tmp) / kind, env)
            results[name] = scenario(kind, procs, Path(tmp), args.jobs, args.seconds)
            print(f"[bench faults] {name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(table(results, args.jobs, args.seconds))
    return 0 if all(r.ok for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

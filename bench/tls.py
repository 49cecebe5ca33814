"""``python -m bench.tls``: what mutual TLS costs (issue #13, item 5).

Two clusters side by side in one run, each a master + 2 slaves x 1 process (journal on,
loopback), as ``bench.run`` starts ours: one plain (authkey only), one with SCHEDULER_TLS_*
(certificates of a throw-away CA; the authkey handshake runs inside TLS). Rounds alternate
between them (ABBA), each a no-op ``apply_async`` burst and sequential ``apply_async().get()``
calls, measured by ``bench.measure``. Goal: TLS within 15 % of plain.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from scheduler import certs

from . import measure
from .ours import Cluster
from .procs import Proc, Procs
from .run import child_env, note

GOAL = 0.15  # TLS may cost this much of plain's rate (and add as much to its p50)
SLAVES = ("bench-s1", "bench-s2")  # the names ours.Cluster gives its two slaves


def tls_env(pki: Path, name: str) -> dict[str, str]:
    return {"SCHEDULER_TLS_CA": str(pki / certs.CA_FILE),
            "SCHEDULER_TLS_CERT": str(pki / f"{name}.pem"),
            "SCHEDULER_TLS_KEY": str(pki / f"{name}.key")}  # fmt: skip


class TLSProcs(Procs):
    """Starts each process with its own certificate: the master's, or its slave's name."""

    def __init__(self, logdir: Path, env: Mapping[str, str], pki: Path) -> None:
        super().__init__(logdir, env)
        self.pki = pki

    def start(self, name: str, argv: Sequence[str], **env: str) -> Proc:
        cert = name if name in SLAVES else "master"
        return super().start(name, argv, **tls_env(self.pki, cert), **env)


@contextlib.contextmanager
def environ(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment plus ``env`` (what its client connects with), then not."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_pki(root: Path) -> Path:
    certs.init(root)
    certs.issue(root, "master", "master", addresses=["127.0.0.1"])
    certs.issue(root, "bench", "client")
    for name in SLAVES:
        certs.issue(root, name, "worker")
    return root


def start(cluster: Cluster, warm: int) -> None:
    cluster.start_master()
    cluster.start_slaves(2, concurrency=1)
    cluster.warm_up(warm)


def rounds(clusters: dict[str, Cluster], n: int, jobs: int, calls: int) -> dict[str, dict]:
    results = {k: {"rate": [], "p50": [], "cpu": []} for k in clusters}
    for i in range(n):
        for kind in list(clusters) if i % 2 == 0 else list(clusters)[::-1]:  # ABBA
            note(f"round {i + 1}/{n}: {kind}")
            cluster = clusters[kind]
            assert cluster.client is not None
            rate, cpu = measure.burst_cpu(cluster.client, jobs, cluster.pids())
            samples = measure.latency(cluster.client, calls)
            results[kind]["rate"].append(rate)
            results[kind]["cpu"].append(cpu)
            results[kind]["p50"].append(measure.percentile(samples, 50) * 1000)
    return results


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(results: dict[str, dict], n: int, jobs: int, calls: int) -> str:
    plain, tls = results["plain"], results["tls"]
    lines = [
        f"TLS cost: master + 2 slaves x 1 process each, journal on, loopback; {n} alternating "
        f"rounds of {jobs:,} no-op jobs and {calls} sequential calls; median (min-max)",
        f"{'measurement':<40}{'plain':>24}{'TLS':>24}{'change':>9}  {'goal':<14}met",
    ]
    rows = (("no-op apply_async burst (jobs/s)", "rate", ",.0f", 1),
            ("apply_async().get() p50 (ms)", "p50", ".2f", -1),
            ("CPU per no-op job, all processes (us)", "cpu", ".1f", 0))  # fmt: skip
    for name, key, fmt, better in rows:
        before, after = statistics.median(plain[key]), statistics.median(tls[key])
        change = (after / before - 1) * 100
        if better > 0:
            bar, met = before * (1 - GOAL), after >= before * (1 - GOAL)
            goal = f">= {bar:{fmt}}"
        elif better < 0:
            bar, met = before * (1 + GOAL), after <= before * (1 + GOAL)
            goal = f"<= {bar:{fmt}}"
        else:
            goal, met = "-", None
        verdict = {True: "yes", False: "NO", None: "-"}[met]
        lines.append(f"{name:<40}{_spread(plain[key], fmt):>24}{_spread(tls[key], fmt):>24}"
                     f"{change:>+8.1f}%  {goal:<14}{verdict}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    p.add_argument("--jobs", type=int, default=20_000, help="no-op jobs per burst")
    p.add_argument("--calls", type=int, default=300, help="sequential calls per round (p50)")
    p.add_argument("--rounds", type=int, default=6, help="rounds of each (ABBA order)")
    p.add_argument("--warm", type=int, default=2_000, help="warm-up jobs per cluster")
    p.add_argument("--quick", action="store_true", help="a short run: 5,000 jobs, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.calls, args.rounds, args.warm = 5_000, 200, 2, 500
    env = child_env(secrets.token_urlsafe(32))
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        root = Path(tmp)
        pki = make_pki(root / "pki")
        plain_procs = Procs(root / "plain", env)
        tls_procs = TLSProcs(root / "tls", env, pki)
        for d in (plain_procs.logdir, tls_procs.logdir):
            d.mkdir()
        clusters = {"plain": Cluster(plain_procs, root / "plain"),
                    "tls": Cluster(tls_procs, root / "tls")}  # fmt: skip
        try:
            note("starting the plain cluster")
            start(clusters["plain"], args.warm)
            note("starting the TLS cluster")
            # the client here connects as the 'bench' client certificate to this one; the
            # plain cluster's client is connected already (its proxies keep their transport)
            with environ(tls_env(pki, "bench")):
                start(clusters["tls"], args.warm)
                results = rounds(clusters, args.rounds, args.jobs, args.calls)
        finally:
            try:
                for cluster in clusters.values():
                    cluster.stop()  # slaves drain, masters exit 0, or it says which did not
            finally:
                plain_procs.close()
                tls_procs.close()
    print(table(results, args.rounds, args.jobs, args.calls))
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real master and slave processes on 127.0.0.1 for the scheduler's integration tests."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from scheduler import Client

LEASE = 2.0


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def hold_ahead(client: Client, n: int = 10) -> None:
    """Run ``n`` short jobs: a slave holds work ahead of its slots (prefetches) only once
    it has seen that its jobs are short. For tests of what happens to prefetched jobs.
    (10 ms each: shorter ones would be sent to the job process in batches.)"""
    handles = [client.submit_shell(["sleep", "0.01"]) for _ in range(n)]
    assert [h.get(timeout=30) for h in handles] == [""] * n


class Proc:
    """A child process whose stderr goes to a file the test can read."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._fh = open(log, "ab")
        self.popen = subprocess.Popen(argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match:
        return wait_until(lambda: re.search(pattern, self.log()), timeout, what=pattern)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._fh.close()


class Cluster:
    """A master and its slaves; each test gets its own state dir, port and key."""

    def __init__(self, tmp: Path, lease: float = LEASE) -> None:
        self.tmp = tmp
        self.authkey = secrets.token_urlsafe(24)
        self.lease = lease
        self.port = 0
        self.host = "127.0.0.1"
        self.master: Proc | None = None
        self.slaves: dict[str, Proc] = {}
        self._count = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
        env.update(
            SCHEDULER_AUTHKEY=self.authkey,
            SCHEDULER_LEASE_SECONDS=str(self.lease),
            SCHEDULER_PROGRESS_SECONDS="0.5",
            SCHEDULER_HTTP="",  # tests that want the dashboard ask for a port
            SCHEDULER_STATE_DIR=str(self.tmp / "state"),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start_master(self, **env: str) -> Proc:
        self._count += 1
        log = self.tmp / f"master-{self._count}.log"
        argv = [sys.executable, "-m", "scheduler.master", "--bind", self.address]
        self.master = Proc(argv, self.env(**env), log)
        match = self.master.wait_log(r"master listening on [\d.]+:(\d+)")
        self.port = int(match.group(1))
        return self.master

    def start_slave(
        self,
        name: str,
        concurrency: int = 1,
        prefix: tuple[str, ...] = (),
        key: str | None = None,
        **env: str,
    ) -> Proc:
        """A slave called ``name``; ``key`` (default: the name) names its log and its entry
        in ``slaves``, for a second process under a name already taken."""
        key = key or name
        log = self.tmp / f"slave-{key}-{self._count}.log"
        env.setdefault("SCHEDULER_HEALTH_FILE", str(self.tmp / f"{key}.health"))
        argv = [*prefix, sys.executable, "-m", "scheduler.slave", "--master", self.address,
                "--concurrency", str(concurrency)]  # fmt: skip
        proc = Proc(argv, self.env(SCHEDULER_WORKER_NAME=name, **env), log)
        self.slaves[key] = proc
        return proc

    def wait_slaves(self, *names: str, client: Client | None = None) -> None:
        def registered() -> bool:
            with Client(self.address, self.authkey) as c:
                live = {w["name"] for w in c.status()["workers"]}
            return set(names) <= live

        wait_until(registered, what=f"slaves {names} to register")

    def client(self) -> Client:
        return Client(self.address, self.authkey)

    def restart_master(self, **env: str) -> Proc:
        """kill -9 the master and start it again at once on the same port and journal."""
        self.kill_master()
        return self.start_master(**env)

    def kill_master(self) -> None:
        assert self.master is not None
        self.master.signal(signal.SIGKILL)
        self.master.wait()

    def stop(self) -> None:
        for proc in [*self.slaves.values(), *([self.master] if self.master else [])]:
            proc.stop()


def dashboard_url(master: Proc, timeout: float = 20.0) -> str:
    """The dashboard's URL as the master logged it (start it with SCHEDULER_HTTP=host:0)."""
    return master.wait_log(r"dashboard on (http://\S+/) ", timeout).group(1)

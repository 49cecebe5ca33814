"""Processes the benchmark starts: each in its own session, output to a log file,
stopped by pid (SIGTERM, then SIGKILL), with whatever it left behind found by
walking /proc from the pids we started, never by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A contender failed to start or to answer in time; the message says which."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first log line matching ``pattern``; raises if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log.read_text(errors="replace"))
            if found:
                return found
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            time.sleep(0.02)
        raise BenchError(f"{self.name}: no {pattern!r} in its log after {timeout:g}s:\n"
                         f"{self.tail()}")  # fmt: skip


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (each with all its threads)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``, with its start time (so a recycled pid is not hit)."""
    tree, found, todo = _children(), {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if (started := _start_time(child)) is not None:
                found[child] = started
                todo.append(child)
    return found


def _kill_leftovers(procs: Mapping[int, str]) -> None:
    for pid, started in procs.items():
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class Procs:
    """Starts processes for the benchmark and guarantees they are gone at the end."""

    def __init__(self, logdir: Path, env: Mapping[str, str]) -> None:
        self.logdir = logdir
        self.env = dict(env)
        self.running: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], **env: str) -> Proc:
        log = self.logdir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=ROOT, env={**self.env, **env},
                start_new_session=True,
            )  # fmt: skip
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL; then end anything it left; returns its exit status."""
        below = descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
            code = None
        _kill_leftovers(below)
        if proc in self.running:
            self.running.remove(proc)
        return code

    def close(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc, timeout=5.0)

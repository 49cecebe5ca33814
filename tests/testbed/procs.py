"""Processes of the test bed: started detached, found again by pidfile, ended by pid only."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command; on failure raise with its stderr in the message."""
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def live_pid(pidfile: Path, marker: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and its command line holds ``marker``.

    The marker (a path of ours) keeps a recycled pid of someone else's process from matching.
    """
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    return pid if marker in cmdline else None


def start(argv: Sequence[str], log: Path) -> int:
    """Start a daemon in its own session with output to ``log``; return its pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def stop(pidfile: Path, marker: str, timeout: float = 20.0) -> None:
    """End the process of ``pidfile`` (SIGTERM, then SIGKILL after ``timeout``); drop the file."""
    pid = live_pid(pidfile, marker)
    if pid is not None:
        _signal(pid, signal.SIGTERM)
        if not wait_for(lambda: not _alive(pid), timeout):
            _signal(pid, signal.SIGKILL)
            wait_for(lambda: not _alive(pid), 5.0)
    pidfile.unlink(missing_ok=True)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours is gone for every purpose here; reap it.
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

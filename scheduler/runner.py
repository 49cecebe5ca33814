"""Runs jobs on a slave: shell commands in their own process group, Python callables in
long-lived child processes (one per slot) so a crash, a hang or a timeout kills only
the child, never the slave.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import cloudpickle

from .protocol import Lease, Outcome, plain


class Tail:
    """Keeps the last ``limit`` bytes written, and how many were dropped before them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self.dropped = 0

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self.limit:
            self._size -= len(first := self._chunks.popleft())
            self.dropped += len(first)

    def text(self) -> str | None:
        data = b"".join(self._chunks)
        cut = max(0, len(data) - self.limit)
        dropped = self.dropped + cut
        if not data:
            return None
        body = data[cut:].decode("utf-8", errors="replace")
        return f"[... {dropped} bytes dropped ...]\n{body}" if dropped else body


class _TextTail:
    """A text stream standing in for sys.stdout/stderr that keeps only a tail."""

    __slots__ = ("_limit", "_tail")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._tail: Tail | None = None  # most jobs print nothing: make it on first write

    def write(self, text: str) -> int:
        if self._tail is None:
            self._tail = Tail(self._limit)
        self._tail.write(text.encode("utf-8", errors="replace"))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def text(self) -> str | None:
        return self._tail.text() if self._tail else None


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Abort:
    """Lets another thread stop a running job and say why."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.requeue = False
        self._kill: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def arm(self, kill: Callable[[], None] | None) -> None:
        with self._lock:
            self._kill = kill
            if kill is not None and self.reason is not None:
                kill()

    def __call__(self, reason: str, requeue: bool = False) -> None:
        with self._lock:
            self.reason, self.requeue = reason, requeue
            if self._kill is not None:
                self._kill()


def run_shell(lease: Lease, limit: int, abort: Abort) -> Outcome:
    """Run one shell job to its end, its timeout, or an abort; never raises."""
    command, use_shell, cwd, env = (*lease.payload, None, None)[:4]
    started = time.monotonic()
    if cwd and not os.path.isdir(cwd):
        return Outcome(lease.job_id, lease.lease, False, None,
                       f"working directory {cwd} does not exist on this slave", 126)  # fmt: skip
    try:
        proc = subprocess.Popen(
            command, shell=bool(use_shell), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, cwd=cwd,
            env={**os.environ, **env} if env else None,
        )  # fmt: skip
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        where = f" in {cwd}" if cwd else ""
        return Outcome(lease.job_id, lease.lease, False, None,
                       f"cannot run {command!r}{where}: {exc.strerror or exc}", code)  # fmt: skip
    abort.arm(lambda: _killpg(proc.pid))
    tails = [Tail(limit), Tail(limit)]
    pumps = [
        threading.Thread(target=_pump, args=(stream, tail), daemon=True)
        for stream, tail in zip((proc.stdout, proc.stderr), tails, strict=True)
    ]
    for pump in pumps:
        pump.start()
    error = None
    try:
        code = proc.wait(timeout=lease.timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        code = proc.wait()
        error = f"timed out after {lease.timeout:g}s; killed its process group"
    _killpg(proc.pid)  # what the job left running in its group goes with it
    abort.arm(None)
    for pump in pumps:
        pump.join(timeout=2.0)
    if abort.reason:
        error = abort.reason
    elif error is None and code != 0:
        error = f"exited with {code}" if code > 0 else f"killed by signal {-code}"
    return Outcome(lease.job_id, lease.lease, error is None, None, error, code,
                   tails[0].text(), tails[1].text(), time.monotonic() - started)  # fmt: skip


def _pump(stream: Any, tail: Tail) -> None:
    with stream:
        while chunk := stream.read1(65536):
            tail.write(chunk)


# -- Python callables ---------------------------------------------------------

FUNC_CACHE = 256
RESULT_GAP = 0.001  # seconds: a child running a batch reports at least this often
BATCH_BREAK = 0.05  # a call this long in a batch (of calls expected to be tiny) ends it
STOPPED = "stopped"  # the child ran part of a batch: the rest goes back unstarted


def _child_main(conn: Any, limit: int, result_limit: int) -> None:
    """A slot's child process: run batches of calls, sending results in order.

    Results go back in small groups (at most RESULT_GAP apart) rather than one message
    each: for tiny jobs the message, not the job, is the cost. A call that takes
    BATCH_BREAK or longer ends its batch (STOPPED): batches are made of jobs that were
    tiny so far, and the rest must not wait behind long ones where no other slot, and
    no job of higher priority, can get at them. Function bodies are kept
    in a FUNC_CACHE-long LRU that the parent mirrors step for step (``_touch``), so the
    parent knows which bodies to send without asking.
    """
    os.setsid()  # its own process group, so a kill takes whatever the job started
    conn = plain(conn)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    bodies: OrderedDict[str, bytes] = OrderedDict()
    loaded: dict[str, Any] = {}
    while True:
        try:
            calls, funcs = conn.recv()
        except (EOFError, OSError):
            return
        for digest, _ in calls:
            for gone in _touch(bodies, digest, funcs.get(digest)):
                loaded.pop(gone, None)
        results, sent, last = [], time.monotonic(), len(calls) - 1
        for i, (digest, args_blob) in enumerate(calls):
            results.append(_call(bodies, loaded, digest, args_blob, limit, result_limit))
            long = results[-1][5] >= BATCH_BREAK
            if i == last or long or time.monotonic() - sent >= RESULT_GAP:
                conn.send(results)
                results, sent = [], time.monotonic()
            if long and i < last:
                conn.send(STOPPED)
                break


def _touch(lru: OrderedDict[str, Any], digest: str, value: Any) -> list[str]:
    """Use ``digest`` in ``lru`` (adding ``value`` if it is new); return what fell out."""
    if digest not in lru:
        if value is None:
            return []  # the call will say the body is missing
        lru[digest] = value
    lru.move_to_end(digest)
    gone = []
    while len(lru) > FUNC_CACHE:
        gone.append(lru.popitem(last=False)[0])
    return gone


def _die_with_parent() -> None:
    """If the slave is killed outright (OOM killer, kill -9), its job processes go too."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child exits at its next job instead
        pass


def _call(
    bodies: OrderedDict, loaded: dict, digest: str, args_blob: bytes, limit: int, result_limit: int
) -> tuple:
    """Run one call; return (ok, result or pickled exception, error, out, err, took, exit code).

    As in ``multiprocessing.pool``: the job's own exception travels back pickled (when it
    can be) with its traceback as text. ``SystemExit(0)`` is success; another exit code
    is a failure that records the code.
    """
    started = time.monotonic()
    out, err = _TextTail(limit), _TextTail(limit)
    code = None
    blob: bytes | None
    try:
        func, args, kwargs = _load(bodies, loaded, digest, args_blob)
        sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
        try:
            value = func(*args, **kwargs)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                code = exc.code if isinstance(exc.code, int) else 1
                raise
            value = None
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        blob = _dumps(value)
        if len(blob) > result_limit:  # it would travel through the master and its journal
            raise ValueError(
                f"the job's return value is {len(blob)} bytes pickled, over the "
                f"{result_limit}-byte limit (SCHEDULER_RESULT_LIMIT); write large outputs "
                "to shared storage and return their path"
            )
        ok, error = True, None
    except BaseException as exc:  # the job's own failure is its outcome
        ok, error = False, traceback.format_exc()
        # SystemExit and KeyboardInterrupt are not raised again in the client: they
        # would end the caller's program; their exit code is recorded instead
        blob = _dump_exception(exc, result_limit) if isinstance(exc, Exception) else None
    return ok, blob, error, out.text(), err.text(), time.monotonic() - started, code


def _load(bodies: OrderedDict, loaded: dict, digest: str, args_blob: bytes) -> tuple:
    """The function and its arguments; a missing module is said plainly."""
    try:
        func = loaded.get(digest)
        if func is None:
            if digest not in bodies:
                raise LookupError(f"the slave lost the body of function {digest}; submit again")
            func = loaded[digest] = pickle.loads(bodies[digest])
        args, kwargs = pickle.loads(args_blob)
    except ModuleNotFoundError as exc:
        where = os.environ.get("SCHEDULER_WORKER_NAME") or "this slave"
        raise ModuleNotFoundError(
            f"module {exc.name!r} is not installed on slave {where}: install it there, or send "
            f"it with the job: Client(ship_modules=[{exc.name}])", name=exc.name,
        ) from None  # fmt: skip
    return func, args, kwargs


def _dump_exception(exc: BaseException, limit: int) -> bytes | None:
    """The exception pickled for the client to raise again, or None if it cannot be."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    try:
        blob = _dumps(exc)
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        return None
    return blob if len(blob) <= limit else None


def _dumps(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # a lambda, a class from __main__...
        try:
            return cloudpickle.dumps(value)
        except Exception as exc:
            raise TypeError(f"the job's return value cannot be pickled: {exc}") from exc


class PythonSlot:
    """Parent side of one slot's child process."""

    def __init__(self, limit: int, result_limit: int) -> None:
        self.limit = limit
        self.result_limit = result_limit
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._sent: OrderedDict[str, bool] = OrderedDict()  # mirrors the child's LRU
        self.current: Lease | None = None
        self._started = 0.0
        self._timed_out = False

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=_child_main, args=(child, self.limit, self.result_limit)
        )
        self._proc.start()
        child.close()
        self._conn, self._sent = plain(parent), OrderedDict()

    def kill(self) -> None:
        if self._proc is not None and self._proc.pid and self._proc.exitcode is None:
            _killpg(self._proc.pid)  # what the job started, in the child's group
            self._proc.kill()  # and the child, which has none before its first step (setsid)

    def close(self) -> None:
        self.kill()
        if self._proc is not None:
            self._proc.join(timeout=5)
            self._proc = None

    def run(
        self,
        batch: list[Lease],
        funcs: dict[str, bytes],
        abort: Abort,
        done: Callable[[Outcome], None],
    ) -> list[Lease]:
        """Run a batch in order; report each outcome; return the leases never started."""
        self._ensure()
        need: dict[str, bytes] = {}
        for lease in batch:
            digest = lease.payload[0]
            if digest not in self._sent:
                body = funcs.get(digest)
                if body is None:
                    continue  # the child says the body is missing, and keeps in step
                need[digest] = body
            _touch(self._sent, digest, True)
        self._conn.send(([lease.payload for lease in batch], need))
        abort.arm(self.kill)
        i = 0
        try:
            while i < len(batch):
                self.current = batch[i] if len(batch) == 1 else None  # cancel kills singles only
                results = self._wait(batch[i], abort)
                if isinstance(results, str):  # STOPPED: the rest was not started
                    return batch[i:]
                for ok, blob, error, out, err, took, code in results or ():
                    lease = batch[i]
                    done(Outcome(lease.job_id, lease.lease, ok, blob, error, code, out, err, took))
                    i += 1
                if results is None:  # the child died running batch[i]
                    done(self._death(batch[i], abort))
                    return batch[i + 1 :]  # the rest need a fresh child
            return []
        finally:
            self.current = None
            abort.arm(None)

    def _wait(self, lease: Lease, abort: Abort) -> list[tuple] | str | None:
        """The next group of results, STOPPED, or None if the child died (killed, crashed,
        timed out)."""
        self._started = time.monotonic()
        # poll() builds a selector each call: only pay for it when there is a deadline
        self._timed_out = lease.timeout is not None and not self._ready(lease.timeout)
        if self._timed_out:
            self.kill()
            return None
        try:
            results: list[tuple] | str = self._conn.recv()
            return results
        except (EOFError, OSError):
            return None

    def _ready(self, timeout: float) -> bool:
        """Whether the child answers within ``timeout`` (any length: poll() takes int32 ms)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self._conn.poll(min(left, 86400.0)):
                return True
        return False

    def _death(self, lease: Lease, abort: Abort) -> Outcome:
        started, timed_out = self._started, self._timed_out
        self._proc.join(timeout=5)
        code, self._proc = self._proc.exitcode, None
        if timed_out:
            why = f"timed out after {lease.timeout:g}s; killed its process"
        elif abort.reason:
            why = abort.reason
        elif code is not None and code < 0:
            why = f"the process running it was killed by signal {-code}"
        else:
            why = f"the process running it exited with {code} (os._exit)"
        recorded = code if code is not None and code >= 0 and not timed_out else None
        return Outcome(lease.job_id, lease.lease, False, None, why, recorded, None, None,
                       time.monotonic() - started)  # fmt: skip

"""The client: ``multiprocessing.Pool``'s shape, spanning machines.

Submissions are buffered and sent in batches (on a full buffer, a few milliseconds
after the last call, or when you wait for a result). Outcomes are pushed back to a
per-client session by one long-polling thread, so ``get()`` costs no extra round trip.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import pickle
import queue
import re
import threading
import time
import types
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import cloudpickle

from . import __version__, settings
from .errors import ConnectError, JobFailed, RemoteTraceback, SchedulerError, SubmitError
from .job import MAX_ARRAY, JobSpec, State
from .protocol import VERSION as PROTOCOL
from .protocol import Done, Submitted
from .transport import Link

FLUSH_DELAY = 0.002
RECONNECT_PATIENCE = 60.0  # seconds a client waits out a master restart
_UNSET = object()


class AsyncResult:
    """The handle of one submitted job, like ``multiprocessing.pool.AsyncResult``."""

    # No Event per result: creating one costs more than the rest of a submission.
    # Waiters share the client's condition, notified once per batch of outcomes.
    __slots__ = ("_client", "_id", "_outcome", "_value", "_notify", "_callbacks")

    def __init__(self, client: Client, notify: queue.SimpleQueue | None = None,
                 callbacks: tuple | None = None) -> None:  # fmt: skip
        self._client = client
        self._id: int | None = None
        self._outcome: tuple | None = None  # (state, result, error, exit_code)
        self._value: Any = _UNSET
        self._notify = notify
        self._callbacks = callbacks

    @property
    def id(self) -> int:
        """The job id (sends the job now if it is still buffered)."""
        if self._id is None:
            self._client.flush()
        if self._id is None:
            self._raise()
        return self._id  # type: ignore[return-value]

    @property
    def state(self) -> str | None:
        return self._outcome[0] if self._outcome else None

    def ready(self) -> bool:
        return self._outcome is not None

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"job {self._id} is not ready")
        return self.state == State.SUCCEEDED

    def wait(self, timeout: float | None = None) -> bool:
        if self._id is None and self._outcome is None:
            self._client.flush()
        done = self._client._done
        with done:
            return done.wait_for(self.ready, timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The job's return value (stdout for a shell job); raises JobFailed if it failed."""
        if not self.wait(timeout):
            raise TimeoutError(f"job {self._id} not finished after {timeout}s")
        if self.state != State.SUCCEEDED:
            self._raise()
        if self._value is _UNSET:
            result = self._outcome[1]  # type: ignore[index]
            self._value = pickle.loads(result) if isinstance(result, bytes) else result
        return self._value

    def _raise(self) -> None:
        raise self._exception()

    def _exception(self) -> BaseException:
        """What ``get()`` raises: the job's own exception, rebuilt, with the remote
        traceback as its cause (as ``multiprocessing.pool``); else a JobFailed."""
        state, result, error, exit_code = self._outcome or ("failed", None, "not submitted", None)
        if state == "refused":
            return SubmitError(error)
        if state == "lost":
            return ConnectError(error)
        if state == State.FAILED and isinstance(result, bytes):
            try:
                exc = pickle.loads(result)
            except Exception:  # its class is not importable here
                exc = None
            if isinstance(exc, BaseException):
                exc.__cause__ = RemoteTraceback(error or "")
                return exc
        return JobFailed(self._id or 0, state, error, exit_code, _exc_type(error))

    def _set(self, state: str, result: Any, error: str | None, exit_code: int | None) -> None:
        """Record the outcome; the caller notifies ``client._done`` (once per batch)."""
        self._outcome = (state, result, error, exit_code)

    def _announce(self) -> None:
        """Tell a waiting iterator or callback; outside any lock."""
        if self._notify is not None:
            self._notify.put(self)
        if self._callbacks and self._outcome:
            callback, error_callback = self._callbacks
            state, _, error, exit_code = self._outcome
            try:
                if state == State.SUCCEEDED and callback:
                    callback(self.get())
                elif state != State.SUCCEEDED and error_callback:
                    error_callback(self._exception())
            except Exception:  # a user's callback must not kill the result thread
                pass

    def __repr__(self) -> str:
        return f"<AsyncResult job={self._id} state={self.state or 'pending'}>"


def _exc_type(error: str | None) -> str | None:
    """The exception type named on a Python traceback's last line, if it is one."""
    last = (error or "").strip().splitlines()[-1:] or [""]
    found = re.match(r"([A-Za-z_][\w.]*)(:|$)", last[0])
    return found.group(1) if found and "Traceback" in (error or "") else None


class _Pickler(cloudpickle.Pickler):
    """cloudpickle that keeps each function's source file name (cloudpickle writes
    ``<dynamic-code>``), so tracebacks from slaves name the user's file and line."""

    def reducer_override(self, obj: Any) -> Any:
        if _code_reduce is not None and type(obj) is types.CodeType:
            make, args = _code_reduce(obj)
            return make, tuple(obj.co_filename if a == "<dynamic-code>" else a for a in args)
        return super().reducer_override(obj)


_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)


def dumps_function(func: Callable) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump(func)
    return buffer.getvalue()


def _apply_chunk(func: Callable, chunk: list, star: bool) -> list:
    return [func(*item) if star else func(item) for item in chunk]


class Client:
    """Submit jobs to a master and collect their results.

    ``master`` is ``"host:port"`` (default ``SCHEDULER_MASTER``, then 127.0.0.1:8888);
    ``authkey`` defaults to ``SCHEDULER_AUTHKEY``. ``ship_modules``: modules of yours
    (next to your script, not installed on the slaves) to send along with your functions.
    """

    def __init__(
        self,
        master: str | tuple[str, int] | None = None,
        authkey: str | bytes | None = None,
        *,
        batch_size: int = 1000,
        environ: Mapping[str, str] | None = None,
        ship_modules: Iterable[types.ModuleType] = (),
    ) -> None:
        for module in ship_modules:  # sent by value with the functions that use them
            cloudpickle.register_pickle_by_value(module)
        env = os.environ if environ is None else environ
        where = master or env.get("SCHEDULER_MASTER") or f"127.0.0.1:{settings.DEFAULT_PORT}"
        what = "master" if master else "SCHEDULER_MASTER"
        self.address = settings.parse_address(where, what) if isinstance(where, str) else where
        if authkey is not None:
            key = settings.authkey_from(authkey, "authkey")
        else:
            key = settings.authkey_from_environ(env)
        self._authkey = key.reveal()
        self._environ = environ  # TLS settings too (SCHEDULER_TLS_*)
        self._link = Link(self.address, self._authkey, stopping=lambda: self._closed,
                          patience=RECONNECT_PATIENCE, environ=environ)  # fmt: skip
        # a wrong address, key or version fails here, in one line
        _check_protocol(self._link.call("ping", retry=False), self.address)
        self.batch_size = batch_size
        self._session = uuid.uuid4().hex
        lock = threading.RLock()
        self._lock = threading.Condition(lock)  # the collector waits here for jobs sent
        self._to_flush = threading.Condition(lock)  # the flusher waits here for a buffer
        self._done = threading.Condition()  # AsyncResult.wait() waits on this
        self._submit_lock = threading.Lock()
        self._buffer: list[tuple[JobSpec, AsyncResult]] = []
        self._buffer_funcs: dict[str, bytes] = {}
        self._pending: dict[int, AsyncResult] = {}
        self._early: dict[int, tuple] = {}  # outcomes that beat their submit() reply
        self._funcs: OrderedDict[int, tuple[Any, str, bytes]] = OrderedDict()
        self._closed = False
        self._threads: list[threading.Thread] = []

    # -- Pool-shaped API -------------------------------------------------------

    def apply_async(
        self,
        func: Callable,
        args: tuple = (),
        kwds: Mapping[str, Any] | None = None,
        callback: Callable[[Any], None] | None = None,
        error_callback: Callable[[BaseException], None] | None = None,
        *,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        retries: int | None = None,
        retry_backoff: float | None = None,
        after: Iterable[AsyncResult | int] | None = None,
        priority: int | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> AsyncResult:
        """Run ``func(*args, **kwds)`` on a slave. ``retries``: a run that raises is tried
        again up to that many times, ``retry_backoff`` seconds after the first failure and
        twice as long after each next (with jitter); default: the master's settings.
        ``after``: results (or ids) of jobs that must succeed first; if one fails or is
        cancelled, this job is cancelled too. ``priority``: higher runs first (default 0).
        ``requires``: labels a slave must carry to run it (``{"gpu": "1"}``; a slave's
        SCHEDULER_WORKER_LABELS)."""
        deps = _ids(after)
        digest = self._func(func)
        payload = (digest, self._pickle_args(args, dict(kwds or {})))
        spec = JobSpec("python", payload, name or _name_of(func), labels, timeout, max_attempts,
                       retries, retry_backoff, deps, priority,
                       dict(requires) if requires else None)  # fmt: skip
        callbacks = (callback, error_callback) if callback or error_callback else None
        return self._enqueue(spec, AsyncResult(self, callbacks=callbacks))

    def apply(self, func: Callable, args: tuple = (), kwds: Mapping[str, Any] | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def map(
        self, func: Callable, iterable: Iterable, chunksize: int | None = None, *,
        max_running: int | None = None, priority: int | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> list:  # fmt: skip
        """Ordered results of ``func`` over ``iterable``; blocks until all are done.

        ``max_running``: the items (chunks) are one array, of which at most that many run
        at once across the cluster. ``priority``, ``requires``: as for ``apply_async``."""
        return self._map(func, iterable, chunksize, False, _Placed(max_running, priority, requires))

    def starmap(
        self, func: Callable, iterable: Iterable, chunksize: int | None = None, *,
        max_running: int | None = None, priority: int | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> list:  # fmt: skip
        return self._map(func, iterable, chunksize, True, _Placed(max_running, priority, requires))

    def imap_unordered(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> Iterator:
        """Results in the order they finish."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        handles = self._submit_chunks(func, list(iterable), chunksize, False, done)
        for _ in handles:
            handle = done.get()
            yield from (handle.get() if chunksize > 1 else [handle.get()])

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> Iterator:
        """Results in order, as soon as each is available."""
        for handle in self._submit_chunks(func, list(iterable), chunksize, False, None):
            yield from (handle.get() if chunksize > 1 else [handle.get()])

    # -- shell jobs and job control --------------------------------------------

    def submit_shell(
        self,
        command: list[str] | str,
        *,
        shell: bool = False,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        retries: int | None = None,
        retry_backoff: float | None = None,
        after: Iterable[AsyncResult | int] | None = None,
        priority: int | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> AsyncResult:
        """Run a command: an argv list, or a string given to ``/bin/sh`` when ``shell=True``.

        It runs in ``cwd`` (default: the slave's working directory) with ``env`` added to
        the slave's environment. ``get()`` returns the tail of its stdout and raises
        JobFailed on a non-zero exit (once its ``retries``, if any, are spent; ``retries``,
        ``retry_backoff``, ``after``, ``priority`` and ``requires`` as for ``apply_async``).
        """
        _check_command(command, shell)
        cmd = command if shell else [str(part) for part in command]
        payload = (cmd, shell, cwd, dict(env or {})) if cwd or env else (cmd, shell)
        spec = JobSpec("shell", payload, name or "", labels, timeout, max_attempts, retries,
                       retry_backoff, _ids(after), priority,
                       dict(requires) if requires else None)  # fmt: skip
        return self._enqueue(spec, AsyncResult(self))

    def submit_array(
        self,
        command: list[str] | str,
        indices: Iterable[int],
        *,
        max_running: int | None = None,
        shell: bool = False,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        retries: int | None = None,
        retry_backoff: float | None = None,
        after: Iterable[AsyncResult | int] | None = None,
        priority: int | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> list[AsyncResult]:
        """An array job (Slurm's ``--array``): one task per index, ``{}`` in the command
        replaced by the index, which is also in the task's environment as
        SCHEDULER_ARRAY_INDEX; at most ``max_running`` tasks run at once. One array id
        for all (the first task's job id: ``results[0].id``); ``scheduler jobs`` shows it
        as one line. Other arguments as for ``submit_shell``. See ``job.parse_array``
        for indices written as ``1-1000%50``."""
        _check_command(command, shell)
        indices = list(indices)
        if not 0 < len(indices) <= MAX_ARRAY or not all(
            type(i) is int and i >= 0 for i in indices
        ):
            raise SubmitError(f"an array takes 1 to {MAX_ARRAY:,} indices (whole numbers "
                              f">= 0), got {len(indices):,}")  # fmt: skip
        cap = _cap(max_running)
        deps, needs = _ids(after), dict(requires) if requires else None
        specs = []
        for i in indices:
            cmd = (command.replace("{}", str(i)) if isinstance(command, str)
                   else [str(part).replace("{}", str(i)) for part in command])  # fmt: skip
            payload = (cmd, shell, cwd, {**(env or {}), "SCHEDULER_ARRAY_INDEX": str(i)})
            specs.append(JobSpec("shell", payload, name or "", labels, timeout, max_attempts,
                                 retries, retry_backoff, deps, priority, needs, (i, cap)))
        return self._send_array(specs, {}, None)

    def result(self, job_id: int) -> AsyncResult:
        """A handle on an existing job, by id: the one that already waits for it, if any
        (outcomes find their handle by job id: a second one would take the first's place
        in ``_pending``, and the first would never resolve)."""
        with self._lock:
            handle = self._pending.get(job_id)
            if handle is not None:
                return handle
            handle = self._pending[job_id] = AsyncResult(self)
            handle._id = job_id
            self._lock.notify_all()  # the collector may sleep with nothing pending
        if not self._link.call("watch", self._session, [job_id]):
            with self._lock:
                self._pending.pop(job_id, None)
            self._link.call("get", job_id)  # raises UnknownJob with its message
        self._start_threads()
        return handle

    def wait(self, ids: Iterable[int] | None = None, timeout: float | None = None) -> list[dict]:
        """Wait until the given jobs (default: every job not finished) end; return them."""
        self.flush()
        if ids is None:
            # jobs move while the pages are read: one that starts between the listings is
            # in two (queued, then running), one requeued (running, then queued: its slave
            # came back without it) in neither of queued-then-running
            states = ("running", "queued", "running")
            ids = [j["id"] for s in states for j in self.iter_jobs(state=s)]
        handles = [self.result(i) for i in dict.fromkeys(ids)]  # each job once
        for handle in handles:
            if not handle.wait(timeout):
                raise TimeoutError(f"job {handle._id} not finished after {timeout}s")
        return [self.job(h._id) for h in handles]  # type: ignore[arg-type]

    def job(self, job_id: int) -> dict:
        return self._link.call("get", job_id)

    def jobs(
        self, state: str | None = None, limit: int | None = 100, before: int | None = None,
        array: int | None = None,
    ) -> list[dict]:
        """Jobs newest first (ids below ``before``): at most ``limit``, and 1,000 a call.

        Finished jobs the master no longer keeps in memory come from its journal. An
        array is one entry (``tasks``, ``counts`` by state); ``array=ID`` lists its tasks.
        """
        if array is None:
            return self._link.call("jobs", state, limit, before)
        return self._link.call("jobs", state, limit, before, array)

    def iter_jobs(self, state: str | None = None) -> Iterator[dict]:
        """Every job, newest first, a page at a time."""
        before = None
        while page := self.jobs(state=state, limit=None, before=before):
            yield from page
            before = page[-1]["id"]

    def cancel(self, job_id: int) -> dict:
        return self._link.call("cancel", job_id)

    def status(self) -> dict:
        return self._link.call("status")

    def prune(self, older_than: float | None = None, keep: int | None = None) -> dict:
        """Have the master delete finished jobs from its journal now: those that ended more
        than ``older_than`` seconds ago and those beyond the newest ``keep`` finished (both
        None: its SCHEDULER_RETAIN and SCHEDULER_RETAIN_COUNT). Returns what it deleted."""
        return self._link.call("prune", older_than, keep, retry=False)

    def call(self, method: str, *args: Any) -> Any:
        """A call of the master's service by name (scheduler verify's marks and chaos)."""
        return self._link.call(method, *args)

    def ping(self) -> dict:
        return self._link.call("ping")

    # -- batching --------------------------------------------------------------

    def flush(self) -> None:
        """Send buffered jobs now."""
        with self._submit_lock:
            with self._lock:
                batch, funcs = self._buffer, self._buffer_funcs
                self._buffer, self._buffer_funcs = [], {}
            if batch:
                self._send(batch, funcs)

    def _send(self, batch: list[tuple[JobSpec, AsyncResult]], funcs: dict[str, bytes]) -> None:
        specs = [tuple(spec) for spec, _ in batch]  # plain tuples: see protocol
        try:
            # never retried: a lost reply may mean the jobs are in, and twice is worse
            first, count = Submitted(*self._link.call("submit", specs, funcs, self._session,
                                                      retry=False))  # fmt: skip
        except ConnectError as exc:
            why = f"{exc}; check `scheduler jobs` before submitting again"
            self._resolve([(h, ("refused", None, why, None)) for _, h in batch])
            raise ConnectError(why) from exc
        except SchedulerError as exc:
            self._resolve([(h, ("refused", None, str(exc), None)) for _, h in batch])
            raise
        early = []
        with self._lock:
            for i, (_, handle) in enumerate(batch):
                handle._id = first + i
                outcome = self._early.pop(first + i, None) if self._early else None
                if outcome is None:
                    self._pending[first + i] = handle
                else:
                    early.append((handle, outcome))
            self._lock.notify_all()
        if early:
            self._resolve(early)

    def _resolve(self, pairs: list[tuple[AsyncResult, tuple]]) -> None:
        with self._done:
            for handle, outcome in pairs:
                handle._set(*outcome)
            self._done.notify_all()
        for handle, _ in pairs:
            handle._announce()

    def _enqueue(self, spec: JobSpec, handle: AsyncResult) -> AsyncResult:
        if self._closed:
            raise SchedulerError("client is closed")
        if not self._threads:
            self._start_threads()
        with self._lock:
            self._buffer.append((spec, handle))
            waiting = len(self._buffer)
            if waiting == 1:
                self._to_flush.notify()
        if waiting >= self.batch_size:
            self.flush()
        return handle

    def _func(self, func: Callable) -> str:
        """Digest of the pickled function; each function is pickled once per client."""
        entry = self._funcs.get(id(func))
        if entry is None or entry[0] is not func:
            try:
                body = dumps_function(func)
            except Exception as exc:
                raise SubmitError(f"cannot pickle {_name_of(func)!r}: {exc}") from exc
            entry = (func, hashlib.blake2b(body, digest_size=16).hexdigest(), body)
            self._funcs[id(func)] = entry
            if len(self._funcs) > 256:
                self._funcs.popitem(last=False)
        with self._lock:
            self._buffer_funcs[entry[1]] = entry[2]
        return entry[1]

    @staticmethod
    def _pickle_args(args: tuple, kwds: dict) -> bytes:
        try:
            return pickle.dumps((tuple(args), kwds), protocol=5)
        except Exception:
            try:
                return cloudpickle.dumps((tuple(args), kwds))
            except Exception as exc:
                raise SubmitError(f"cannot pickle the job's arguments: {exc}") from exc

    def _map(
        self, func: Callable, iterable: Iterable, chunksize: int | None, star: bool,
        placed: _Placed,
    ) -> list:  # fmt: skip
        items = list(iterable)
        if chunksize is None:
            slots = sum(w.get("concurrency", 1) for w in self.status()["workers"]) or 1
            chunksize = max(1, math.ceil(len(items) / (slots * 4)))
        handles = self._submit_chunks(func, items, chunksize, star, None, placed)
        self.flush()
        results: list = []
        for handle in handles:
            results.extend(handle.get() if chunksize > 1 else [handle.get()])
        return results

    def _submit_chunks(
        self, func: Callable, items: list, chunksize: int, star: bool,
        notify: queue.SimpleQueue | None, placed: _Placed | None = None,
    ) -> list[AsyncResult]:  # fmt: skip
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        name = _name_of(func)
        if chunksize > 1:
            func = functools.partial(_apply_chunk, func, star=star)
        digest = self._func(func)
        if chunksize == 1:
            blobs = [self._pickle_args(tuple(item) if star else (item,), {}) for item in items]
        else:
            blobs = [self._pickle_args((items[i : i + chunksize],), {})
                     for i in range(0, len(items), chunksize)]  # fmt: skip
        if placed is None or placed == _Placed():
            handles = [self._enqueue(JobSpec("python", (digest, blob), name),
                                     AsyncResult(self, notify)) for blob in blobs]  # fmt: skip
            self.flush()
            return handles
        cap = None if placed.max_running is None else _cap(placed.max_running)
        if cap is not None and len(blobs) > MAX_ARRAY:
            raise SubmitError(f"max_running makes the {len(blobs):,} tasks one array, which "
                              f"holds at most {MAX_ARRAY:,}; raise chunksize")  # fmt: skip
        needs = dict(placed.requires) if placed.requires else None
        specs = [JobSpec("python", (digest, blob), name, priority=placed.priority,
                         requires=needs, array=None if cap is None else (i, cap))
                 for i, blob in enumerate(blobs)]  # fmt: skip
        return self._send_array(specs, {digest: self._funcs[id(func)][2]}, notify)

    def _send_array(
        self, specs: list[JobSpec], funcs: dict[str, bytes], notify: queue.SimpleQueue | None
    ) -> list[AsyncResult]:
        """Send ``specs`` in one submit call (an array's tasks must travel together),
        after the jobs buffered before them."""
        if self._closed:
            raise SchedulerError("client is closed")
        self._start_threads()
        self.flush()
        batch = [(spec, AsyncResult(self, notify)) for spec in specs]
        with self._submit_lock:
            self._send(batch, funcs)
        return [handle for _, handle in batch]

    # -- background threads ------------------------------------------------------

    def _start_threads(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._flush_loop, name="scheduler-flush", daemon=True),
                threading.Thread(target=self._collect_loop, name="scheduler-collect", daemon=True),
            ]
        for thread in self._threads:
            thread.start()

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                while not self._buffer and not self._closed:
                    self._to_flush.wait()
                if self._closed:
                    return
            time.sleep(FLUSH_DELAY)  # let a burst fill the batch
            try:
                self.flush()
            except SchedulerError:
                pass  # already set on the handles; the caller sees it from get()

    def _collect_loop(self) -> None:
        link = Link(self.address, self._authkey, stopping=lambda: self._closed,
                    patience=RECONNECT_PATIENCE, environ=self._environ)  # fmt: skip
        while True:
            with self._lock:  # woken once jobs are sent (not when buffered: see _to_flush)
                while not self._pending and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
            try:
                outcomes = link.call("collect", self._session, 1.0)
                if outcomes is None:  # the master restarted: ask again for what we wait on
                    with self._lock:
                        ids = list(self._pending)
                    if not self._closed:
                        link.call("watch", self._session, ids)
                    continue
            except SchedulerError as exc:
                with self._lock:
                    lost, self._pending = list(self._pending.values()), {}
                why = f"{exc}; the job may still finish"
                self._resolve([(h, ("lost", None, why, None)) for h in lost])
                if self._closed:
                    return
                continue
            ready = []
            with self._lock:
                for job_id, *outcome in map(Done._make, outcomes):
                    handle = self._pending.pop(job_id, None)
                    if handle is None:
                        self._early[job_id] = tuple(outcome)
                    else:
                        ready.append((handle, tuple(outcome)))
            self._resolve(ready)

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Send what is buffered and stop the background threads; jobs keep running."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
                self._lock.notify_all()
                self._to_flush.notify_all()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Placed(NamedTuple):
    """How map's tasks are placed: an array cap, a priority, labels required."""

    max_running: int | None = None
    priority: int | None = None
    requires: Mapping[str, str] | None = None


def _cap(max_running: int | None) -> int:
    """An array's cap as the wire carries it (0: none)."""
    if max_running is None:
        return 0
    if type(max_running) is not int or max_running < 1:
        raise SubmitError(f"max_running must be a whole number >= 1, got {max_running!r}")
    return max_running


def _check_command(command: list[str] | str, shell: bool) -> None:
    if isinstance(command, str) and not shell:
        raise SubmitError("a command string needs shell=True; or pass an argv list")
    if not command or (isinstance(command, list) and not all(command)):
        raise SubmitError("empty command; give at least the program to run")


def _ids(after: Iterable[AsyncResult | int] | None) -> tuple[int, ...] | None:
    """Job ids from results (sending buffered jobs first, so they have ids) or ids."""
    if after is None:
        return None
    return tuple(x.id if isinstance(x, AsyncResult) else x for x in after)


def _check_protocol(ping: dict, address: tuple[str, int]) -> None:
    theirs = ping.get("protocol", 2)  # a master that does not say speaks protocol 2
    if theirs != PROTOCOL:
        raise ConnectError(
            f"the master at {address[0]}:{address[1]} speaks protocol {theirs} (scheduler "
            f"{ping.get('version', '?')}), this client protocol {PROTOCOL} (scheduler "
            f"{__version__}); install the master's version here, or upgrade the master"
        )


def _name_of(func: Callable) -> str:
    func = getattr(func, "func", func)  # functools.partial
    return getattr(func, "__qualname__", None) or type(func).__name__

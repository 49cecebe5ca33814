"""The wire: ``multiprocessing.managers`` over TCP with an authkey, as in the classic design.

The master publishes one object, the scheduler service, instead of two bare queues.
This module is the one boundary where socket and manager errors become ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing import AuthenticationError, connection, managers
from typing import Any

from .errors import AuthError, ConnectError

log = logging.getLogger(__name__)

# Every method of scheduler.service.Service that a client or slave may call.
EXPOSED = (
    "ping", "submit", "collect", "watch", "get", "jobs", "cancel", "status",
    "register", "lease", "report", "release", "heartbeat", "goodbye",
    "mark", "marks", "chaos", "refuse",
)  # fmt: skip
HANDSHAKE_SECONDS = 5.0  # a peer that has not authenticated by then is dropped
MAX_UNAUTHENTICATED = 64  # connections in their handshake at once; more are closed at once
REFUSAL_LOG_SECONDS = 60.0  # refused connections are logged at most this often, counted
SchedulerProxy = managers.MakeProxyType("SchedulerProxy", EXPOSED)  # type: ignore[attr-defined]


def _nodelay(conn: connection.Connection) -> None:
    """Send small writes at once (TCP_NODELAY). The stdlib writes a message's 4-byte header
    and, above 16 KiB, its body in two calls: with Nagle's algorithm on, the body then waits
    for the peer's delayed ACK of the header, 40 ms on Linux, on every large message."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _client(address: tuple[str, int], authkey: bytes | None = None) -> connection.Connection:
    conn = connection.Client(address, authkey=authkey)
    _nodelay(conn)
    return conn


# The stdlib's pickle serializer over TCP_NODELAY sockets, for the server and every proxy.
SERIALIZER = "scheduler"
managers.listener_client[SERIALIZER] = (connection.Listener, _client)  # type: ignore[attr-defined]


def _peer(conn: connection.Connection) -> str:
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            host, port = sock.getpeername()[:2]
            return f"{host}:{port}"
    except OSError:
        return "unknown peer"


class Refusals:
    """Counts refused connections and logs them at most once a REFUSAL_LOG_SECONDS.

    A connection closed before it sent a byte (a port probe, a health check) is no
    attack and is only logged at debug level.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._peers: set[str] = set()
        self._last = -REFUSAL_LOG_SECONDS

    def note(self, reason: str, peer: str) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + 1
            if len(self._peers) < 5:
                self._peers.add(peer.rsplit(":", 1)[0])
        self.flush()

    def flush(self) -> None:
        """Log what was counted, if the last line is old enough."""
        with self._lock:
            if not self._counts or self._clock() - self._last < REFUSAL_LOG_SECONDS:
                return
            counts, peers, self._counts, self._peers = self._counts, self._peers, {}, set()
            self._last = self._clock()
        what = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        log.warning("refused %d connection(s) (%s) from %s; slaves and clients need the "
                    "master's SCHEDULER_AUTHKEY", sum(counts.values()), what,
                    ", ".join(sorted(peers)))  # fmt: skip


class _Deadline:
    """Shuts a connection's socket down after ``seconds``, or when evicted, unless cancelled."""

    def __init__(self, conn: connection.Connection, seconds: float) -> None:
        self.why: str | None = None  # set when it cut the connection
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._timer = threading.Timer(seconds, self.cut, (f"no handshake within {seconds:g}s",))
        self._timer.daemon = True
        self._timer.start()

    def cut(self, why: str) -> None:
        self.why = why
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()
        self._sock.close()


class _Server(managers.Server):
    """The stdlib server, hardened against peers that never authenticate.

    A handshake has HANDSHAKE_SECONDS to finish. At most MAX_UNAUTHENTICATED are in it at
    once: a new connection beyond that cuts the oldest one, so a flood of silent peers
    cannot lock out a real client (whose handshake takes a millisecond). Refused
    connections are counted and logged at most once a minute (``refusals``).
    """

    refusals = Refusals()

    def accepter(self) -> None:
        self._handshaking: OrderedDict[int, _Deadline] = OrderedDict()
        self._handshaking_lock = threading.Lock()
        while True:
            try:
                c = self.listener.accept()  # type: ignore[attr-defined]
                _nodelay(c)
                deadline = _Deadline(c, HANDSHAKE_SECONDS)
            except OSError:
                continue
            with self._handshaking_lock:
                self._handshaking[id(deadline)] = deadline
                while len(self._handshaking) > MAX_UNAUTHENTICATED:
                    _, oldest = self._handshaking.popitem(last=False)
                    oldest.cut("over the limit of connections in handshake")
            threading.Thread(target=self.handle_request, args=(c, deadline), daemon=True).start()

    def handle_request(self, conn: connection.Connection, deadline: _Deadline) -> None:  # type: ignore[override]
        try:
            self._handle_request(conn, deadline)
        except SystemExit:  # serve_client() exits on EOF, as in the stdlib
            pass
        finally:
            conn.close()

    def _handle_request(self, c: connection.Connection, deadline: _Deadline) -> None:  # type: ignore[override]
        # Same as the stdlib's, except for the handshake's deadline, and that a failed one
        # (wrong key, garbage bytes, a silent peer, a port scanner) is counted, not logged
        # line by line, and the connection dropped quietly.
        try:
            connection.deliver_challenge(c, self.authkey)  # type: ignore[attr-defined]
            connection.answer_challenge(c, self.authkey)  # type: ignore[attr-defined]
        except (AuthenticationError, AssertionError, OSError, EOFError, ValueError) as exc:
            self._refused(c, exc, deadline.why)
            return
        finally:
            deadline.cancel()
            with self._handshaking_lock:
                self._handshaking.pop(id(deadline), None)
        funcname = None
        try:
            _, funcname, args, kwds = c.recv()
            if funcname not in self.public:
                raise ValueError(f"{funcname!r} unrecognized")
            msg: tuple[str, Any] = ("#RETURN", getattr(self, funcname)(c, *args, **kwds))
        except Exception as exc:
            # a proxy made before a master restart releasing its reference is routine
            level = logging.DEBUG if funcname == "decref" else logging.WARNING
            log.log(level, "request %s from %s failed: %r", funcname, _peer(c), exc)
            msg = ("#TRACEBACK", traceback.format_exc())
        try:
            c.send(msg)
        except OSError:
            pass

    def _refused(self, c: connection.Connection, exc: BaseException, cut: str | None) -> None:
        peer = _peer(c)
        if isinstance(exc, AuthenticationError):
            self.refusals.note("wrong authkey", peer)
        elif cut is not None:
            self.refusals.note(cut, peer)
        elif isinstance(exc, (EOFError, ConnectionResetError, BrokenPipeError)):
            # a port probe, or one of our own processes exiting mid-handshake
            log.debug("connection from %s closed during the handshake", peer)
        else:
            self.refusals.note("bad handshake", peer)


class MasterManager(managers.BaseManager):
    pass


class ClientManager(managers.BaseManager):
    pass


ClientManager.register("scheduler", proxytype=SchedulerProxy)


def serve(service: object, address: tuple[str, int], authkey: bytes) -> managers.Server:
    """Create (not start) the manager server publishing ``service``."""
    MasterManager.register(
        "scheduler", callable=lambda: service, exposed=EXPOSED, proxytype=SchedulerProxy
    )
    try:
        # BaseManager.get_server() ignores _Server; build ours from the same registry
        return _Server(MasterManager._registry, address, authkey, SERIALIZER)  # type: ignore[attr-defined]
    except OSError as exc:
        host, port = address
        raise ConnectError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "pick another SCHEDULER_BIND or stop what uses the port"
        ) from exc


def connect(address: tuple[str, int], authkey: bytes) -> Any:
    """Connect to the master and return a proxy of its service."""
    host, port = address
    manager = ClientManager(address=address, authkey=authkey, serializer=SERIALIZER)
    try:
        manager.connect()
        proxy = manager.scheduler()  # type: ignore[attr-defined]
        # The stdlib proxy's finalizer closes "this thread's connection" once no proxy
        # of the master's object is left; as every proxy here shares the one service
        # object, a proxy dying in the middle of another's call closed the socket
        # under it. The service is a singleton, so its server-side count is moot.
        finalizer = getattr(proxy, "_close", None)
        if finalizer is not None:
            finalizer.cancel()
        forget_connection(proxy)  # a cached one may be from before a master restart
        return proxy
    except AuthenticationError as exc:
        raise AuthError(
            f"master at {host}:{port} refused the authkey; "
            "use the same SCHEDULER_AUTHKEY as the master"
        ) from exc
    except (OSError, EOFError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConnectError(
            f"cannot reach the master at {host}:{port}: {why}; "
            "is it running, and is SCHEDULER_MASTER right?"
        ) from exc


def forget_connection(proxy: Any) -> None:
    """Close this thread's cached connection to the proxy's master, if any."""
    tls: Any = getattr(proxy, "_tls", None)
    conn = getattr(tls, "connection", None)
    if conn is not None:
        conn.close()
        del tls.connection


MAX_RETRY_DELAY = 2.0  # seconds between reconnect attempts, at most: slaves come back fast

# What a broken connection to the master looks like from a proxy call.
_CONNECTION_ERRORS = (OSError, EOFError)


def _stale(exc: BaseException) -> bool:
    """A proxy from before a master restart: the new server does not know its object.

    The stdlib reconnects a thread's dropped connection by itself, to whatever now
    listens at the address, and then fails with a RemoteError (KeyError in id_to_obj).
    """
    return isinstance(exc, managers.RemoteError) and "id_to_obj" in str(exc)


class Link:
    """Calls to the master that survive it going away: reconnect with backoff and retry.

    The stdlib caches one connection per (master address, thread) for all proxies;
    after the master restarts that connection is dead and the old proxy's object id
    is unknown to the new server, so a failed call drops both and starts afresh.
    """

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        stopping: Callable[[], bool] = lambda: False,
        patience: float | None = None,
    ) -> None:
        self._address = address
        self._authkey = authkey
        self._stopping = stopping
        self._patience = patience
        self._lock = threading.Lock()
        self._proxy: Any = None
        self._generation = 0

    def call(self, method: str, *args: Any, retry: bool = True) -> Any:
        """Call a service method; with ``retry``, wait out a master restart and call again."""
        started, delay, attempt = time.monotonic(), 0.5, 0
        while True:
            proxy, generation = self._current(retry)
            try:
                return getattr(proxy, method)(*args)
            except (*_CONNECTION_ERRORS, managers.RemoteError) as exc:
                if isinstance(exc, managers.RemoteError) and not _stale(exc):
                    raise
                self._drop(proxy, generation)
                attempt += 1
                if not retry or self._given_up(started, attempt):
                    raise ConnectError(
                        f"lost the master at {self._where()} ({type(exc).__name__})"
                    ) from exc
                log.warning("master at %s unreachable (%s); retrying in %.1fs (attempt %d)",
                            self._where(), type(exc).__name__, delay, attempt)  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    def _given_up(self, started: float, attempt: int) -> bool:
        if self._stopping() and attempt > 3:
            return True
        return self._patience is not None and time.monotonic() - started > self._patience

    def _where(self) -> str:
        return f"{self._address[0]}:{self._address[1]}"

    def _current(self, retry: bool) -> tuple[Any, int]:
        with self._lock:
            if self._proxy is None:
                self._proxy = self._connect(retry)
                self._generation += 1
            return self._proxy, self._generation

    def _connect(self, retry: bool) -> Any:
        started, delay, attempt = time.monotonic(), 0.5, 0
        while True:
            try:
                return connect(self._address, self._authkey)
            except AuthError:
                raise
            except ConnectError as exc:
                attempt += 1
                if not retry or self._given_up(started, attempt):
                    raise
                log.warning("%s; retrying in %.1fs (attempt %d)", exc, delay, attempt)
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    def _drop(self, proxy: Any, generation: int) -> None:
        forget_connection(proxy)
        with self._lock:
            if generation == self._generation:
                self._proxy = None

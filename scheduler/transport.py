"""The wire: ``multiprocessing.managers`` over TCP with an authkey, as in the classic design.

The master publishes one object, the scheduler service, instead of two bare queues.
This module is the one boundary where socket and manager errors become ours.

With ``SCHEDULER_TLS_CA``/``_CERT``/``_KEY`` set (read here, where connections are made, so
every process of the cluster follows its environment), every manager connection is mutual
TLS 1.3 (``scheduler.tls``) with the authkey handshake inside it, and the master answers each
call according to the role in the caller's certificate (``refusal``: the role table).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from multiprocessing import AuthenticationError, connection, managers
from typing import Any

from . import tls
from .errors import AuthError, ConnectError, Forbidden
from .protocol import plain

log = logging.getLogger(__name__)

# Every method of scheduler.service.Service that a client or slave may call.
EXPOSED = (
    "ping", "submit", "collect", "watch", "get", "jobs", "cancel", "status",
    "register", "lease", "report", "release", "heartbeat", "goodbye",
    "mark", "marks", "chaos", "refuse", "prune",
)  # fmt: skip
HANDSHAKE_SECONDS = 5.0  # a peer that has not authenticated by then is dropped
# a peer that takes none of an answer for this long is cut off: answers to parked polls are
# sent by whichever thread has the work (a client's submit, the tick), never held up by it
SEND_SECONDS = 5.0
# the TLS handshake ends first: a silent peer is then told, in plain text, that TLS is needed
TLS_HANDSHAKE_SECONDS = HANDSHAKE_SECONDS - 1.0
MAX_UNAUTHENTICATED = 64  # connections in their handshake at once; more are closed at once
REFUSAL_LOG_SECONDS = 60.0  # refused connections are logged at most this often, counted
SchedulerProxy = managers.MakeProxyType("SchedulerProxy", EXPOSED)  # type: ignore[attr-defined]


# -- answering a call later, from another thread -------------------------------------------

DEFERRED: Any = object()  # what a service method returns when it answers later (Answer)
_serving = threading.local()  # the Answer of the call this thread is serving


class Answer:
    """The answer to one call, sent by whichever thread has it (``answer(value)``,
    ``answer.fail(exc)``), once. A long-poll (``lease``, ``collect``) parks its Answer and
    returns DEFERRED; the thread that has the work or the outcome sends it itself: no
    hand-off to the waiting thread (a wake-up, and a fight for the GIL) on the path of
    every job. A peer gone meanwhile, or that takes nothing for SEND_SECONDS, is not an
    error here: its connection is shut down, and its own thread ends."""

    __slots__ = ("_conn", "_lock", "sent")

    def __init__(self, conn: connection.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.sent = False

    def __call__(self, value: Any) -> None:
        self._reply(("#RETURN", value))

    def fail(self, exc: Exception) -> None:
        self._reply(("#ERROR", exc))

    def _reply(self, msg: tuple[str, Any]) -> bool:
        """Send ``msg`` unless an answer went already; False if the connection broke."""
        with self._lock:
            if self.sent:
                return True
            self.sent = True
            try:
                self._conn.send(msg)  # pickles first: nothing is sent if that fails
            except OSError:  # gone, or stalled (SEND_SECONDS): maybe half sent, so cut
                _cut(self._conn)
                return False
            except Exception:  # a value that does not pickle (a bug: say so)
                try:
                    self._conn.send(("#TRACEBACK", traceback.format_exc()))
                except OSError:
                    _cut(self._conn)
                    return False
            return True


def answer_later() -> Answer | None:
    """In a service method called over the wire: the means to answer this call from any
    thread; the method then returns DEFERRED. None when called in-process (tests, the
    master itself): the method answers by returning, as usual."""
    return getattr(_serving, "answer", None)


def _cut(conn: connection.Connection) -> None:
    """Shut a connection down under whoever uses it: its reader sees end of file."""
    with contextlib.suppress(OSError, ValueError), socket.socket(
        fileno=os.dup(conn.fileno())
    ) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _send_timeout(conn: connection.Connection, seconds: float) -> None:
    """A send that can place no byte for ``seconds`` fails (OSError) instead of blocking."""
    timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _nodelay(conn: connection.Connection) -> None:
    """Send small writes at once (TCP_NODELAY). The stdlib writes a message's 4-byte header
    and, above 16 KiB, its body in two calls: with Nagle's algorithm on, the body then waits
    for the peer's delayed ACK of the header, 40 ms on Linux, on every large message."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _client(address: tuple[str, int], authkey: bytes | None = None) -> connection.Connection:
    conn = plain(connection.Client(address, authkey=authkey))
    _nodelay(conn)
    return conn


# The stdlib's pickle serializer over TCP_NODELAY sockets, for the server and every proxy.
SERIALIZER = "scheduler"
managers.listener_client[SERIALIZER] = (connection.Listener, _client)  # type: ignore[attr-defined]

_tls_lock = threading.Lock()
_tls_serializers: dict[tls.TLSConfig, tuple[str, tls.TLSServer]] = {}


def serializer(environ: Mapping[str, str] | None = None) -> tuple[str, tls.TLSServer | None]:
    """The manager serializer for connections made under ``environ`` (default: this process's):
    ours over TLS with the files SCHEDULER_TLS_* name, else the plain one. Each set of files
    is registered once per process; ConfigError if they are incomplete or unusable."""
    config = tls.TLSConfig.from_environ(environ)
    if config is None:
        return SERIALIZER, None
    with _tls_lock:
        if config not in _tls_serializers:
            name = f"{SERIALIZER}-tls-{len(_tls_serializers) + 1}"
            server = tls.register(config, name, handshake_seconds=TLS_HANDSHAKE_SECONDS)
            _tls_serializers[config] = (name, server)
        return _tls_serializers[config]


# -- roles: who may call what, by the role in the caller's verified certificate -------------

# Calls a worker certificate may make, with where the worker's name is among the arguments
# (None: no name); it must be the certificate's own name (CN).
WORKER_CALLS: dict[str, int | None] = {
    "register": 0, "lease": 0, "report": 0, "release": 0, "heartbeat": 0, "goodbye": 0,
    "mark": 2, "ping": None,
}  # fmt: skip
# Calls a client certificate may make: submit, wait, read, cancel; `scheduler verify`'s read
# (marks) and its faults (chaos: a client can run any code on every slave anyway); `scheduler
# prune` (it removes only finished jobs' records, as retention does on its own).
CLIENT_CALLS = frozenset({
    "submit", "collect", "watch", "get", "jobs", "cancel", "status", "ping", "marks", "chaos",
    "prune",
})  # fmt: skip
# Open to every certificate: the stdlib server's own requests that every proxy makes (connect,
# open the service, count references, serve a connection), and `refuse`, which only says no.
# The stdlib's others (shutdown, debug_info, number_of_objects) are the master's alone.
EVERY_ROLE = frozenset({
    "create", "incref", "decref", "accept_connection", "dummy", "get_methods", "refuse",
})  # fmt: skip


def _holder(name: str, role: str) -> str:
    if role in tls.ROLES:
        return f"{role} {name!r}"
    if role:
        return f"a certificate of role {role!r} ({name!r})"
    return f"a role-less certificate ({name!r})"


def _needed(method: str) -> str:
    roles = [r for r, calls in (("worker", WORKER_CALLS), ("client", CLIENT_CALLS))
             if method in calls]  # fmt: skip
    return f"a {' or '.join(roles)} certificate" if roles else "the master's certificate"


def refusal(
    identity: tuple[str, str], method: str, args: tuple = (), kwds: Mapping[str, Any] | None = None
) -> str | None:
    """Why the holder of ``identity`` (name, role) may not call ``method`` with these
    arguments, in one line for the caller; None if it may. The master's role may call all."""
    name, role = identity
    if role == "master" or method in EVERY_ROLE:
        return None
    if role == "client" and method in CLIENT_CALLS:
        return None
    if role == "worker" and method in WORKER_CALLS:
        at = WORKER_CALLS[method]
        if at is None:
            return None
        claimed = args[at] if len(args) > at else (kwds or {}).get("worker")
        if type(claimed) is str and claimed == name:
            return None
        return (f"{method} for worker {claimed!r} needs that worker's certificate; "
                f"this connection holds worker {name!r}")  # fmt: skip
    return f"{method} needs {_needed(method)}; this connection holds {_holder(name, role)}"


class _Guarded:
    """The connection ``Server.serve_client`` reads calls from, for a TLS peer: a call its
    certificate's role may not make is read as a call of the service's ``refuse``, which
    answers it with errors.Forbidden (the caller's own exception, not a traceback)."""

    def __init__(
        self,
        conn: connection.Connection,
        identity: tuple[str, str],
        forbidden: Callable[[connection.Connection, tuple[str, str], str], None],
    ) -> None:
        self._conn = conn
        self._identity = identity
        self._forbidden = forbidden
        self.send = conn.send
        self.close = conn.close

    def recv(self) -> Any:
        request = self._conn.recv()
        try:
            ident, method, args, kwds = request
        except (TypeError, ValueError):
            return request  # not a call: the stdlib answers with a traceback and calls nothing
        try:
            args, kwds = tuple(args), dict(kwds)
            why = refusal(self._identity, method, args, kwds)
        except Exception:
            why = f"a malformed call; this connection holds {_holder(*self._identity)}"
        if why is None:
            return ident, method, args, kwds
        self._forbidden(self._conn, self._identity, str(method))
        return ident, "refuse", (why,), {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _peer(conn: connection.Connection) -> str:
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            host, port = sock.getpeername()[:2]
            return f"{host}:{port}"
    except OSError:
        return "unknown peer"


class Refusals:
    """Counts refused connections (or calls) and logs them at most once a REFUSAL_LOG_SECONDS.

    A connection closed before it sent a byte (a port probe, a health check) is no
    attack and is only logged at debug level.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        what: str = "connection(s)",
        hint: str = "slaves and clients need the master's SCHEDULER_AUTHKEY",
    ) -> None:
        self._clock = clock
        self._what = what
        self._hint = hint
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

    def flush(self, force: bool = False) -> None:
        """Log what was counted, if the last line is old enough (or ``force``: stopping)."""
        with self._lock:
            recent = self._clock() - self._last < REFUSAL_LOG_SECONDS
            if not self._counts or (recent and not force):
                return
            counts, peers, self._counts, self._peers = self._counts, self._peers, {}, set()
            self._last = self._clock()
        what = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        log.warning("refused %d %s (%s) from %s; %s", sum(counts.values()), self._what, what,
                    ", ".join(sorted(peers)), self._hint)  # fmt: skip


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

    Over TLS (``tls`` set), after the handshakes, every request is checked against the role
    in the peer's certificate (``refusal``); calls refused are counted too (``forbidden``).
    """

    def __init__(
        self,
        registry: dict,
        address: tuple[str, int],
        authkey: bytes,
        serializer: str,
        tls_server: tls.TLSServer | None = None,
    ) -> None:
        super().__init__(registry, address, authkey, serializer)
        self.tls = tls_server
        hint = "slaves and clients need the master's SCHEDULER_AUTHKEY"
        if tls_server is not None:
            hint += " and a valid certificate of its CA (SCHEDULER_TLS_*)"
        self.refusals = Refusals(hint=hint)
        self.forbidden = Refusals(
            what="call(s)", hint="a certificate's role allows only its own calls (README: TLS)"
        )

    def cut_revoked(self) -> list[tuple[str, str]]:
        """Cut the open connections of revoked certificates; their (name, role), one per
        connection (none without TLS)."""
        return [] if self.tls is None else self.tls.cut_revoked()

    def flush(self, force: bool = False) -> None:
        """Log the refused connections and calls counted since the last line."""
        self.refusals.flush(force)
        self.forbidden.flush(force)

    def accepter(self) -> None:
        self._handshaking: OrderedDict[int, _Deadline] = OrderedDict()
        self._handshaking_lock = threading.Lock()
        while True:
            try:
                c = self.listener.accept()  # type: ignore[attr-defined]
                _nodelay(c)
                if self.tls is None:  # (over TLS each answer is sent by its own thread)
                    c = plain(c)  # the same object, sending with plain pickle
                    _send_timeout(c, SEND_SECONDS)
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

    def serve_client(self, conn: connection.Connection) -> None:
        """The stdlib's loop (requests of one connection, one at a time), but a method may
        answer later through ``answer_later()`` (then it returns DEFERRED and nothing is
        sent here); the connection's next request comes only after that answer. Over TLS
        ``answer_later()`` is None: every answer is sent by this thread."""
        recv = conn.recv
        id_to_obj = self.id_to_obj  # type: ignore[attr-defined]
        while not self.stop_event.is_set():  # type: ignore[attr-defined]
            methodname = obj = None
            answer = Answer(conn)
            msg: tuple[str, Any]
            try:
                request = recv()
                ident, methodname, args, kwds = request
                if ident not in id_to_obj:  # a proxy of an earlier master: Link._stale
                    raise KeyError(f"{ident!r} not in id_to_obj")
                obj, exposed, _ = id_to_obj[ident]
                if methodname not in exposed:
                    raise AttributeError(f"method {methodname!r} of {type(obj)!r} is not "
                                         f"in exposed={exposed!r}")  # fmt: skip
                function = getattr(obj, methodname)
                # not over TLS: OpenSSL allows no write to a connection while another thread
                # reads it (this one, waiting for the next call); the call waits in place
                _serving.answer = answer if self.tls is None else None
                try:
                    res = function(*args, **kwds)
                except Exception as e:
                    msg = ("#ERROR", e)
                else:
                    if res is DEFERRED:
                        continue
                    msg = ("#RETURN", res)
                finally:
                    _serving.answer = None
            except AttributeError:  # as the stdlib: __str__, __repr__, #GETVALUE
                try:
                    fallback: Any = self.fallback_mapping[methodname]  # type: ignore[index]
                    msg = ("#RETURN", fallback(self, conn, ident, obj, *args, **kwds))
                except Exception:
                    msg = ("#TRACEBACK", traceback.format_exc())
            except (EOFError, OSError):  # closed, or broken: as the stdlib, this thread ends
                sys.exit(0)
            except Exception:
                msg = ("#TRACEBACK", traceback.format_exc())
            if not answer._reply(msg):
                sys.exit(0)

    def _handle_request(self, c: connection.Connection, deadline: _Deadline) -> None:  # type: ignore[override]
        # Same as the stdlib's, except for the handshake's deadline, and that a failed one
        # (wrong key, garbage bytes, a silent peer, a port scanner) is counted, not logged
        # line by line, and the connection dropped quietly.
        try:
            connection.deliver_challenge(c, self.authkey)  # type: ignore[attr-defined]
            connection.answer_challenge(c, self.authkey)  # type: ignore[attr-defined]
            identity = tls.peer_identity(c)  # None without TLS: every call allowed
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
            why = None if identity is None else refusal(identity, funcname)
            msg: tuple[str, Any]
            if why is not None:
                self._forbid(c, identity, funcname)  # type: ignore[arg-type]
                msg = ("#ERROR", Forbidden(why))
            else:
                if identity is not None and funcname == "accept_connection":
                    c = _Guarded(c, identity, self._forbid)  # type: ignore[assignment]
                msg = ("#RETURN", getattr(self, funcname)(c, *args, **kwds))
        except Exception as exc:
            # a proxy made before a master restart releasing its reference is routine
            level = logging.DEBUG if funcname == "decref" else logging.WARNING
            log.log(level, "request %s from %s failed: %r", funcname, _peer(c), exc)
            msg = ("#TRACEBACK", traceback.format_exc())
        try:
            c.send(msg)
        except OSError:
            pass

    def _forbid(self, c: connection.Connection, identity: tuple[str, str], method: str) -> None:
        self.forbidden.note(f"{method} by {_holder(*identity)}", _peer(c))

    def _refused(self, c: connection.Connection, exc: BaseException, cut: str | None) -> None:
        peer = _peer(c)
        reason = None if cut is not None else tls.refusal_reason(exc)
        if reason is not None:
            self.refusals.note(reason, peer)
            if isinstance(exc, TimeoutError) and isinstance(c, tls.TLSConnection):
                tls.tell_plain_peer(c)  # most likely a peer without TLS, waiting for us
            return
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


def serve(
    service: object,
    address: tuple[str, int],
    authkey: bytes,
    environ: Mapping[str, str] | None = None,
) -> _Server:
    """Create (not start) the manager server publishing ``service``; over TLS if ``environ``
    (default: this process's) sets SCHEDULER_TLS_* (then ``server.tls`` is not None)."""
    MasterManager.register(
        "scheduler", callable=lambda: service, exposed=EXPOSED, proxytype=SchedulerProxy
    )
    name, tls_server = serializer(environ)
    try:
        # BaseManager.get_server() ignores _Server; build ours from the same registry
        return _Server(MasterManager._registry, address, authkey, name, tls_server)  # type: ignore[attr-defined]
    except OSError as exc:
        host, port = address
        raise ConnectError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "pick another SCHEDULER_BIND or stop what uses the port"
        ) from exc


def connect(
    address: tuple[str, int], authkey: bytes, environ: Mapping[str, str] | None = None
) -> Any:
    """Connect to the master and return a proxy of its service; over TLS if ``environ``
    (default: this process's) sets SCHEDULER_TLS_*. A refused certificate, or a master and
    us disagreeing on TLS, is tls.TLSRefused (an AuthError: retrying will not help).

    One certificate per process and master: the stdlib shares each thread's connection among
    all proxies of one address, whatever serializer made them.
    """
    host, port = address
    manager = ClientManager(address=address, authkey=authkey, serializer=serializer(environ)[0])
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
    except (AuthenticationError, AssertionError) as exc:
        if tls.is_plain_notice(exc):
            raise tls.TLSRefused(
                f"the master at {host}:{port} takes only TLS connections; set "
                "SCHEDULER_TLS_CA, SCHEDULER_TLS_CERT and SCHEDULER_TLS_KEY (files from "
                "'scheduler certs')"
            ) from None
        if isinstance(exc, AssertionError):  # the stdlib's check of the challenge's shape
            raise ConnectError(
                f"what answers at {host}:{port} is not a scheduler master (no key challenge); "
                "is SCHEDULER_MASTER right?"
            ) from exc
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

    A master that accepted us once and then refuses our certificate (revoked, expired) will
    not change its mind: from then on every call fails at once with that reason, without
    connecting, and ``on_refused`` (if set) hears of it once.
    """

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        stopping: Callable[[], bool] = lambda: False,
        patience: float | None = None,
        on_refused: Callable[[tls.TLSRefused], None] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._address = address
        self._authkey = authkey
        self._environ = environ  # where SCHEDULER_TLS_* come from (default: os.environ)
        self._stopping = stopping
        self._patience = patience
        self.on_refused = on_refused
        self._lock = threading.Lock()
        self._proxy: Any = None
        self._generation = 0
        self._refused: tls.TLSRefused | None = None
        self._refused_lock = threading.Lock()

    def call(self, method: str, *args: Any, retry: bool = True) -> Any:
        """Call a service method; with ``retry``, wait out a master restart and call again."""
        started, delay, attempt = time.monotonic(), 0.5, 0
        while True:
            if self._refused is not None:
                raise self._refusal()
            proxy, generation = self._current(retry)
            try:
                return getattr(proxy, method)(*args)
            except tls.TLSRefused as exc:  # this thread's own connection, opened by the stdlib
                self._drop(proxy, generation)
                raise self._refuse(exc) from exc
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
                return connect(self._address, self._authkey, self._environ)
            except tls.TLSRefused as exc:
                if not self._generation:  # never accepted: a setup problem, said by the caller
                    raise
                raise self._refuse(exc) from exc
            except AuthError:
                raise
            except ConnectError as exc:
                attempt += 1
                if not retry or self._given_up(started, attempt):
                    raise
                log.warning("%s; retrying in %.1fs (attempt %d)", exc, delay, attempt)
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    def _refuse(self, exc: tls.TLSRefused) -> Exception:
        """The master accepted us before and refuses our certificate now (revoked, expired):
        remember it, tell ``on_refused`` once; what the call that found out raises."""
        with self._refused_lock:
            first, self._refused = self._refused is None, self._refused or exc
        if self.on_refused is None:
            return exc
        if first:
            self.on_refused(exc)
        return self._refusal()

    def _refusal(self) -> ConnectError:
        """What a call fails with once the master refused our certificate."""
        if self.on_refused is not None:  # which said why, once
            return ConnectError("the master refused our certificate (said above); not retrying")
        return ConnectError(f"{self._refused}; not retrying")

    def _drop(self, proxy: Any, generation: int) -> None:
        forget_connection(proxy)
        with self._lock:
            if generation == self._generation:
                self._proxy = None

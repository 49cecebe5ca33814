"""Mutual TLS under ``multiprocessing.managers``, on the standard library's ``ssl`` alone.

Every manager connection becomes a TLS 1.3 connection on which both ends show a certificate
of the cluster's CA (``scheduler certs``); the master also checks the peer against the
revocation list, reloaded when the file changes. The manager's framed messages and its
authkey handshake then run inside TLS unchanged, so a peer without TLS, with a certificate
from another CA, expired or revoked, fails in the TLS handshake: before any byte of it is
read as a message, let alone unpickled.

Wiring (``register`` does it): the stdlib looks up ``listener_client[serializer]`` and calls
``Listener(address=..., backlog=16)`` on the server side and ``Client(address, authkey=...)``
for every proxy; ``TLSServer.listen`` and ``connect`` (with its context bound) fit those.

``accept()`` does not handshake: the stdlib calls it from a single accepter thread, where a
silent peer would hold up every other one. The handshake runs, under its own deadline, on
the connection's first use (the server's ``deliver_challenge``) in the per-connection thread,
or when ``TLSConnection.handshake()`` is called.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import logging
import os
import re
import socket
import ssl
import stat
import struct
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing import connection, managers
from pathlib import Path
from typing import Any

from .errors import AuthError, ConfigError
from .settings import TLS_CA, TLS_CERT, TLS_CRL, TLS_KEY

log = logging.getLogger(__name__)

ENV_CA, ENV_CERT, ENV_KEY, ENV_CRL = TLS_CA, TLS_CERT, TLS_KEY, TLS_CRL
CA_FILE = "ca.pem"  # the layout of a `scheduler certs` directory (see scheduler.certs)
CRL_FILE = "crl.pem"
ROLES = ("master", "worker", "client")
HANDSHAKE_SECONDS = 5.0  # TLS handshake (and, on the client, the authkey one) must end by then
RECORD = 16 * 1024  # the largest plaintext one TLS record holds

__all__ = [
    "PLAIN_NOTICE", "TLSConfig", "TLSConnection", "TLSListener", "TLSRefused", "TLSServer",
    "check_key_file", "client_context", "connect", "is_plain_notice", "peer_identity",
    "refusal_reason", "register", "server_context", "tell_plain_peer",
]  # fmt: skip


class TLSRefused(AuthError):
    """The master refused our certificate, does not speak TLS, or is not a master: a setup
    problem that retrying will not fix (an AuthError, so the link does not retry it)."""


def check_key_file(path: Path) -> None:
    """Refuse a private key that group or others can read, as the authkey file is refused."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"key file {path} is readable by others (mode {mode:04o}); "
                          f"run: chmod 600 {path}")  # fmt: skip


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSConfig:
    """This node's files: the CA, its certificate and key, and the revocation list if any."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None

    def __post_init__(self) -> None:
        for path in (self.ca, self.cert, self.key, self.crl):
            if path is not None and not path.is_file():
                raise ConfigError(f"TLS file {path} does not exist or is not a file")
        check_key_file(self.key)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TLSConfig | None:
        """From ``SCHEDULER_TLS_*``: None when none of the three is set; all three, or an error.
        ``SCHEDULER_TLS_CRL`` defaults to crl.pem beside the CA, if that exists."""
        environ = os.environ if environ is None else environ
        names = (ENV_CA, ENV_CERT, ENV_KEY)
        values = {n: environ.get(n, "").strip() for n in names}
        missing = [n for n in names if not values[n]]
        if len(missing) == len(names):
            return None
        if missing:
            raise ConfigError(f"{' and '.join(missing)} not set; set {', '.join(names)} "
                              "together (from 'scheduler certs'), or none of them")  # fmt: skip
        ca = Path(values[ENV_CA])
        crl = environ.get(ENV_CRL, "").strip()
        beside = ca.parent / CRL_FILE
        return cls(ca, Path(values[ENV_CERT]), Path(values[ENV_KEY]),
                   Path(crl) if crl else (beside if beside.exists() else None))  # fmt: skip

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], name: str) -> TLSConfig:
        """NAME's files in a ``scheduler certs`` directory."""
        root = Path(directory)
        crl = root / CRL_FILE
        return cls(root / CA_FILE, root / f"{name}.pem", root / f"{name}.key",
                   crl if crl.exists() else None)  # fmt: skip


def _tls13(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _load(ctx: ssl.SSLContext, config: TLSConfig) -> ssl.SSLContext:
    try:
        ctx.load_cert_chain(config.cert, config.key)
        ctx.load_verify_locations(cafile=config.ca)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"cannot use the TLS files {config.cert}, {config.key}, {config.ca}: "
                          f"{getattr(exc, 'reason', None) or exc}") from None  # fmt: skip
    return ctx


def server_context(config: TLSConfig) -> ssl.SSLContext:
    """The master's: TLS 1.3, a client certificate of the CA required, checked against the CRL."""
    ctx = _load(_tls13(ssl.PROTOCOL_TLS_SERVER), config)
    ctx.num_tickets = 0  # no resumption: every connection shows its certificate
    if config.crl is not None:
        try:
            ctx.load_verify_locations(cafile=config.crl)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot use the revocation list {config.crl}: "
                              f"{getattr(exc, 'reason', None) or exc}") from None  # fmt: skip
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(config: TLSConfig) -> ssl.SSLContext:
    """A slave's or client's: TLS 1.3, the master's certificate must come from the CA.

    Host names are not checked: ``connect`` requires the peer's role to be master instead,
    which only the CA can grant, and which holds through SSH tunnels and NAT alike.
    """
    ctx = _tls13(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _load(ctx, config)


# -- the connection -------------------------------------------------------------------------


def _identity(cert: dict[str, Any]) -> tuple[str, str]:
    subject = dict(pair for rdn in cert.get("subject", ()) for pair in rdn)
    return subject.get("commonName", ""), subject.get("organizationalUnitName", "")


class TLSConnection(connection.Connection):
    """A ``multiprocessing`` connection over an ``ssl.SSLSocket``: the same framing
    (the stdlib's ``_send_bytes``/``_recv_bytes``) on top of our ``_send``/``_recv``.

    ``poll()`` answers for bytes TLS has already decrypted (``pending()``) or that it read
    ahead; ``multiprocessing.connection.wait()`` on the file descriptor alone cannot.
    """

    def __init__(
        self,
        sock: ssl.SSLSocket,
        server: TLSServer | None = None,
        handshake_seconds: float = HANDSHAKE_SECONDS,
    ) -> None:
        super().__init__(sock.fileno())
        self._sock = sock
        self._server = server
        self._seconds = handshake_seconds
        self._ready = False
        self._failed = False
        self._inbox = bytearray()  # read ahead by poll() and _recv_bytes()
        self._chunk = memoryview(bytearray(RECORD))  # one TLS record's plaintext at most
        self._eof = False
        self.identity: tuple[str, str] | None = None  # (name, role) once shaken hands
        self.serial: int | None = None
        self.cut_off = False  # by TLSServer.cut_revoked: its peer's certificate was revoked

    def handshake(self) -> None:
        """Do the TLS handshake now, if not done; raises ssl.SSLError or TimeoutError."""
        if self._ready:
            return
        if self._failed:  # the stdlib server tries again to send its traceback: not 2 deadlines
            raise ConnectionAbortedError("the TLS handshake failed")
        self._sock.settimeout(self._seconds)
        try:
            self._sock.do_handshake()
        except BaseException:
            self._failed = True
            raise
        self._sock.settimeout(None)
        cert = self._sock.getpeercert() or {}
        self.identity = _identity(cert)
        self.serial = int(str(cert.get("serialNumber", "0")), 16)
        self._ready = True
        if self._server is not None:
            self._server._track(self)

    def cut(self) -> None:
        """Shut the socket down under whoever uses it; their next read sees end of file."""
        self.cut_off = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _close(self, _close: object = None) -> None:
        if self._server is not None:
            self._server._forget(self)
        self._sock.close()

    # Reads and writes go to the SSL object under the SSLSocket (``_sslobj``, there since
    # Python 3.7): the Python wrapper's checks cost 40 % of what TLS adds to a small message.
    # On a blocking socket a write is whole (the stdlib does not enable partial writes).

    def _send(self, buf: Any, write: object = None) -> None:
        if not self._ready:
            self.handshake()
        self._sock._sslobj.write(buf)  # type: ignore[attr-defined]

    def _read(self, view: memoryview) -> int:
        try:
            return int(self._sock._sslobj.read(len(view), view))  # type: ignore[attr-defined]
        except ssl.SSLEOFError:  # closed without TLS's close_notify: end of file all the same
            return 0

    def _recv(self, size: int, read: object = None) -> io.BytesIO:
        if not self._ready:
            self.handshake()
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        if self._inbox:
            got = min(size, len(self._inbox))
            view[:got] = self._inbox[:got]
            del self._inbox[:got]
        while got < size:
            n = 0 if self._eof else self._read(view[got:])
            if n == 0:
                if got == 0:
                    raise EOFError
                raise OSError("got end of file during message")
            got += n
        return io.BytesIO(data)

    def _recv_bytes(self, maxsize: int | None = None) -> io.BytesIO:
        # A small message (the usual call or reply) arrives as one TLS record, header and
        # body together: take it with one read of the SSL object, not the stdlib's two.
        if maxsize is None and not self._inbox and not self._eof:
            if not self._ready:
                self.handshake()
            n = self._read(self._chunk)
            if n == 0:
                self._eof = True
            elif n >= 4:
                size = struct.unpack_from("!i", self._chunk)[0]
                if 0 <= size == n - 4:
                    return io.BytesIO(self._chunk[4:n])
            self._inbox += self._chunk[:n]
        return super()._recv_bytes(maxsize)  # type: ignore[misc,no-any-return]

    def _poll(self, timeout: float | None) -> bool:
        if not self._ready:
            self.handshake()
        if self._inbox or self._eof or self._sock.pending():
            return True
        self._sock.settimeout(None if timeout is None else max(timeout, 0.0))
        try:
            chunk = self._sock.recv(64 * 1024)
        except (TimeoutError, ssl.SSLWantReadError):
            return False
        finally:
            self._sock.settimeout(None)
        self._eof = not chunk
        self._inbox += chunk
        return True


# A plain manager client speaks only once the server's challenge has come, and a TLS server
# waits for the client to speak first: without this, a peer not set up for TLS would wait
# forever. A master that takes only TLS sends it, unencrypted and framed as a manager message,
# to a peer that said nothing within the handshake time; it can never pass for a challenge.
PLAIN_NOTICE = b"#TLS-REQUIRED# this master takes only mutual TLS connections"


def tell_plain_peer(conn: TLSConnection) -> None:
    """Send PLAIN_NOTICE on the raw socket under ``conn`` (best effort; it is being dropped)."""
    with contextlib.suppress(OSError):
        os.write(conn.fileno(), struct.pack("!i", len(PLAIN_NOTICE)) + PLAIN_NOTICE)


def is_plain_notice(exc: BaseException) -> bool:
    """Whether a plain client's failed key handshake read PLAIN_NOTICE instead of a challenge."""
    return PLAIN_NOTICE.split(b" ", 1)[0].decode() in str(exc)


def peer_identity(conn: connection.Connection) -> tuple[str, str] | None:
    """(name, role) from the peer's verified certificate (CN, OU); None on a plain connection."""
    if not isinstance(conn, TLSConnection):
        return None
    conn.handshake()
    return conn.identity


def _nodelay(sock: socket.socket) -> socket.socket:
    # the stdlib writes a large message's header and body apart; Nagle would hold the body
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- the server side ------------------------------------------------------------------------


class TLSListener:
    """What ``managers.Server`` wants of a Listener: ``accept()``, ``address``, ``close()``."""

    def __init__(self, address: tuple[str, int], backlog: int = 16, *, server: TLSServer):
        self._server = server
        self._sock = socket.create_server(address, backlog=backlog)
        self.address = self._sock.getsockname()
        self.last_accepted: Any = None

    def accept(self) -> TLSConnection:
        sock, self.last_accepted = self._sock.accept()
        try:
            tls = self._server.context().wrap_socket(
                _nodelay(sock), server_side=True, do_handshake_on_connect=False
            )
        except BaseException:
            sock.close()
            raise
        return TLSConnection(tls, self._server, self._server.handshake_seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        self._sock.close()

    def __enter__(self) -> TLSListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    with contextlib.suppress(OSError):
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size
    return None


class TLSServer:
    """The master's side: its context, rebuilt when the CRL file changes (no restart), and
    the live connections with their peers' certificates, so revoked ones can be cut."""

    def __init__(self, config: TLSConfig, handshake_seconds: float = HANDSHAKE_SECONDS):
        self.config = config
        self.handshake_seconds = handshake_seconds
        self._lock = threading.Lock()
        self._ctx: ssl.SSLContext | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._revoked: frozenset[int] = frozenset()
        self._live: weakref.WeakSet[TLSConnection] = weakref.WeakSet()

    def listen(self, address: tuple[str, int], backlog: int = 16) -> TLSListener:
        """The ``Listener`` for ``managers.listener_client``; bad TLS files fail here, at start."""
        self.context()
        return TLSListener(address, backlog, server=self)

    def context(self) -> ssl.SSLContext:
        """The server context; rebuilt if the CRL changed since the last call. A CRL that
        cannot be read keeps the previous context (the last good list), with an error logged."""
        stamp = _stamp(self.config.crl)
        with self._lock:
            if self._ctx is not None and stamp == self._stamp:
                return self._ctx
            try:
                ctx = server_context(self.config)
                revoked = _crl_serials(self.config.crl) if self.config.crl else frozenset()
            except (ConfigError, ValueError) as exc:
                if self._ctx is None:
                    raise
                log.error("revocation list %s not reloaded: %s; keeping the previous one",
                          self.config.crl, exc)  # fmt: skip
                self._stamp = stamp
                return self._ctx
            self._ctx, self._stamp, self._revoked = ctx, stamp, revoked
            return ctx

    def cut_revoked(self) -> list[tuple[str, str]]:
        """Reload the CRL if it changed and cut every open connection whose peer's certificate
        it lists (once each); returns their (name, role), one per connection cut now."""
        self.context()
        with self._lock:
            doomed = [c for c in self._live if c.serial in self._revoked and not c.cut_off]
        for conn in doomed:
            log.debug("cutting the connection of %s (%s): its certificate was revoked",
                      *(conn.identity or ("?", "?")))  # fmt: skip
            conn.cut()
        return [c.identity for c in doomed if c.identity is not None]

    def _track(self, conn: TLSConnection) -> None:
        with self._lock:
            self._live.add(conn)
            revoked = conn.serial in self._revoked  # revoked while it was shaking hands
        if revoked:
            conn.cut()

    def _forget(self, conn: TLSConnection) -> None:
        with self._lock:
            self._live.discard(conn)


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----(.+?)-----END X509 CRL-----", re.S)


def _der(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start, end) of the contents of the DER element at ``pos``."""
    tag, length, pos = data[pos], data[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        length, pos = int.from_bytes(data[pos : pos + count], "big"), pos + count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    items = []
    while start < end:
        item = _der(data, start)
        items.append(item)
        start = item[2]
    return items


def _crl_serials(path: Path) -> frozenset[int]:
    """The serials a PEM CRL lists; parsed by hand, as ``ssl`` cannot. OpenSSL checks the
    list's signature on every handshake; this copy only tells which open connections to cut."""
    serials = set()
    try:
        for block in _PEM_CRL.findall(path.read_bytes()):
            der = base64.b64decode(block)
            _, start, end = _der(der, 0)  # CertificateList
            _, start, end = _der(der, start)  # TBSCertList
            after_time = False
            for tag, s, e in _children(der, start, end):
                if tag in (0x17, 0x18):  # UTCTime, GeneralizedTime: this/next update
                    after_time = True
                elif tag == 0x30 and after_time:  # revokedCertificates
                    for _, entry, _ in _children(der, s, e):
                        _, ss, se = _der(der, entry)  # userCertificate INTEGER
                        serials.add(int.from_bytes(der[ss:se], "big", signed=True))
                    break
    except (OSError, IndexError, binascii.Error) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return frozenset(serials)


_NO_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
           "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD", "RECORD_TOO_LARGE"}  # fmt: skip
_OLD_TLS = {"UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "NO_PROTOCOLS_AVAILABLE",
            "TLSV1_ALERT_PROTOCOL_VERSION"}  # fmt: skip
_VERIFY_REASONS = {  # X509_V_ERR_* codes
    23: "revoked certificate",
    10: "expired certificate",
    9: "certificate not yet valid",
    2: "certificate from another CA",
    18: "certificate from another CA",
    19: "certificate from another CA",
    20: "certificate from another CA",
    21: "certificate from another CA",
    3: "no usable revocation list on the master",
    11: "no usable revocation list on the master",
    12: "no usable revocation list on the master",
}


def refusal_reason(exc: BaseException) -> str | None:
    """A short, countable reason for a failed server-side TLS handshake; None if ``exc`` is
    not a TLS failure (the caller's own classification applies)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "certificate not accepted")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "closed during the TLS handshake"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _NO_TLS:
            return "no TLS"
        if reason in _OLD_TLS:
            return "TLS below 1.3"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate"
        return "bad TLS handshake"
    if isinstance(exc, TimeoutError):
        return "no TLS handshake in time"
    return None


# -- the client side ------------------------------------------------------------------------


_THEIR_VERDICT = {
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "revoked",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired",
    "TLSV1_ALERT_UNKNOWN_CA": "from another CA",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "we sent none",
}


def _client_message(where: str, exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the master at {where} has a certificate our CA does not accept "
                f"({exc.verify_message}); give both sides certificates from the same "
                "'scheduler certs' directory")  # fmt: skip
    reason = exc.reason or type(exc).__name__
    if reason in _NO_TLS:
        return (f"the master at {where} does not speak TLS; "
                "set SCHEDULER_TLS_* on both sides or neither")
    if reason in _OLD_TLS:
        return f"the master at {where} and we share no TLS version (we need 1.3): {reason}"
    if "ALERT" in reason:
        why = _THEIR_VERDICT.get(reason, "revoked or from another CA")
        return (f"the master at {where} refused our certificate ({why}): {reason}; check "
                "SCHEDULER_TLS_CERT, or get a new one ('scheduler certs issue')")  # fmt: skip
    return f"TLS handshake with the master at {where} failed: {reason}"


def connect(
    address: tuple[str, int],
    authkey: bytes | None = None,
    *,
    context: ssl.SSLContext,
    expect_role: str | None = "master",
    timeout: float = HANDSHAKE_SECONDS,
) -> TLSConnection:
    """Open a TLS connection, check the peer is a master, and answer the authkey handshake
    inside it: the ``Client(address, authkey=...)`` of ``managers.listener_client``.

    A refusal by either side is one ``TLSRefused`` line; an unreachable master is the
    ``OSError`` a plain connection gives.
    """
    host, port = address[:2]
    where = f"{host}:{port}"
    sock = _nodelay(socket.create_connection(address, timeout=timeout))
    tls = context.wrap_socket(sock, do_handshake_on_connect=False)
    conn = TLSConnection(tls, handshake_seconds=timeout)
    try:
        conn.handshake()
        name, role = conn.identity or ("", "")
        if expect_role is not None and role != expect_role:
            raise TLSRefused(f"the peer at {where} holds a {role or 'role-less'} certificate "
                             f"({name!r}), not a {expect_role}'s; is SCHEDULER_MASTER right?")
        if authkey is not None:
            # in TLS 1.3 the master judges our certificate after our side of the handshake
            # ended: its verdict arrives with the first read, here, inside the deadline
            tls.settimeout(timeout)
            connection.answer_challenge(conn, authkey)  # type: ignore[attr-defined]
            connection.deliver_challenge(conn, authkey)  # type: ignore[attr-defined]
            tls.settimeout(None)
    except ssl.SSLError as exc:
        conn.close()
        if isinstance(exc, ssl.SSLEOFError):
            raise  # closed under us: transient, an OSError like any dropped connection
        raise TLSRefused(_client_message(where, exc)) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def register(config: TLSConfig, serializer: str = "tls", **server_options: Any) -> TLSServer:
    """Make ``serializer`` a TLS transport for ``multiprocessing.managers`` in this process:
    ``BaseManager(..., serializer=serializer)`` and ``Server(..., serializer)`` then use it.
    Returns the server side (for ``cut_revoked``); it loads nothing until it listens."""
    server = TLSServer(config, **server_options)
    client = functools.partial(connect, context=client_context(config))
    managers.listener_client[serializer] = (server.listen, client)  # type: ignore[attr-defined]
    return server

"""Everything that talks to paramiko: connections, host-key checks, trust, and forwarders.

One reused SSH connection per host. The Docker SDK reaches a remote engine through a local
unix socket whose every connection becomes an SSH channel running ``docker system dial-stdio``
(what ``ssh://`` does), so the inventory's user, key and known_hosts apply and host keys are
checked here, in one place. The master's port is reached the same way, via direct-tcpip,
and so is a probe of whether a host reaches an address (``reach``).
"""

from __future__ import annotations

import logging
import os
import selectors
import shlex
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import paramiko

from .config import Host, SSHLookup, SSHTarget
from .errors import DeployError, HostError, HostKeyError

log = logging.getLogger(__name__)
WINDOW = 2**27  # a large SSH window: images stream through these channels
CHUNK = 2**16
MAX_CONNECTIONS = 8  # per host
CONNECT_FAILED = 2  # SSH_OPEN_CONNECT_FAILED: the far side could not open the TCP connection


def config_lookup(path: str | None) -> SSHLookup:
    """``ssh_config`` lookups as ``ssh`` does them, from ``path`` (no file: no settings)."""
    parsed = paramiko.SSHConfig()
    if path and Path(path).exists():
        try:
            parsed = paramiko.SSHConfig.from_path(path)
        except (OSError, paramiko.ConfigParseError) as exc:
            raise DeployError(
                f"ssh config {path}", f"cannot be read: {exc}", "fix the file"
            ) from exc

    def lookup(alias: str) -> Mapping[str, Any]:
        return dict(parsed.lookup(alias))

    return lookup


def known_hosts_entry(target: SSHTarget) -> str:
    return target.hostname if target.port == 22 else f"[{target.hostname}]:{target.port}"


def dial_command(docker_host: str | None) -> str:
    """The remote command that turns an SSH channel into a connection to the engine."""
    argv = ["docker"]
    if docker_host:
        argv += ["-H", docker_host if "://" in docker_host else f"unix://{docker_host}"]
    return shlex.join([*argv, "system", "dial-stdio"])


class _Policy(paramiko.MissingHostKeyPolicy):
    """Unknown host keys are refused with their fingerprint, or appended when ``accept_new``."""

    def __init__(self, host: Host, accept_new: bool) -> None:
        self.host = host
        self.accept_new = accept_new

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        assert self.host.ssh is not None
        if not self.accept_new:
            raise unknown_key_error(self.host, key)
        append_known_host(self.host.ssh, key)
        log.warning("host %s: trusted new host key %s %s (--accept-new-host-keys)",
                    self.host.name, key.get_name(), key.fingerprint)  # fmt: skip


def unknown_key_error(host: Host, key: paramiko.PKey) -> HostKeyError:
    assert host.ssh is not None
    fp = key.fingerprint
    return HostKeyError(
        host.name, host.ssh.address,
        f"host key not in {host.ssh.known_hosts} ({key.get_name()} {fp})",
        f"check the fingerprint with the host's owner, then run "
        f"'deployctl hosts trust {host.name} --fingerprint {fp}' (or pass --accept-new-host-keys)",
        fp, changed=False,
    )  # fmt: skip


def changed_key_error(host: Host, got: paramiko.PKey) -> HostKeyError:
    assert host.ssh is not None
    return HostKeyError(
        host.name, host.ssh.address,
        f"HOST KEY HAS CHANGED (now {got.get_name()} {got.fingerprint}); "
        "this can be a man-in-the-middle attack, so the host is refused",
        f"if the host was really reinstalled, remove the old key with "
        f"'ssh-keygen -f {host.ssh.known_hosts} -R {shlex.quote(known_hosts_entry(host.ssh))}' "
        f"and trust it again",
        got.fingerprint, changed=True,
    )  # fmt: skip


def append_known_host(target: SSHTarget, key: paramiko.PKey) -> None:
    path = Path(target.known_hosts)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = f"{known_hosts_entry(target)} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(line)


def _known(target: SSHTarget) -> dict[str, paramiko.PKey]:
    keys = paramiko.HostKeys()
    if Path(target.known_hosts).exists():
        keys.load(target.known_hosts)
    found = keys.lookup(known_hosts_entry(target))
    return dict(found) if found else {}


def _socket(host: Host) -> Any:
    target = host.ssh
    assert target is not None
    if target.proxy_command:
        return paramiko.ProxyCommand(target.proxy_command)
    try:
        return socket.create_connection((target.hostname, target.port), target.connect_timeout)
    except OSError as exc:
        raise _unreachable(host, exc) from exc


def _unreachable(host: Host, exc: BaseException) -> HostError:
    assert host.ssh is not None
    why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError | socket.timeout):
        why = f"no answer within {host.ssh.connect_timeout:g}s"
    return HostError(host.name, host.ssh.address, f"cannot connect over SSH: {why}",
                     "is the host up and sshd listening? check hosts[].address/port")  # fmt: skip


def scan_key(host: Host) -> paramiko.PKey:
    """The key the host presents, preferring the type already in known_hosts, without logging in."""
    assert host.ssh is not None
    transport = paramiko.Transport(_socket(host))
    try:
        known = list(_known(host.ssh))
        options = transport.get_security_options()
        options.key_types = known + [t for t in options.key_types if t not in known]
        transport.start_client(timeout=host.ssh.connect_timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise _unreachable(host, exc) from exc
    finally:
        transport.close()


def trust(host: Host, fingerprint: str | None, confirm: Callable[[str], bool]) -> str:
    """Add the host's key to known_hosts after checking ``fingerprint`` or asking ``confirm``."""
    if host.ssh is None:
        return f"host {host.name}: this machine's engine, no SSH key to trust"
    key = scan_key(host)
    known = _known(host.ssh)
    if key.get_name() in known:
        if known[key.get_name()] == key:
            return f"host {host.name}: key {key.get_name()} {key.fingerprint} already trusted"
        raise changed_key_error(host, key)
    if fingerprint is not None and fingerprint != key.fingerprint:
        raise HostKeyError(host.name, host.ssh.address,
                           f"presents {key.fingerprint}, not the fingerprint {fingerprint} given",
                           "do not trust it; ask the host's owner for the right key",
                           key.fingerprint, changed=False)  # fmt: skip
    question = f"host {host.name} ({host.ssh.address}) key {key.get_name()} {key.fingerprint}"
    if fingerprint is None and not confirm(question):
        raise DeployError(f"host {host.name}", "not trusted", "answered no")
    append_known_host(host.ssh, key)
    return f"host {host.name}: trusted {key.get_name()} {key.fingerprint} in {host.ssh.known_hosts}"


def connect(host: Host, accept_new: bool = False) -> paramiko.SSHClient:
    """Log in to ``host`` with its host key verified; errors become HostError/HostKeyError."""
    target = host.ssh
    assert target is not None
    client = paramiko.SSHClient()
    if Path(target.known_hosts).exists():
        client.load_host_keys(target.known_hosts)
    client.set_missing_host_key_policy(_Policy(host, accept_new))
    try:
        client.connect(
            target.hostname, target.port, username=target.user,
            key_filename=list(target.identity_files) or None,
            look_for_keys=not target.identity_files, sock=_socket(host),
            timeout=target.connect_timeout, banner_timeout=target.connect_timeout,
            auth_timeout=target.connect_timeout,
        )  # fmt: skip
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise changed_key_error(host, exc.key) from exc
    except paramiko.AuthenticationException as exc:
        client.close()
        raise HostError(
            host.name,
            target.address,
            f"login as {target.user!r} refused: {exc}",
            "check hosts[].user and identity_file, or the key in ~/.ssh/config",
        ) from exc
    except (paramiko.SSHException, OSError, EOFError) as exc:
        client.close()
        raise _unreachable(host, exc) from exc
    except BaseException:
        client.close()
        raise
    transport = client.get_transport()
    assert transport is not None
    transport.default_window_size = WINDOW
    transport.set_keepalive(15)
    return client


def http_request(path: str, port: int) -> bytes:
    """A minimal HTTP/1.0 GET naming a loopback host, so a loopback-only server answers."""
    return (f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            "Accept: */*\r\n\r\n").encode("ascii")  # fmt: skip


def parse_http_response(raw: bytes, host: Host, where: str) -> tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.x response read until the server closed."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise _not_served(host, where, "the answer is not HTTP")
    return int(parts[1]), body


def _not_served(host: Host, where: str, why: str) -> HostError:
    address = host.ssh.address if host.ssh else ""
    return HostError(host.name, address, f"no HTTP answer from {where} there: {why}",
                     "is the master running with SCHEDULER_HTTP set (default 127.0.0.1:8889)? "
                     "see 'deployctl status' and 'deployctl logs master'")  # fmt: skip


class Forwarder:
    """A local listening socket; each accepted connection is pumped through a new SSH channel."""

    def __init__(self, listener: socket.socket, open_channel: Callable[[], paramiko.Channel]):
        self.listener = listener
        self.open_channel = open_channel
        self.last_error = ""
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="ssh-forward").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            channel = self.open_channel()
        except (paramiko.SSHException, OSError, EOFError, DeployError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            conn.close()
            return
        try:
            _pump(conn, channel)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("forwarded connection ended: %r", exc)  # the other end went away
        finally:
            err = channel.recv_stderr(4096) if channel.recv_stderr_ready() else b""
            if err.strip():
                self.last_error = err.decode(errors="replace").strip()
            channel.close()
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()


def _pump(conn: socket.socket, channel: paramiko.Channel) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(conn, selectors.EVENT_READ)
        sel.register(channel, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select(timeout=5):
                if key.fileobj is conn:
                    data = conn.recv(CHUNK)
                    if not data:
                        channel.shutdown_write()
                        sel.unregister(conn)
                        continue
                    channel.sendall(data)
                else:
                    data = channel.recv(CHUNK)
                    if not data:
                        return
                    conn.sendall(data)
            if channel.closed or channel.exit_status_ready() and not channel.recv_ready():
                return


class SSHPool:
    """Connections per host, opened on first use and shared by threads; ``close()`` ends all.

    Channels are multiplexed over one connection; a second one is opened only when sshd
    refuses another session on the first (``MaxSessions``, 10 by default).
    """

    def __init__(self, accept_new: bool = False) -> None:
        self.accept_new = accept_new
        self._clients: dict[tuple[str, int], paramiko.SSHClient] = {}
        self._forwarders: list[Forwarder] = []
        self._tunnels: dict[tuple[str, str, int, int], tuple[str, int]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._closed = False
        self._dir = tempfile.mkdtemp(prefix="deployctl-")

    def client(self, host: Host, slot: int = 0) -> paramiko.SSHClient:
        with self._guard:
            self._check_open(host)
            lock = self._locks.setdefault(host.name, threading.Lock())
        with lock:
            client = self._clients.get((host.name, slot))
            transport = client.get_transport() if client else None
            if client is None or transport is None or not transport.is_active():
                client = connect(host, self.accept_new)
                with self._guard:
                    if self._closed:
                        client.close()
                    self._check_open(host)
                    self._clients[(host.name, slot)] = client
            return client

    def _check_open(self, host: Host) -> None:
        """Refuse new connections once closing (threads still streaming end quietly)."""
        if self._closed:
            raise HostError(host.name, host.ssh.address if host.ssh else "", "connections closed")

    def open(self, host: Host, opener: Callable[[paramiko.Transport], paramiko.Channel]) -> Any:
        """A new channel on the first connection that accepts one."""
        for slot in range(MAX_CONNECTIONS):
            transport = self.client(host, slot).get_transport()
            assert transport is not None
            try:
                return opener(transport)
            except paramiko.ChannelException as exc:
                if exc.code == CONNECT_FAILED:
                    raise
                continue  # this connection is at sshd's session limit; try the next one
        raise paramiko.SSHException(f"no channel after {MAX_CONNECTIONS} connections")

    def docker_socket(self, host: Host) -> tuple[str, Forwarder]:
        """A local unix socket that reaches the host's engine (``docker system dial-stdio``).

        Logs in first, so SSH and host-key errors come out as they are.
        """
        self.client(host)
        command = dial_command(host.docker_host)

        def session(transport: paramiko.Transport) -> paramiko.Channel:
            channel = transport.open_session()
            channel.exec_command(command)
            return channel

        def open_channel() -> paramiko.Channel:
            return self.open(host, session)

        with self._guard:
            self._check_open(host)
            path = os.path.join(self._dir, f"{len(self._forwarders)}.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(16)
            forwarder = Forwarder(listener, open_channel)
            self._forwarders.append(forwarder)
        return path, forwarder

    def tunnel(self, host: Host, address: str, port: int, local_port: int = 0
               ) -> tuple[str, int]:  # fmt: skip
        """A local TCP port (on 127.0.0.1 only; any free one unless ``local_port``) that
        reaches ``address:port`` as seen from ``host`` (made once per local port)."""
        key = (host.name, address, port, local_port)
        if key in self._tunnels:
            return self._tunnels[key]

        def open_channel() -> paramiko.Channel:
            return self.open(host, lambda t: t.open_channel("direct-tcpip", (address, port),
                                                            ("127.0.0.1", 0)))  # fmt: skip

        with self._guard:
            self._check_open(host)
            if key not in self._tunnels:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    listener.bind(("127.0.0.1", local_port))
                except OSError as exc:
                    listener.close()
                    raise DeployError(f"local port {local_port}", f"cannot listen: "
                                      f"{exc.strerror or exc}", "choose another port or "
                                      "leave --port out for a free one") from exc  # fmt: skip
                listener.listen(16)
                self._forwarders.append(Forwarder(listener, open_channel))
                self._tunnels[key] = listener.getsockname()[:2]
            return self._tunnels[key]

    def http_get(self, host: Host, address: str, port: int, path: str,
                 timeout: float = 10.0) -> tuple[int, bytes]:  # fmt: skip
        """``GET path`` from ``address:port`` as seen from ``host``: (status, body).

        One direct-tcpip channel (a plain socket for this machine); the request names a
        loopback ``Host``, which a server bound to loopback requires. Nothing listening
        there is a HostError saying so.
        """
        where = f"{address}:{port}"
        if host.local:
            try:
                conn: Any = socket.create_connection((address, port), timeout)
            except OSError as exc:
                raise _not_served(host, where, exc.strerror or str(exc)) from exc
        else:
            try:
                conn = self.open(host, lambda t: t.open_channel(
                    "direct-tcpip", (address, port), ("127.0.0.1", 0), timeout=timeout))
            except paramiko.ChannelException as exc:
                raise _not_served(host, where, (exc.text or "connect failed").lower()) from exc
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise _unreachable(host, exc) from exc
        try:
            conn.settimeout(timeout)
            conn.sendall(http_request(path, port))
            chunks = []
            while data := conn.recv(CHUNK):
                chunks.append(data)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise _not_served(host, where, f"connection lost: {exc or type(exc).__name__}"
                              ) from exc  # fmt: skip
        finally:
            conn.close()
        return parse_http_response(b"".join(chunks), host, where)

    def reach(self, host: Host, address: str, port: int, timeout: float) -> str | None:
        """None when ``host`` can open a TCP connection to ``address:port``, else why not.

        The connection closes without a byte sent; the master takes that for a probe.
        """
        if host.local:
            try:
                socket.create_connection((address, port), timeout).close()
                return None
            except OSError as exc:
                return exc.strerror or str(exc) or type(exc).__name__
        transport = self.client(host).get_transport()
        assert transport is not None
        try:
            channel = transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 0),
                                             timeout=timeout)  # fmt: skip
        except paramiko.ChannelException as exc:
            if exc.code != CONNECT_FAILED:  # sshd forbids forwarding: nothing to learn here
                log.warning("host %s: cannot check that it reaches %s:%d (%s)", host.name,
                            address, port, exc.text)  # fmt: skip
                return None
            return exc.text.lower() if exc.text else "connect failed"
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise _unreachable(host, exc) from exc
        channel.close()
        return None

    def close(self) -> None:
        """End every connection; threads still using the pool get HostError from now on."""
        with self._guard:
            self._closed = True
            forwarders, clients = list(self._forwarders), list(self._clients.values())
            self._clients.clear()
        for forwarder in forwarders:
            forwarder.close()
        for client in clients:
            client.close()
        shutil.rmtree(self._dir, ignore_errors=True)

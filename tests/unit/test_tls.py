"""Mutual TLS under the manager protocol: real sockets on 127.0.0.1, real handshakes."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import pickle
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from multiprocessing import connection, managers
from pathlib import Path

import pytest

from scheduler import certs, tls
from scheduler.errors import ConfigError

KEY = b"k" * 20
FORK = multiprocessing.get_context("fork")


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a test registers in the stdlib's serializer table goes with it."""
    monkeypatch.setattr(managers, "listener_client", dict(managers.listener_client))


def _pki(root: Path, *nodes: tuple[str, str]) -> Path:
    certs.init(root)
    for name, role in nodes:
        certs.issue(root, name, role, addresses=["127.0.0.1"])
    return root


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    _pki(root, ("master", "master"), ("worker-1", "worker"), ("client-1", "client"))
    ten_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    certs.issue(root, "old", "worker", days=1, not_before=ten_days_ago)  # expired 9 days ago
    return root


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pki(tmp_path_factory.mktemp("foreign"), ("master", "master"), ("worker-1", "worker"))


def client_ctx(root: Path, name: str) -> ssl.SSLContext:
    return tls.client_context(tls.TLSConfig.from_dir(root, name))


class EchoServer:
    """A TLS listener whose connections shake hands, pass the authkey challenge and echo;
    what each peer turned out to be goes to ``peers``, each refusal's reason to ``refusals``."""

    def __init__(self, root: Path, name: str = "master", handshake_seconds: float = 5.0):
        self.tls = tls.TLSServer(tls.TLSConfig.from_dir(root, name), handshake_seconds)
        self.listener = self.tls.listen(("127.0.0.1", 0))
        self.address = self.listener.address
        self.peers: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.refusals: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: tls.TLSConnection) -> None:
        with conn:
            try:
                conn.handshake()
            except OSError as exc:
                self.refusals.put(tls.refusal_reason(exc))
                return
            self.peers.put(tls.peer_identity(conn))
            try:
                connection.deliver_challenge(conn, KEY)
                connection.answer_challenge(conn, KEY)
                while True:
                    message = conn.recv_bytes()
                    if message == b"two in one record":
                        frames = b"".join(struct.pack("!i", len(m)) + m for m in (b"one", b"two"))
                        conn._send(frames)
                    else:
                        conn.send_bytes(message)
            except (EOFError, OSError):
                return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo(pki: Path) -> Iterator[EchoServer]:
    server = EchoServer(pki)
    yield server
    server.close()


def test_round_trip_and_identities(echo: EchoServer, pki: Path) -> None:
    with tls.connect(echo.address, KEY, context=client_ctx(pki, "worker-1")) as conn:
        conn.send_bytes(b"hello")
        assert conn.recv_bytes() == b"hello"
        assert tls.peer_identity(conn) == ("master", "master")
    assert echo.peers.get(timeout=5) == ("worker-1", "worker")
    plain_a, plain_b = connection.Pipe()
    assert tls.peer_identity(plain_a) is None
    plain_a.close(), plain_b.close()


def test_poll_counts_bytes_tls_already_decrypted(echo: EchoServer, pki: Path) -> None:
    with tls.connect(echo.address, KEY, context=client_ctx(pki, "client-1")) as conn:
        assert not conn.poll(0)
        conn.send_bytes(b"two in one record")
        assert conn.recv_bytes() == b"one"
        # the second message came decrypted with the first (the same TLS record): it waits
        # in the connection, the socket is empty, and poll() must still say it is there
        assert select.select([conn.fileno()], [], [], 0)[0] == []
        assert conn.poll(0)
        assert conn.recv_bytes() == b"two"
        assert not conn.poll(0)
        conn.send_bytes(b"later")
        assert conn.poll(5)
        assert conn.recv_bytes() == b"later"


def test_messages_of_every_size_and_framing_arrive_whole(echo: EchoServer, pki: Path) -> None:
    # one TLS record per small message (read at once), several records per large one, and
    # the stdlib's 8-byte header past 2 GiB is not needed here: sizes around a record's end
    sizes = [0, 1, 3, 4, 5, 100, tls.RECORD - 5, tls.RECORD - 4, tls.RECORD, tls.RECORD + 1,
             3 * tls.RECORD + 7, 1_000_000]  # fmt: skip
    with tls.connect(echo.address, KEY, context=client_ctx(pki, "worker-1")) as conn:
        for size in sizes:
            message = os.urandom(size)
            conn.send_bytes(message)
            assert conn.recv_bytes() == message
        conn.send_bytes(b"two in one record")
        assert (conn.recv_bytes(), conn.recv_bytes()) == (b"one", b"two")
        conn.send_bytes(b"x" * 100)
        assert conn.recv_bytes(1000) == b"x" * 100  # the auth handshake's bounded read


def test_a_worker_certificate_cannot_pose_as_the_master(pki: Path) -> None:
    server = EchoServer(pki, name="worker-1")
    try:
        with pytest.raises(tls.TLSRefused, match="not a master's|does not accept"):
            tls.connect(server.address, KEY, context=client_ctx(pki, "client-1"))
    finally:
        server.close()


# -- refusals: each one a single line on the client, a countable reason on the server -----


def test_foreign_ca_is_refused_both_ways(echo: EchoServer, pki: Path, foreign: Path) -> None:
    stranger = tls.client_context(tls.TLSConfig(
        ca=pki / "ca.pem", cert=foreign / "worker-1.pem", key=foreign / "worker-1.key",
    ))  # fmt: skip  (it trusts our master, but its own certificate is another CA's)
    with pytest.raises(tls.TLSRefused, match=r"refused our certificate \(from another CA\)"):
        tls.connect(echo.address, KEY, context=stranger)
    assert echo.refusals.get(timeout=5) == "certificate from another CA"
    assert echo.peers.empty()

    impostor = EchoServer(foreign)
    try:
        with pytest.raises(tls.TLSRefused, match="certificate our CA does not accept"):
            tls.connect(impostor.address, KEY, context=client_ctx(pki, "worker-1"))
    finally:
        impostor.close()


def test_expired_certificate_is_refused(echo: EchoServer, pki: Path) -> None:
    with pytest.raises(tls.TLSRefused, match=r"refused our certificate \(expired\)"):
        tls.connect(echo.address, KEY, context=client_ctx(pki, "old"))
    assert echo.refusals.get(timeout=5) == "expired certificate"


def test_no_certificate_and_tls12_are_refused(echo: EchoServer, pki: Path) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(pki / "ca.pem")
    with pytest.raises(tls.TLSRefused, match="we sent none"):
        tls.connect(echo.address, KEY, context=bare)
    assert echo.refusals.get(timeout=5) == "no client certificate"

    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(pki / "ca.pem")
    old.load_cert_chain(pki / "worker-1.pem", pki / "worker-1.key")
    with socket.create_connection(echo.address) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw)
    assert echo.refusals.get(timeout=5) == "TLS below 1.3"
    assert echo.peers.empty()


def test_silent_and_plaintext_peers_are_refused(pki: Path) -> None:
    server = EchoServer(pki, handshake_seconds=0.2)
    try:
        with socket.create_connection(server.address) as silent:
            assert server.refusals.get(timeout=5) == "no TLS handshake in time"
            assert silent.recv(100) == b""
        with socket.create_connection(server.address) as plain:
            plain.sendall(struct.pack("!i", 5) + b"hello")
            assert server.refusals.get(timeout=5) == "no TLS"
    finally:
        server.close()


def test_tls_client_to_a_plain_master_is_one_line(pki: Path) -> None:
    plain = connection.Listener(("127.0.0.1", 0), authkey=KEY)
    failed = threading.Event()

    def accept() -> None:
        try:
            plain.accept()
        except OSError:
            failed.set()

    threading.Thread(target=accept, daemon=True).start()
    try:
        with pytest.raises(tls.TLSRefused, match="does not speak TLS; set SCHEDULER_TLS_"):
            tls.connect(plain.address, KEY, context=client_ctx(pki, "worker-1"))
        assert failed.wait(5)  # and the plain master read no message from us
    finally:
        plain.close()


def test_revocation_applies_without_restart_and_cuts_open_connections(tmp_path: Path) -> None:
    root = _pki(tmp_path, ("master", "master"), ("worker-1", "worker"), ("worker-2", "worker"))
    server = EchoServer(root)
    try:
        before = tls.connect(server.address, KEY, context=client_ctx(root, "worker-1"))
        before.send_bytes(b"ping")
        assert before.recv_bytes() == b"ping"
        assert server.tls.cut_revoked() == []

        certs.revoke(root, "worker-1")

        with pytest.raises(tls.TLSRefused, match=r"refused our certificate \(revoked\)"):
            tls.connect(server.address, KEY, context=client_ctx(root, "worker-1"))
        assert server.refusals.get(timeout=5) == "revoked certificate"
        assert server.tls.cut_revoked() == [("worker-1", "worker")]
        with pytest.raises((EOFError, OSError)):
            before.recv_bytes()
        before.close()
        with tls.connect(server.address, KEY, context=client_ctx(root, "worker-2")) as other:
            other.send_bytes(b"still here")
            assert other.recv_bytes() == b"still here"
    finally:
        server.close()


# -- the stdlib manager over TLS ------------------------------------------------------------

CALLED = FORK.Event()  # a method of the published object ran, in the server process
UNPICKLED = FORK.Event()  # the server unpickled a Trap


def _sprung() -> None:
    UNPICKLED.set()


class Trap:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return _sprung, ()


class Box:
    def add(self, a: int, b: int) -> int:
        CALLED.set()
        return a + b


class BoxManager(managers.BaseManager):
    pass


BoxManager.register("box", callable=Box)


@pytest.fixture
def tls_manager(pki: Path) -> Iterator[BoxManager]:
    """A manager server in a forked process, with the master's certificate; this process
    then takes a worker's for its proxies under the same serializer name."""
    CALLED.clear(), UNPICKLED.clear()
    tls.register(tls.TLSConfig.from_dir(pki, "master"), "tls-test", handshake_seconds=0.3)
    manager = BoxManager(address=("127.0.0.1", 0), authkey=KEY, serializer="tls-test", ctx=FORK)
    manager.start()
    tls.register(tls.TLSConfig.from_dir(pki, "worker-1"), "tls-test")
    yield manager
    manager.shutdown()


def test_manager_call_over_tls(tls_manager: BoxManager) -> None:
    box = tls_manager.box()  # type: ignore[attr-defined]
    assert box.add(2, 3) == 5
    assert CALLED.is_set()


def test_plain_peers_never_reach_unpickling(tls_manager: BoxManager) -> None:
    pickle.loads(pickle.dumps(Trap()))  # the trap works...
    assert UNPICKLED.is_set()
    UNPICKLED.clear()  # ...and is set again

    call = pickle.dumps(("#CALL", Trap(), "create", ("box",), {}))
    with socket.create_connection(tls_manager.address) as raw:
        raw.sendall(struct.pack("!i", len(call)) + call)
        try:
            reply = raw.recv(1000)
        except ConnectionResetError:
            reply = b""
        assert b"#CHALLENGE#" not in reply

    plain = BoxManager(address=tls_manager.address, authkey=KEY, serializer="pickle")
    with pytest.raises((EOFError, OSError)):
        plain.connect()

    assert not UNPICKLED.is_set() and not CALLED.is_set()
    assert tls_manager.box().add(1, 1) == 2  # type: ignore[attr-defined]
    assert CALLED.is_set() and not UNPICKLED.is_set()


# -- configuration ----------------------------------------------------------------------------


def test_config_from_environ(pki: Path, tmp_path: Path) -> None:
    assert tls.TLSConfig.from_environ({}) is None
    env = {"SCHEDULER_TLS_CA": str(pki / "ca.pem"), "SCHEDULER_TLS_CERT": str(pki / "master.pem")}
    with pytest.raises(ConfigError, match="^SCHEDULER_TLS_KEY not set"):
        tls.TLSConfig.from_environ(env)
    env["SCHEDULER_TLS_KEY"] = str(pki / "master.key")
    config = tls.TLSConfig.from_environ(env)
    assert config is not None and config.crl == pki / "crl.pem"

    loose = tmp_path / "loose.key"
    loose.write_bytes((pki / "master.key").read_bytes())
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match=f"mode 0644\\); run: chmod 600 {loose}$"):
        tls.TLSConfig.from_environ({**env, "SCHEDULER_TLS_KEY": str(loose)})
    with pytest.raises(ConfigError, match="does not exist"):
        tls.TLSConfig.from_environ({**env, "SCHEDULER_TLS_CRL": str(tmp_path / "none.pem")})
    assert os.stat(pki / "master.key").st_mode & 0o777 == 0o600


def test_tls_variables_are_known_settings() -> None:
    from scheduler import settings

    env = {tls.ENV_CA: "a", tls.ENV_CERT: "b", tls.ENV_KEY: "c", tls.ENV_CRL: "d"}
    assert settings.unknown_variables(env) == []
    assert set(settings.TLS_VARIABLES) == set(env)
    assert settings.unknown_variables({"SCHEDULER_TLS_CERTS": "x"}) == [
        "SCHEDULER_TLS_CERTS is not a setting and is ignored; did you mean SCHEDULER_TLS_CERT?"
    ]

"""The master link: talking to the running master through the scheduler's client.

The one module that imports the scheduler's client; scheduler errors become MasterError here,
and nowhere else. The master is reached directly when an authenticated connection to its
advertised address succeeds quickly from here, else through a tunnel to its host's loopback
(made by the SSH adapter and handed in as ``Tunnel``). Reaching it never costs a refused
handshake in the master's log: the only connections made are real, authenticated ones.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from scheduler import AuthError, Client, ConnectError, SchedulerError, top
from scheduler import verify as chaos
from scheduler.tls import TLSRefused

from .config import Config, Host
from .errors import MasterError
from .keyfile import Secret

DIRECT_TIMEOUT = 3.0  # how long a direct connection may take before the tunnel is used
LOOPBACK = "127.0.0.1"  # the master binds 0.0.0.0 or 127.0.0.1: its host reaches it here
LOOK = "see 'deployctl status' and 'deployctl logs master'"
Connect = Callable[..., Client]  # called as Client(master=..., authkey=...)
Tunnel = Callable[[Host, str, int], tuple[str, int]]  # (host, address there, port) -> local
# deployctl's own (CA, certificate, key) files, or None without TLS; called once per open
ClientTLS = Callable[[], tuple[Path, Path, Path] | None]
TLS_VARS = ("SCHEDULER_TLS_CA", "SCHEDULER_TLS_CERT", "SCHEDULER_TLS_KEY")


class MasterLink:
    """A command's one client of the master: opened on first use, reused, closed at the end.

    Opening a scheduler client makes several manager connections, each with its handshake,
    so ``up`` does not open one to ask who is busy, one to wait and one for the table.
    """

    def __init__(self, config: Config, tunnel: Tunnel, connect: Connect = Client,
                 direct_timeout: float = DIRECT_TIMEOUT, tls: ClientTLS | None = None,
                 environ: MutableMapping[str, str] = os.environ) -> None:  # fmt: skip
        self.config = config
        self._tunnel = tunnel
        self._raw_connect = connect
        self._tls = tls
        self._tls_env: dict[str, str] | None = None  # SCHEDULER_TLS_* paths, once known
        self._environ = environ
        self._direct_timeout = direct_timeout
        self._client: Client | None = None
        self._route: str | None = None  # the endpoint that worked

    @property
    def subject(self) -> str:
        return f"master on {self.config.master.host} ({self.config.master.advertise})"

    def _connect(self, **kwargs: Any) -> Client:
        """A client of the master; with TLS, showing deployctl's certificate (by its paths:
        the scheduler reads the files, no key passes through here). The scheduler's
        transport takes its certificate from ``SCHEDULER_TLS_*`` in the environment of the
        process that connects, so they are set in this one's (deployctl talks to one master)."""
        if self._tls_env:
            self._environ.update(self._tls_env)
        return self._raw_connect(**kwargs)

    def open(self, key: Secret) -> Client:
        if self._client is None:
            if self._tls_env is None:
                files = self._tls() if self._tls is not None else None
                self._tls_env = dict(zip(TLS_VARS, map(str, files), strict=True)) if files else {}
            self._client = self._open(key)
        return self._client

    def _open(self, key: Secret) -> Client:
        master, host = self.config.master, self.config.master_host
        if self._route is not None:
            return self._connect(master=self._route, authkey=key.reveal())
        if host.local:
            route = f"{LOOPBACK}:{master.port}"
        elif master.tunnel == "never":
            route = master.advertise
        else:
            client = self._direct(key) if master.tunnel == "auto" else None
            if client is not None:
                self._route = master.advertise
                return client
            local, port = self._tunnel(host, LOOPBACK, master.port)
            route = f"{local}:{port}"
        client = self._connect(master=route, authkey=key.reveal())
        self._route = route  # only a route that worked is kept (a master starting refuses)
        return client

    def _direct(self, key: Secret) -> Client | None:
        """A client on the advertised address if one opens within the deadline, else None.

        A wrong key is raised (a tunnel would not help); an attempt that outlives the
        deadline is left to its thread, which closes what it gets too late.
        """
        box: list[Any] = []  # a client, or the exception its attempt raised
        lock = threading.Lock()

        def attempt() -> None:
            try:
                got: Any = self._connect(
                    master=self.config.master.advertise, authkey=key.reveal())  # fmt: skip
            except BaseException as exc:  # handed to the caller below
                got = exc
            with lock:
                box.append(got)
                late = len(box) > 1
            if late and not isinstance(got, BaseException):
                with contextlib.suppress(SchedulerError, OSError, EOFError):
                    got.close()

        worker = threading.Thread(target=attempt, daemon=True, name="master-direct")
        worker.start()
        worker.join(self._direct_timeout)
        with lock:
            first = box[0] if box else None
            box.append(TimeoutError())  # anything arriving after this is late
        if isinstance(first, AuthError):
            raise first
        return None if first is None or isinstance(first, BaseException) else first

    @contextlib.contextmanager
    def use(self, key: Secret) -> Iterator[Client]:
        """The client, opened if needed; a scheduler error inside becomes MasterError."""
        try:
            yield self.open(key)
        except SchedulerError as exc:
            self.reset()
            raise MasterError(self.subject, _clean(str(exc), key), LOOK) from exc
        except (OSError, EOFError) as exc:
            self.reset()
            lost = f"connection lost: {exc or type(exc).__name__}"
            raise MasterError(self.subject, lost, LOOK) from exc

    def wait_ready(
        self, key: Secret, names: Sequence[str], timeout: float,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, Any]:  # fmt: skip
        """Wait until the master answers and every worker in ``names`` has registered."""
        deadline = clock() + timeout
        while True:
            try:
                client = self.open(key)
                return wait_registered(client, names, max(0.0, deadline - clock()), clock, sleep)
            except TLSRefused as exc:
                self.reset()
                raise MasterError(
                    f"master on {self.config.master.host}", f"TLS: {_clean(str(exc), key)}",
                    "master.tls and the running master disagree, or deployctl's certificate "
                    f"is not of its CA: 'deployctl up' replaces it ({self.config.certs_dir})",
                ) from exc  # fmt: skip
            except AuthError as exc:
                self.reset()
                raise MasterError(
                    f"master on {self.config.master.host}", "refuses the authkey",
                    "the running master has another key: 'deployctl down' "
                    "then 'deployctl up' restarts it with this one",
                ) from exc  # fmt: skip
            except ConnectError as exc:
                self.reset()
                if clock() >= deadline:
                    raise MasterError(
                        self.subject, f"does not answer after {timeout:g}s: "
                        f"{_clean(str(exc), key)}",
                        "see 'deployctl logs master' (port in use? wrong master.advertise?)",
                    ) from exc  # fmt: skip
                sleep(0.25)

    def verify(self, key: Secret, kill_slave: Callable[[dict[str, Any]], None],
               crash_master: Callable[[], None] | None, jobs: int | None,
               seconds: float | None, say: Callable[[str], None]) -> chaos.Report:  # fmt: skip
        """The scheduler's chaos run (``scheduler.verify``) on this master, with deployctl's
        own ways to kill a worker and crash the master."""
        with self.use(key) as client:
            return chaos.run(client, jobs=jobs, seconds=seconds, kill_slave=kill_slave,
                             restart_master=crash_master is not None,
                             crash_master=crash_master, say=say)  # fmt: skip

    def top(self, key: Secret, interval: float, once: bool) -> int:
        """The scheduler's live terminal view (``scheduler.top``) of this master."""
        with self.use(key) as client:
            return top.run(client, interval=interval, once=once)

    def reset(self) -> None:
        """Close the client; the next use opens another (say, once the master was replaced)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(SchedulerError, OSError, EOFError):
                client.close()

    close = reset


def _clean(text: str, key: Secret) -> str:
    return text.replace(key.reveal(), "********")


def busy_workers(status: dict[str, Any]) -> dict[str, int]:
    """Worker name -> number of jobs it runs, from the master's status."""
    return {w["name"]: len(w.get("running") or ()) for w in status.get("workers", ())}


def wait_registered(
    c: Client, names: Sequence[str], timeout: float,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:  # fmt: skip
    """Poll the master until every worker in ``names`` is registered; return the last status."""
    deadline = clock() + timeout
    while True:
        status = c.status()
        missing = missing_workers(status, names)
        if not missing:
            return status
        if clock() >= deadline:
            raise MasterError(
                "cluster",
                f"worker(s) not registered with the master after "
                f"{timeout:g}s: {', '.join(missing)}",
                "see 'deployctl logs worker' for why they cannot connect",
            )
        sleep(0.25)


def missing_workers(status: dict[str, Any], names: Sequence[str]) -> list[str]:
    have = {w["name"] for w in status.get("workers", ()) if not w.get("draining")}
    return sorted(set(names) - have)

"""Talking to the running master through the scheduler's client (directly or over SSH).

Scheduler errors become MasterError here, and nowhere else.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from scheduler import AuthError, Client, ConnectError, SchedulerError

from .config import Config
from .errors import MasterError
from .keyfile import Secret
from .ssh import SSHPool

PROBE_TIMEOUT = 2.0
LOOK = "see 'deployctl status' and 'deployctl logs master'"
Connect = Callable[..., Client]  # called as Client(master=..., authkey=...)
Probe = Callable[[str, int], bool]


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), PROBE_TIMEOUT):
            return True
    except OSError:
        return False


class MasterLink:
    """A command's one client of the master: opened on first use, reused, closed at the end.

    Opening a scheduler client makes several manager connections, each with its handshake,
    so ``up`` no longer opens one to ask who is busy, one to wait and one for the table.
    The master is reached directly when its port answers here, else through an SSH tunnel;
    once the port has answered it is not probed again (each probe is a refused handshake in
    the master's log).
    """

    def __init__(
        self, config: Config, pool: SSHPool, connect: Connect = Client, probe: Probe = _reachable
    ) -> None:
        self.config = config
        self.pool = pool
        self._connect = connect
        self._probe = probe
        self._client: Client | None = None
        self._direct = False

    @property
    def subject(self) -> str:
        return f"master on {self.config.master.host} ({self.config.master.advertise})"

    def endpoint(self) -> str:
        """``host:port`` at which this machine reaches the master: direct, or an SSH tunnel."""
        master = self.config.master
        address, _, port = master.advertise.rpartition(":")
        if not self._direct:
            self._direct = master.tunnel == "never" or self.config.master_host.local or (
                master.tunnel == "auto" and self._probe(address, int(port)))  # fmt: skip
        if self._direct:
            return master.advertise
        local, local_port = self.pool.tunnel(self.config.master_host, address, int(port))
        return f"{local}:{local_port}"

    def open(self, key: Secret) -> Client:
        if self._client is None:
            self._client = self._connect(master=self.endpoint(), authkey=key.reveal())
        return self._client

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

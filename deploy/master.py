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

from .authkey import Secret
from .config import Config
from .errors import MasterError
from .ssh import SSHPool

PROBE_TIMEOUT = 2.0


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def endpoint(config: Config, pool: SSHPool) -> str:
    """``host:port`` at which this machine reaches the master: direct, or through an SSH tunnel."""
    address, _, port = config.master.advertise.rpartition(":")
    host = config.master_host
    direct = config.master.tunnel == "never" or host.local or (
        config.master.tunnel == "auto" and _reachable(address, int(port)))  # fmt: skip
    if direct:
        return config.master.advertise
    local, local_port = pool.tunnel(host, address, int(port))
    return f"{local}:{local_port}"


@contextlib.contextmanager
def client(config: Config, pool: SSHPool, key: Secret) -> Iterator[Client]:
    """A scheduler client on the master; any scheduler error inside becomes MasterError."""
    where = endpoint(config, pool)
    try:
        with Client(master=where, authkey=key.reveal()) as c:
            yield c
    except SchedulerError as exc:
        raise MasterError(
            f"master on {config.master.host} ({config.master.advertise})",
            _clean(str(exc), key),
            "see 'deployctl status' and 'deployctl logs master'",
        ) from exc
    except (OSError, EOFError) as exc:
        raise MasterError(
            f"master on {config.master.host} ({config.master.advertise})",
            f"connection lost: {exc or type(exc).__name__}",
            "see 'deployctl status' and 'deployctl logs master'",
        ) from exc


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


def wait_ready(
    config: Config, pool: SSHPool, key: Secret, names: Sequence[str], timeout: float,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:  # fmt: skip
    """Wait until the master answers and every worker in ``names`` has registered."""
    deadline = clock() + timeout
    while True:
        try:
            with Client(master=endpoint(config, pool), authkey=key.reveal()) as c:
                return wait_registered(c, names, max(0.0, deadline - clock()), clock, sleep)
        except AuthError as exc:
            raise MasterError(
                f"master on {config.master.host}",
                "refuses the authkey",
                "the running master has another key: 'deployctl down' "
                "then 'deployctl up' restarts it with this one",
            ) from exc
        except ConnectError as exc:
            if clock() >= deadline:
                raise MasterError(
                    f"master on {config.master.host} ({config.master.advertise})",
                    f"does not answer after {timeout:g}s: {_clean(str(exc), key)}",
                    "see 'deployctl logs master' (port in use? wrong master.advertise?)",
                ) from exc
            sleep(0.5)

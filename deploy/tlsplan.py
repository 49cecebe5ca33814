"""Which certificates to issue, and what a container's TLS volume holds. Pure: no files, no clock.

One certificate per container, named as the container (a worker's name is its certificate's
name), and one for deployctl itself (role client). A certificate is issued when it is
missing, revoked, of another role, or expires within the renewal window (30 days on ``up``);
its serial enters the container's spec digest, so a new one replaces exactly the containers
it belongs to.
"""

from __future__ import annotations

import datetime as dt
import io
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .config import Config
from .specs import (
    MASTER,
    WORKER,
    TLSMount,
    client_name,
    master_name,
    tls_volume,
)  # fmt: skip

RENEW_WITHIN = dt.timedelta(days=30)  # `up` re-issues a certificate that expires sooner
CLIENT = "client"
CONTAINER_UID = 10001  # the images' `scheduler` user (deploy/images/common/install.sh)
UNISSUED = "unissued"  # the serial of a certificate a dry run would issue


@dataclass(frozen=True)
class Held:
    """A certificate in the cluster's CA directory, as ``scheduler certs list`` reads it."""

    name: str
    role: str
    serial: int
    not_after: dt.datetime
    revoked: bool


@dataclass(frozen=True)
class Wanted:
    """A certificate some container (or deployctl) needs: its name, role and addresses."""

    name: str
    role: str
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Issue:
    """A certificate to issue now, and why (shown on stderr and in dry runs)."""

    wanted: Wanted
    reason: str

    def describe(self) -> str:
        return f"certificate {self.wanted.name} ({self.wanted.role}): {self.reason}"


@dataclass(frozen=True)
class TLSFile:
    """One file for a container's TLS volume. Its bytes may be a private key: never shown."""

    name: str
    data: bytes
    mode: int

    def __repr__(self) -> str:
        return f"TLSFile({self.name!r}, <{len(self.data)} bytes>, mode={self.mode:o})"


def master_addresses(config: Config) -> tuple[str, ...]:
    """The master's SANs: its host's name and address as the inventory gives them, the
    advertised address, and loopback (deployctl's tunnel, the health check)."""
    host = config.master_host
    advertise = config.master.advertise.rpartition(":")[0]
    found: list[str] = []
    for value in (host.name.split(":")[0], host.address, advertise, "127.0.0.1"):
        if value and value not in found:
            found.append(value)
    return tuple(found)


def wanted_master(config: Config) -> Wanted:
    return Wanted(master_name(config.cluster), MASTER, master_addresses(config))


def wanted_worker(name: str) -> Wanted:
    return Wanted(name, WORKER)


def wanted_client(config: Config) -> Wanted:
    return Wanted(client_name(config.cluster), CLIENT)


def wanted_for(config: Config, name: str, role: str) -> Wanted:
    """The certificate of the container ``name`` of ``role``."""
    return wanted_master(config) if role == MASTER else wanted_worker(name)


def why_issue(wanted: Wanted, held: Held | None, now: dt.datetime,
              renew_within: dt.timedelta) -> str | None:  # fmt: skip
    """Why ``wanted`` needs a new certificate, or None when the one held will do."""
    if held is None:
        return "new"
    if held.revoked:
        return "revoked"
    if held.role != wanted.role:
        return f"was issued as {held.role or 'no role'}"
    left = held.not_after - now
    if left <= dt.timedelta(0):
        return "expired"
    if left <= renew_within:
        return f"expires in {left.days} day(s)"
    return None


def to_issue(wanted: Iterable[Wanted], held: Mapping[str, Held], now: dt.datetime,
             renew_within: dt.timedelta = RENEW_WITHIN) -> list[Issue]:  # fmt: skip
    """The certificates to issue, each once, in the order wanted."""
    out: dict[str, Issue] = {}
    for w in wanted:
        reason = why_issue(w, held.get(w.name), now, renew_within)
        if reason is not None and w.name not in out:
            out[w.name] = Issue(w, reason)
    return list(out.values())


def mount(name: str, role: str, held: Mapping[str, Held]) -> TLSMount:
    """The TLS volume of container ``name``, holding its certificate as it is in ``held``
    (a placeholder serial when it is not issued yet: a dry run)."""
    cert = held.get(name)
    serial = f"{cert.serial:x}" if cert is not None and not cert.revoked else UNISSUED
    return TLSMount(tls_volume(name), name, serial, crl=role == MASTER)


def archive(files: Sequence[TLSFile], mtime: float, uid: int = CONTAINER_UID) -> bytes:
    """A tar of ``files`` owned by the containers' user, with their modes (keys 0400), for the
    engine to unpack into a TLS volume."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.name)
            info.size, info.mode, info.mtime = len(f.data), f.mode, mtime
            info.uid = info.gid = uid
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(f.data))
    return out.getvalue()


__all__ = ["Held", "Issue", "TLSFile", "Wanted", "archive", "mount", "to_issue", "why_issue"]

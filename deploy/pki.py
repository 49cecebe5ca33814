"""The cluster's CA directory on this machine, through ``scheduler.certs``: the only module of
deploy that imports it (and so, indirectly, ``cryptography``).

The directory (``cluster.certs_dir``, 0700) holds the CA, the revocation list and every
certificate deployctl issued, keys 0600. Errors of the certs library become DeployError here.
Key bytes leave this module only inside ``TLSFile`` (whose repr hides them), on their way
into a container's TLS volume.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from scheduler import certs
from scheduler.errors import SchedulerError

from .errors import DeployError
from .specs import CA_FILE, CRL_FILE, TLSMount
from .tlsplan import Held, Issue, TLSFile

CA_KEY_FILE = certs.CA_KEY_FILE
KEY_MODE, CERT_MODE = 0o400, 0o444  # in a container's volume (owned by the container's user)


@contextlib.contextmanager
def _translated(where: Path) -> Iterator[None]:
    try:
        yield
    except SchedulerError as exc:  # CertsError; the key-mode check's ConfigError
        raise DeployError(f"certificates in {where}", str(exc),
                          "see 'deployctl init' and 'scheduler certs list'") from exc  # fmt: skip


def has_ca(directory: Path) -> bool:
    return (directory / CA_FILE).exists() or (directory / CA_KEY_FILE).exists()


def init(directory: Path) -> Path:
    """Make the CA in ``directory``; an existing one is never overwritten."""
    if has_ca(directory):
        raise DeployError(f"certificates in {directory}", "already hold a CA; it is kept",
                          "remove the directory yourself only if no cluster uses it")  # fmt: skip
    with _translated(directory):
        return certs.init(directory)


def require_ca(directory: Path) -> None:
    if not has_ca(directory):
        raise DeployError(f"certificates in {directory}", "no CA there",
                          "run 'deployctl init' (or 'deployctl up', which makes it)")  # fmt: skip


def held(directory: Path) -> dict[str, Held]:
    """Every certificate in the directory, by name."""
    with _translated(directory):
        found = certs.list_certs(directory)
    return {c.name: Held(c.name, c.role, c.serial, c.not_after, c.revoked) for c in found}


def issue(directory: Path, issues: Sequence[Issue], days: int = certs.NODE_DAYS
          ) -> dict[str, Held]:  # fmt: skip
    """Issue each certificate; return every certificate held afterwards."""
    with _translated(directory):
        for item in issues:
            certs.issue(directory, item.wanted.name, item.wanted.role, days=days,
                        addresses=list(item.wanted.addresses))  # fmt: skip
    return held(directory)


def revoke(directory: Path, name: str) -> list[int]:
    """Revoke every certificate issued as ``name``; the serials newly revoked."""
    with _translated(directory):
        return certs.revoke(directory, name)


def _key(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DeployError(f"key file {path}", f"is readable by others (mode {mode:o})",
                          f"run 'chmod 600 {path}'")  # fmt: skip
    return path.read_bytes()


def files(directory: Path, mount: TLSMount) -> list[TLSFile]:
    """What the container's TLS volume holds: the CA, its certificate and key (0400), and
    for the master the revocation list."""
    name = mount.name
    try:
        out = [TLSFile(CA_FILE, (directory / CA_FILE).read_bytes(), CERT_MODE),
               TLSFile(f"{name}.pem", (directory / f"{name}.pem").read_bytes(), CERT_MODE),
               TLSFile(f"{name}.key", _key(directory / f"{name}.key"), KEY_MODE)]  # fmt: skip
        if mount.crl:
            out.append(crl(directory))
    except FileNotFoundError as exc:
        raise DeployError(f"certificates in {directory}", f"{Path(exc.filename).name} is missing",
                          "run 'deployctl up' to issue it again") from exc  # fmt: skip
    return out


def crl(directory: Path) -> TLSFile:
    return TLSFile(CRL_FILE, (directory / CRL_FILE).read_bytes(), CERT_MODE)


def client_paths(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """deployctl's own (CA, certificate, key) files, as the scheduler's client reads them."""
    return directory / CA_FILE, directory / f"{name}.pem", directory / f"{name}.key"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


__all__ = ["client_paths", "crl", "files", "has_ca", "held", "init", "issue", "require_ca",
           "revoke"]  # fmt: skip

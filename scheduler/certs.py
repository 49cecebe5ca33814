"""The cluster's certificate authority: a CA, one certificate per node, and a revocation list.

Everything lives in one directory, laid out as ``scheduler.tls`` expects to find it:

    DIR/ca.pem       the CA certificate (ECDSA P-256, 10 years); every node trusts it
    DIR/ca.key       the CA's private key (0600); only the machine that issues needs it
    DIR/crl.pem      the revocation list, signed by the CA; the master reloads it on change
    DIR/issued.tsv   every certificate issued: serial, name, role, expiry (hex serial first)
    DIR/NAME.pem     a node's certificate: CN=NAME, OU=ROLE, SANs for NAME and its addresses
    DIR/NAME.key     that node's private key (0600)

Issuing NAME again (rotation) replaces NAME.pem and NAME.key; revoking NAME revokes every
certificate ever issued under that name (``issued.tsv``), so a rotated-out one cannot come
back. Keys are created 0600 from the start and refused when group or world can read them.

``cryptography`` is imported only inside these functions: the runtime images do not have it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SchedulerError
from .tls import CA_FILE, CRL_FILE, ROLES, check_key_file

CA_KEY_FILE = "ca.key"
INDEX_FILE = "issued.tsv"
CA_DAYS = 3650
NODE_DAYS = 90
CLOCK_SKEW = dt.timedelta(minutes=5)  # a certificate is valid from a little before it is made
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MISSING = "scheduler certs needs the cryptography package: pip install 'scheduler-kit[certs]'"

__all__ = ["CertInfo", "CertsError", "init", "issue", "list_certs", "revoke"]


class CertsError(SchedulerError):
    """The CA directory cannot be used as asked (missing, already made, unknown name...)."""


@dataclass(frozen=True)
class CertInfo:
    """One node certificate as ``list`` shows it."""

    name: str
    role: str
    serial: int
    not_after: dt.datetime
    revoked: bool

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.not_after <= (now or dt.datetime.now(dt.UTC))


def check_name(name: str) -> str:
    """A node name is a file name and a DNS-like label: letters, digits, '.', '_' and '-'."""
    if not NAME_RE.fullmatch(name) or name in ("ca", "crl", "issued"):
        raise CertsError(
            f"bad certificate name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (not 'ca' or 'crl')"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise CertsError(f"bad role {role!r}: use one of {', '.join(ROLES)}")
    return role


def _require() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise CertsError(MISSING) from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- files ----------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically; the file has ``mode`` from its creation (no chmod after)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, pem, 0o600)


def _write_pem(path: Path, obj: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    _write(path, obj.public_bytes(serialization.Encoding.PEM), 0o644)


def _ca(directory: Path) -> tuple[Any, Any]:
    """The CA's certificate and key, with the key's mode checked."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / CA_FILE, directory / CA_KEY_FILE
    if not cert_path.exists() or not key_path.exists():
        raise CertsError(f"no CA in {directory}; run 'scheduler certs init {directory}' first")
    check_key_file(key_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return cert, key


def _read_cert(path: Path) -> Any:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def _subject_value(cert: Any, oid: Any) -> str:
    attrs = cert.subject.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else ""


# -- the CA ---------------------------------------------------------------------------------


def init(directory: str | os.PathLike[str], days: int = CA_DAYS) -> Path:
    """Make a cluster CA (ECDSA P-256) and an empty revocation list in ``directory``."""
    _require()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root = Path(directory)
    if (root / CA_KEY_FILE).exists() or (root / CA_FILE).exists():
        raise CertsError(f"{root} already holds a CA ({CA_FILE}); use another directory")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scheduler cluster"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"scheduler cluster CA {secrets.token_hex(4)}"),
    ])  # fmt: skip
    start = _now() - CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(root / CA_KEY_FILE, key)
    _write_pem(root / CA_FILE, cert)
    _write_crl(root, cert, key, set())
    return root / CA_FILE


def _write_crl(root: Path, ca_cert: Any, ca_key: Any, serials: set[int]) -> None:
    """Sign and write the list; its next update is the CA's own expiry, so it never goes stale
    under a master that only reads it (an expired CRL would refuse every node)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
    )
    for serial in sorted(serials):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
        builder = builder.add_revoked_certificate(entry.build())
    _write_pem(root / CRL_FILE, builder.sign(ca_key, hashes.SHA256()))


def _revoked(root: Path) -> set[int]:
    from cryptography import x509

    path = root / CRL_FILE
    if not path.exists():
        return set()
    return {entry.serial_number for entry in x509.load_pem_x509_crl(path.read_bytes())}


# -- node certificates ----------------------------------------------------------------------


def _alt_names(name: str, addresses: list[str]) -> list[Any]:
    from cryptography import x509

    names: list[Any] = []
    for value in [name, *addresses]:
        try:
            entry: Any = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            entry = x509.DNSName(value)
        if entry not in names:
            names.append(entry)
    return names


def issue(
    directory: str | os.PathLike[str],
    name: str,
    role: str,
    days: int = NODE_DAYS,
    addresses: list[str] | None = None,
    not_before: dt.datetime | None = None,
) -> Path:
    """Issue NAME.pem and NAME.key for a node of ``role``, valid ``days`` from ``not_before``
    (default: now). A master may also act as a client; workers and clients only connect."""
    _require()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    check_name(name)
    check_role(role)
    if days < 1:
        raise CertsError(f"--days must be at least 1, got {days}")
    root = Path(directory)
    ca_cert, ca_key = _ca(root)
    key = ec.generate_private_key(ec.SECP256R1())
    start = (not_before or _now()) - CLOCK_SKEW
    purposes = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "master":
        purposes.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])  # fmt: skip
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CLOCK_SKEW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(x509.SubjectAlternativeName(_alt_names(name, addresses or [])), False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(root / f"{name}.key", key)
    _write_pem(root / f"{name}.pem", cert)
    expiry = f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    with open(root / INDEX_FILE, "a", encoding="utf-8") as index:
        index.write(f"{cert.serial_number:x}\t{name}\t{role}\t{expiry}\n")
    return root / f"{name}.pem"


def _issued_serials(root: Path, name: str) -> set[int]:
    path = root / INDEX_FILE
    if not path.exists():
        return set()
    rows = (line.split("\t") for line in path.read_text(encoding="utf-8").splitlines())
    return {int(row[0], 16) for row in rows if len(row) >= 2 and row[1] == name}


def revoke(directory: str | os.PathLike[str], name: str) -> list[int]:
    """Revoke every certificate issued under ``name``; rewrite crl.pem. Returns the serials
    newly revoked (empty if they all already were)."""
    _require()
    check_name(name)
    root = Path(directory)
    ca_cert, ca_key = _ca(root)
    serials = _issued_serials(root, name)
    if (root / f"{name}.pem").exists():
        serials.add(_read_cert(root / f"{name}.pem").serial_number)
    if not serials:
        raise CertsError(f"no certificate named {name!r} in {root}; see 'scheduler certs list'")
    revoked = _revoked(root)
    new = serials - revoked
    if new:
        _write_crl(root, ca_cert, ca_key, revoked | new)
    return sorted(new)


def list_certs(directory: str | os.PathLike[str]) -> list[CertInfo]:
    """The node certificates in ``directory`` (NAME.pem), by name."""
    _require()
    from cryptography.x509.oid import NameOID

    root = Path(directory)
    if not (root / CA_FILE).exists():
        raise CertsError(f"no CA in {root}; run 'scheduler certs init {root}' first")
    revoked = _revoked(root)
    infos = []
    for path in sorted(root.glob("*.pem")):
        if path.name in (CA_FILE, CRL_FILE):
            continue
        cert = _read_cert(path)
        infos.append(CertInfo(
            name=_subject_value(cert, NameOID.COMMON_NAME),
            role=_subject_value(cert, NameOID.ORGANIZATIONAL_UNIT_NAME),
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
            revoked=cert.serial_number in revoked,
        ))  # fmt: skip
    return infos

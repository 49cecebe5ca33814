"""The cluster CA: what `scheduler certs` writes, and its command line."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scheduler import certs, tls
from scheduler.errors import ConfigError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def crl(root: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((root / "crl.pem").read_bytes())


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    certs.init(root)
    return root


def test_init_makes_a_ca_and_an_empty_signed_crl(ca: Path) -> None:
    assert sorted(p.name for p in ca.iterdir()) == ["ca.key", "ca.pem", "crl.pem"]
    assert mode(ca) == 0o700 and mode(ca / "ca.key") == 0o600
    cert = load(ca / "ca.pem")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= lifetime <= dt.timedelta(days=3651)
    assert list(crl(ca)) == [] and crl(ca).is_signature_valid(cert.public_key())
    with pytest.raises(certs.CertsError, match="already holds a CA"):
        certs.init(ca)


def test_issue_puts_name_role_and_addresses_in_the_certificate(ca: Path) -> None:
    path = certs.issue(ca, "master", "master", addresses=["10.0.0.7", "m.example"])
    cert, authority = load(path), load(ca / "ca.pem")
    cert.verify_directly_issued_by(authority)
    subject = {attr.oid: attr.value for attr in cert.subject}
    assert subject == {NameOID.COMMON_NAME: "master", NameOID.ORGANIZATIONAL_UNIT_NAME: "master"}
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["master", "m.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < lifetime <= dt.timedelta(days=90)
    assert mode(ca / "master.key") == 0o600

    worker = load(certs.issue(ca, "worker-1", "worker", days=7))
    usage = worker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # it cannot serve as a master
    assert worker.not_valid_after_utc - worker.not_valid_before_utc < dt.timedelta(days=8)


@pytest.mark.parametrize(
    "name, role, days, message",
    [
        ("w/1", "worker", 90, "bad certificate name"),
        ("ca", "worker", 90, "bad certificate name"),
        ("w1", "admin", 90, "bad role 'admin'"),
        ("w1", "worker", 0, "at least 1"),
    ],
)
def test_issue_refuses_bad_input(ca: Path, name: str, role: str, days: int, message: str) -> None:
    with pytest.raises(certs.CertsError, match=message):
        certs.issue(ca, name, role, days=days)


def test_issue_needs_a_ca_with_a_private_key(ca: Path, tmp_path: Path) -> None:
    with pytest.raises(certs.CertsError, match="no CA in .*; run 'scheduler certs init"):
        certs.issue(tmp_path / "elsewhere", "w1", "worker")
    (ca / "ca.key").chmod(0o644)
    with pytest.raises(ConfigError, match=r"mode 0644\); run: chmod 600 .*ca.key$"):
        certs.issue(ca, "w1", "worker")


def test_revoke_lists_every_certificate_of_the_name(ca: Path) -> None:
    first = load(certs.issue(ca, "worker-1", "worker")).serial_number
    second = load(certs.issue(ca, "worker-1", "worker")).serial_number  # rotated
    keep = load(certs.issue(ca, "worker-2", "worker")).serial_number
    assert certs.revoke(ca, "worker-1") == sorted([first, second])
    revoked = {entry.serial_number for entry in crl(ca)}
    assert revoked == {first, second} and keep not in revoked
    authority = load(ca / "ca.pem")
    assert crl(ca).is_signature_valid(authority.public_key())
    assert crl(ca).next_update_utc == authority.not_valid_after_utc  # never stale under a master
    assert tls._crl_serials(ca / "crl.pem") == revoked  # the stdlib-side reading agrees
    assert certs.revoke(ca, "worker-1") == []
    with pytest.raises(certs.CertsError, match="no certificate named 'nobody'"):
        certs.revoke(ca, "nobody")


def test_list_shows_role_expiry_and_revocation(ca: Path) -> None:
    certs.issue(ca, "master", "master")
    certs.issue(ca, "worker-1", "worker")
    certs.revoke(ca, "worker-1")
    rows = {c.name: (c.role, c.revoked) for c in certs.list_certs(ca)}
    assert rows == {"master": ("master", False), "worker-1": ("worker", True)}


# -- the command line -----------------------------------------------------------------------


def scheduler(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scheduler.cli", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_cli_init_issue_revoke_list(tmp_path: Path) -> None:
    root = str(tmp_path / "pki")
    runs = [
        scheduler("certs", "init", root),
        scheduler("certs", "issue", root, "master", "--role", "master", "--address", "127.0.0.1"),
        scheduler("certs", "issue", root, "w1", "--role", "worker", "--days", "30"),
        scheduler("certs", "revoke", root, "w1"),
        scheduler("certs", "list", root),
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "PRIVATE KEY" not in run.stdout + run.stderr
    table = runs[-1].stdout.splitlines()
    assert table[0].split() == ["NAME", "ROLE", "EXPIRES", "STATUS"]
    assert table[1].split()[:2] == ["master", "master"] and table[1].endswith("valid")
    assert table[2].split()[:2] == ["w1", "worker"] and table[2].endswith("revoked")


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["issue", "{dir}", "w1", "--role", "admin"], 2, "invalid choice: 'admin'"),
        (["issue", "{dir}", "w/1", "--role", "worker"], 2, "bad certificate name 'w/1'"),
        (["issue", "{dir}", "w1", "--role", "worker", "--days", "0"], 2, "days >= 1"),
        (["issue", "{dir}", "w1", "--role", "worker"], 1, "error: no CA in"),
        (["revoke", "{dir}", "w1"], 1, "error: no CA in"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path: Path, args: list[str], code: int, message: str):
    run = scheduler("certs", *(a.replace("{dir}", str(tmp_path)) for a in args))
    assert run.returncode == code
    assert message in run.stderr.splitlines()[-1]
    assert "Traceback" not in run.stderr


def test_without_cryptography_one_line_says_what_to_install(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "from scheduler.cli import main\n"
            f"sys.exit(main(['certs', 'init', {str(tmp_path)!r}]))")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr == f"error: {certs.MISSING}\n"

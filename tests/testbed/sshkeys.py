"""Keys and client files of the test bed's SSH: generated per run, never in the real ~/.ssh."""

from __future__ import annotations

from pathlib import Path

from tests.testbed.layout import Host, ssh_client_config
from tests.testbed.procs import run


def keypair(path: Path) -> str:
    """An ed25519 key at ``path`` (made once, no passphrase); return the public line."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "scheduler-testbed",
             "-f", str(path)])
    return Path(f"{path}.pub").read_text().strip()


def write_client(hosts: list[Host], host_keys: dict[str, str], authorized_keys: Path) -> None:
    """The client key (authorized on every host), the ssh config and the known_hosts file."""
    first = hosts[0]
    authorized_keys.write_text(keypair(first.ssh_key) + "\n")
    first.ssh_config.write_text(ssh_client_config(hosts))
    lines = [f"{host.known_hosts_name} {host_keys[host.name]}" for host in hosts]
    first.known_hosts.write_text("\n".join(lines) + "\n")


def public_key_part(pub_line: str) -> str:
    """``ssh-ed25519 AAAA...`` without the comment, as known_hosts wants it."""
    return " ".join(pub_line.split()[:2])

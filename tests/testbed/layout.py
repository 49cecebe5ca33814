"""Where every part of the test bed lives: names, addresses and paths, as pure functions."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_FIRST = 11  # loopback mode: 127.0.0.11, 127.0.0.12, ...
SSH_USER = "root"


@dataclass(frozen=True)
class Layout:
    """Where one test bed lives: its name prefix, subnet and directories.

    Every namespace, link and directory carries ``prefix``, so two beds with different
    prefixes and subnets (say, two checkouts on one machine) do not meet. From the
    environment: TESTBED_PREFIX (default sktb, at most 8 characters), TESTBED_SUBNET (first
    three octets, default 10.213.47), TESTBED_SSH_PORT (loopback mode, default 2222),
    TESTBED_RUN and TESTBED_DATA (default /run/scheduler-testbed and
    /var/lib/scheduler-testbed, with -PREFIX appended for a prefix other than sktb).
    """

    prefix: str = "sktb"
    subnet: str = "10.213.47"
    run: Path = Path("/run/scheduler-testbed")
    data: Path = Path("/var/lib/scheduler-testbed")
    loopback_port: int = 2222

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Layout:
        prefix = environ.get("TESTBED_PREFIX", "sktb")
        if not (prefix.isalnum() and prefix.islower() and len(prefix) <= 8):
            raise ValueError(f"TESTBED_PREFIX={prefix!r}: use 1 to 8 lower-case letters/digits")
        suffix = "" if prefix == "sktb" else f"-{prefix}"
        return cls(prefix, environ.get("TESTBED_SUBNET", "10.213.47"),
                   Path(environ.get("TESTBED_RUN", f"/run/scheduler-testbed{suffix}")),
                   Path(environ.get("TESTBED_DATA", f"/var/lib/scheduler-testbed{suffix}")),
                   int(environ.get("TESTBED_SSH_PORT", "2222")))

    @property
    def bridge(self) -> str:
        return f"{self.prefix}0"

    @property
    def gateway(self) -> str:
        """This machine's address on the bridge, from which clients reach the hosts."""
        return f"{self.subnet}.1"

    def mode_dir(self, mode: str) -> Path:
        return self.run / mode

    def client_home(self, mode: str) -> Path:
        """HOME for ssh clients: paramiko reads .ssh/config and .ssh/known_hosts below it."""
        return self.mode_dir(mode) / "client"


@dataclass(frozen=True)
class Host:
    """One test host as a client sees it: where to reach it by SSH and its Docker engine."""

    name: str
    address: str
    ssh_port: int
    ssh_user: str
    home: Path
    docker_socket: Path
    netns: str | None = None  # None in loopback mode: the machine's own network and engine

    @property
    def ssh_key(self) -> Path:
        return self.home / ".ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.home / ".ssh" / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.home / ".ssh" / "config"

    @property
    def docker_url(self) -> str:
        return f"unix://{self.docker_socket}"

    @property
    def ssh_url(self) -> str:
        """The URL for docker-py (``use_ssh_client=False``) with HOME set to ``home``: by the
        alias, as a user writes it; ``~/.ssh/config`` gives the address, user and key."""
        return f"ssh://{self.name}:{self.ssh_port}"  # docker-py puts 22 in when none is given

    @property
    def known_hosts_name(self) -> str:
        return self.address if self.ssh_port == 22 else f"[{self.address}]:{self.ssh_port}"

    def ssh_argv(self, *command: str) -> list[str]:
        """``ssh`` with our private config (OpenSSH reads root's ~/.ssh otherwise)."""
        return ["ssh", "-F", str(self.ssh_config), self.name, shlex.join(command)]

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "address": self.address, "ssh_port": self.ssh_port,
                "ssh_user": self.ssh_user, "ssh_key": str(self.ssh_key),
                "known_hosts": str(self.known_hosts), "ssh_config": str(self.ssh_config),
                "home": str(self.home), "docker_socket": str(self.docker_socket),
                "docker_url": self.docker_url, "ssh_url": self.ssh_url, "netns": self.netns}


def netns_hosts(layout: Layout, count: int) -> list[Host]:
    """Hosts tb1..tbN, each a network namespace at SUBNET.(10+i) with its own engine."""
    home = layout.client_home("net")
    return [Host(f"tb{i}", f"{layout.subnet}.{10 + i}", 22, SSH_USER, home,
                 host_dir(layout, f"tb{i}") / "docker.sock", netns=f"{layout.prefix}-tb{i}")
            for i in range(1, count + 1)]


def loopback_hosts(layout: Layout, count: int, engine_socket: Path) -> list[Host]:
    """Hosts lo1..loN at 127.0.0.11.., one sshd on one port, all on the machine's engine."""
    home = layout.client_home("loopback")
    return [Host(f"lo{i}", f"127.0.0.{LOOPBACK_FIRST - 1 + i}", layout.loopback_port, SSH_USER,
                 home, engine_socket) for i in range(1, count + 1)]


def host_dir(layout: Layout, name: str) -> Path:
    return layout.mode_dir("net") / name


def ssh_client_config(hosts: list[Host]) -> str:
    """~/.ssh/config for both OpenSSH (``ssh -F``) and paramiko: each host by its alias only,
    the way users name hosts (``Host tb1`` / ``HostName 10.213.47.11``), so nothing that
    needs the address can get by with the name."""
    blocks = []
    for host in hosts:
        blocks.append(
            f"Host {host.name}\n"
            f"  HostName {host.address}\n  Port {host.ssh_port}\n  User {host.ssh_user}\n"
            f"  IdentityFile {host.ssh_key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {host.known_hosts}\n  StrictHostKeyChecking yes\n"
            f"  BatchMode yes\n")
    return "\n".join(blocks)


def sshd_config(*, listen: list[str], port: int, run_dir: Path, authorized_keys: Path,
                docker_socket: Path) -> str:
    """An sshd of our own: key login only, and a session whose DOCKER_HOST is the host's engine.

    docker-py over SSH runs ``docker system dial-stdio`` on the far side; SetEnv points that
    docker CLI at this host's engine, since the sshd sees the machine's whole file system.
    """
    lines = [f"Port {port}", *(f"ListenAddress {a}" for a in listen),
             f"HostKey {run_dir / 'ssh_host_ed25519_key'}", f"PidFile {run_dir / 'sshd.pid'}",
             f"AuthorizedKeysFile {authorized_keys}", "PermitRootLogin prohibit-password",
             "PubkeyAuthentication yes", "PasswordAuthentication no",
             "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "UseDNS no",
             "PrintMotd no", "MaxStartups 64:30:128", "Subsystem sftp internal-sftp",
             f"SetEnv DOCKER_HOST=unix://{docker_socket}"]
    return "\n".join(lines) + "\n"


def dockerd_argv(layout: Layout, name: str) -> list[str]:
    """This host's own engine: own data-root, exec-root, socket; no bridge, no iptables."""
    run_dir, data = host_dir(layout, name), layout.data / name
    return ["dockerd", "--data-root", str(data), "--exec-root", str(run_dir / "exec"),
            "--pidfile", str(run_dir / "dockerd.pid"), "-H", f"unix://{run_dir / 'docker.sock'}",
            "--config-file", str(run_dir / "daemon.json"), "--bridge=none",
            "--iptables=false", "--shutdown-timeout=5"]

"""Where every part of the test bed lives: names, addresses and paths, as pure functions."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "sktb"  # every namespace, link and directory of the test bed carries it
BRIDGE = f"{PREFIX}0"
SUBNET = "10.213.47"  # our own bridge; addresses .11, .12, ... are the hosts, .1 this machine
GATEWAY = f"{SUBNET}.1"
LOOPBACK_FIRST = 11  # loopback mode: 127.0.0.11, 127.0.0.12, ...
LOOPBACK_PORT = 2222
SSH_USER = "root"


@dataclass(frozen=True)
class Paths:
    """The two roots of the test bed: runtime state (sockets, keys, pids) and engine data."""

    run: Path
    data: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Paths:
        return cls(Path(environ.get("SCHEDULER_TESTBED_RUN", "/run/scheduler-testbed")),
                   Path(environ.get("SCHEDULER_TESTBED_DATA", "/var/lib/scheduler-testbed")))

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
        """The URL for docker-py (``use_ssh_client=False``) with HOME set to ``home``."""
        return f"ssh://{self.ssh_user}@{self.address}:{self.ssh_port}"

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


def netns_hosts(paths: Paths, count: int) -> list[Host]:
    """Hosts tb1..tbN, each a network namespace at 10.213.47.(10+i) with its own engine."""
    home = paths.client_home("net")
    return [Host(f"tb{i}", f"{SUBNET}.{10 + i}", 22, SSH_USER, home,
                 host_dir(paths, f"tb{i}") / "docker.sock", netns=f"{PREFIX}-tb{i}")
            for i in range(1, count + 1)]


def loopback_hosts(paths: Paths, count: int, engine_socket: Path,
                   port: int = LOOPBACK_PORT) -> list[Host]:
    """Hosts lo1..loN at 127.0.0.11.., one sshd on ``port``, all on the machine's engine."""
    home = paths.client_home("loopback")
    return [Host(f"lo{i}", f"127.0.0.{LOOPBACK_FIRST - 1 + i}", port, SSH_USER, home,
                 engine_socket) for i in range(1, count + 1)]


def host_dir(paths: Paths, name: str) -> Path:
    return paths.mode_dir("net") / name


def ssh_client_config(hosts: list[Host]) -> str:
    """~/.ssh/config for both OpenSSH (``ssh -F``) and paramiko, by name and by address."""
    blocks = []
    for host in hosts:
        blocks.append(
            f"Host {host.name} {host.address}\n"
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


def dockerd_argv(paths: Paths, name: str) -> list[str]:
    """This host's own engine: own data-root, exec-root, socket; no bridge, no iptables."""
    run_dir, data = host_dir(paths, name), paths.data / name
    return ["dockerd", "--data-root", str(data), "--exec-root", str(run_dir / "exec"),
            "--pidfile", str(run_dir / "dockerd.pid"), "-H", f"unix://{run_dir / 'docker.sock'}",
            "--config-file", str(run_dir / "daemon.json"), "--bridge=none",
            "--iptables=false", "--shutdown-timeout=5"]

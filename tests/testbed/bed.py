"""Bring the test bed up and down, and report it.

Two modes. ``net``: hosts tb1..tbN, each a network and UTS namespace on our bridge with its
own dockerd (own data-root, exec-root, socket, containerd) and its own sshd on port 22.
``loopback``: hosts lo1..loN at 127.0.0.11.. served by one sshd on the machine's own engine.
Bring-up is idempotent; tear-down removes every process, namespace, link, mount and file.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from tests.testbed import netns, procs
from tests.testbed.layout import (
    LOOPBACK_PORT,
    Host,
    Paths,
    dockerd_argv,
    host_dir,
    loopback_hosts,
    netns_hosts,
    sshd_config,
)
from tests.testbed.sshkeys import keypair, public_key_part, write_client

READY_TIMEOUT = 60.0
# Run in each host's own mount namespace: if a system containerd exists, hide its socket so
# that this dockerd starts a containerd of its own (else containers escape the host's netns).
_DOCKERD_WRAPPER = ("if [ -S /run/containerd/containerd.sock ]; then "
                    "mount -t tmpfs tmpfs /run/containerd; fi; exec \"$@\"")
_HOME_LOCK = threading.Lock()


@dataclass(frozen=True)
class Testbed:
    """The hosts of a running test bed, and whether this bring-up started any of it."""

    mode: str
    hosts: tuple[Host, ...]
    started: bool


class TestbedError(RuntimeError):
    """A part of the test bed did not come up; the message names it and its log."""


# ---- net mode ---------------------------------------------------------------------------------


def up(count: int = 3, paths: Paths | None = None) -> Testbed:
    """Bring up ``count`` namespaced hosts (quick when they already run)."""
    paths = paths or Paths.from_env()
    _require_root()
    hosts = netns_hosts(paths, count)
    mode_dir = paths.mode_dir("net")
    mode_dir.mkdir(parents=True, exist_ok=True)
    keypair(hosts[0].ssh_key)
    netns.ensure_bridge()
    started = [_host_up(paths, host, mode_dir / "authorized_keys") for host in hosts]
    host_keys = {h.name: public_key_part(keypair(_host_key(paths, h))) for h in hosts}
    write_client(hosts, host_keys, mode_dir / "authorized_keys")
    for host in hosts:
        _wait_ready(host, host_dir(paths, host.name))
    return Testbed("net", tuple(hosts), any(started))


def down(paths: Paths | None = None) -> None:
    """Remove every namespaced host (any count), including leftovers of a crashed run."""
    paths = paths or Paths.from_env()
    mode_dir = paths.mode_dir("net")
    dirs = sorted(mode_dir.glob("tb*")) if mode_dir.exists() else []
    with ThreadPoolExecutor(max_workers=max(len(dirs), 1)) as pool:
        list(pool.map(_stop_host, dirs))
    for handle in netns.NETNS_DIR.glob("sktb-*") if netns.NETNS_DIR.exists() else ():
        netns.kill_all_in(handle.name)
    netns.unmount_below(mode_dir)
    netns.remove_all()
    netns.unmount_below(paths.data)
    shutil.rmtree(mode_dir, ignore_errors=True)
    shutil.rmtree(paths.data, ignore_errors=True)


def _host_up(paths: Paths, host: Host, authorized_keys: Path) -> bool:
    run_dir = host_dir(paths, host.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    netns.ensure_netns(host)
    uts = run_dir / "uts"
    netns.ensure_uts(uts, host.name)
    started = False
    if procs.live_pid(run_dir / "dockerd.pid", str(run_dir)) is None:
        _fresh_engine_dirs(paths, host.name)
        procs.start([*netns.enter(host, uts), "unshare", "--mount", "--", "sh", "-c",
                     _DOCKERD_WRAPPER, "sh", *dockerd_argv(paths, host.name)],
                    run_dir / "dockerd.log")
        started = True
    if procs.live_pid(run_dir / "sshd.pid", str(run_dir)) is None:
        keypair(_host_key(paths, host))
        config = run_dir / "sshd_config"
        config.write_text(sshd_config(listen=[host.address], port=host.ssh_port, run_dir=run_dir,
                                      authorized_keys=authorized_keys,
                                      docker_socket=host.docker_socket))
        _start_sshd([*netns.enter(host, uts)], config, run_dir)
        started = True
    return started


def _fresh_engine_dirs(paths: Paths, name: str) -> None:
    """Engines start empty: drop what a crashed run left in this host's data-root."""
    data = paths.data / name
    netns.unmount_below(data)
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    run_dir = host_dir(paths, name)
    (run_dir / "daemon.json").write_text("{}\n")
    (run_dir / "docker.sock").unlink(missing_ok=True)


def _host_key(paths: Paths, host: Host) -> Path:
    return host_dir(paths, host.name) / "ssh_host_ed25519_key"


def _stop_host(run_dir: Path) -> None:
    procs.stop(run_dir / "sshd.pid", str(run_dir))
    procs.stop(run_dir / "dockerd.pid", str(run_dir), timeout=30.0)


# ---- loopback mode ----------------------------------------------------------------------------


def loopback_up(count: int = 3, paths: Paths | None = None, engine_socket: Path | None = None,
                port: int = LOOPBACK_PORT) -> Testbed:
    """Bring up ``count`` loopback hosts served by one sshd on the machine's own engine."""
    paths = paths or Paths.from_env()
    _require_root()
    socket_path = engine_socket or local_engine_socket()
    hosts = loopback_hosts(paths, count, socket_path, port)
    run_dir = paths.mode_dir("loopback")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = False
    if procs.live_pid(run_dir / "sshd.pid", str(run_dir)) is None:
        keypair(run_dir / "ssh_host_ed25519_key")
        config = run_dir / "sshd_config"
        config.write_text(sshd_config(listen=[h.address for h in hosts], port=port,
                                      run_dir=run_dir, authorized_keys=run_dir / "authorized_keys",
                                      docker_socket=socket_path))
        _start_sshd([], config, run_dir)
        started = True
    host_key = public_key_part(keypair(run_dir / "ssh_host_ed25519_key"))
    write_client(hosts, {h.name: host_key for h in hosts}, run_dir / "authorized_keys")
    for host in hosts:
        _wait_ready(host, run_dir)
    return Testbed("loopback", tuple(hosts), started)


def loopback_down(paths: Paths | None = None) -> None:
    """Stop the loopback sshd and remove its files; the machine's engine is left alone."""
    run_dir = (paths or Paths.from_env()).mode_dir("loopback")
    procs.stop(run_dir / "sshd.pid", str(run_dir))
    shutil.rmtree(run_dir, ignore_errors=True)


def local_engine_socket(environ: Mapping[str, str] = os.environ) -> Path:
    """The machine's engine socket: DOCKER_HOST when it is a unix URL, else the default."""
    url = environ.get("DOCKER_HOST", "")
    return Path(url.removeprefix("unix://")) if url.startswith("unix://") else Path(
        "/var/run/docker.sock")


# ---- shared -----------------------------------------------------------------------------------


def _start_sshd(prefix: list[str], config: Path, run_dir: Path) -> None:
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    procs.start([*prefix, "/usr/sbin/sshd", "-D", "-f", str(config), "-E",
                 str(run_dir / "sshd.log")], run_dir / "sshd.out")


def _wait_ready(host: Host, run_dir: Path) -> None:
    if not procs.wait_for(lambda: _engine_answers(host.docker_url), READY_TIMEOUT, 0.1):
        raise TestbedError(f"host {host.name}: engine at {host.docker_socket} does not answer; "
                           f"see {run_dir / 'dockerd.log'}")
    if not procs.wait_for(lambda: _port_open(host.address, host.ssh_port), READY_TIMEOUT, 0.05):
        raise TestbedError(f"host {host.name}: sshd does not answer on {host.address}:"
                           f"{host.ssh_port}; see {run_dir / 'sshd.log'}")


def _engine_answers(url: str) -> bool:
    try:
        with docker.APIClient(base_url=url, timeout=2) as api:
            return bool(api.ping())
    except (docker.errors.DockerException, OSError):
        return False


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def _require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError("the test bed needs root (namespaces, dockerd, sshd)")


def status(paths: Paths | None = None) -> dict[str, list[dict[str, object]]]:
    """What runs now, per mode: each host's engine and sshd, found by pidfile."""
    paths = paths or Paths.from_env()
    report: dict[str, list[dict[str, object]]] = {}
    net_dir, lo_dir = paths.mode_dir("net"), paths.mode_dir("loopback")
    for run_dir in sorted(net_dir.glob("tb*")) if net_dir.exists() else []:
        report.setdefault("net", []).append({
            "name": run_dir.name,
            "dockerd": procs.live_pid(run_dir / "dockerd.pid", str(run_dir)),
            "sshd": procs.live_pid(run_dir / "sshd.pid", str(run_dir))})
    if lo_dir.exists():
        report["loopback"] = [{"name": "sshd",
                               "sshd": procs.live_pid(lo_dir / "sshd.pid", str(lo_dir))}]
    return report


@contextmanager
def ssh_home(host: Host) -> Iterator[None]:
    """Point HOME at the test bed's client files while paramiko reads ~/.ssh (docker-py does)."""
    with _HOME_LOCK:
        saved = os.environ.get("HOME")
        os.environ["HOME"] = str(host.home)
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = saved


def docker_client(host: Host, over_ssh: bool = False, timeout: int = 120) -> docker.DockerClient:
    """A client of the host's engine: on its socket, or over SSH as the deploy CLI would."""
    if not over_ssh:
        return docker.DockerClient(base_url=host.docker_url, timeout=timeout)
    with ssh_home(host):
        return docker.DockerClient(base_url=host.ssh_url, use_ssh_client=False, timeout=timeout)

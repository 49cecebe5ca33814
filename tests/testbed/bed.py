"""Bring the test bed up and down, and report it.

Two modes. ``net``: hosts tb1..tbN, each a network and UTS namespace on our bridge with its
own dockerd (own data-root, exec-root, socket, containerd) and its own sshd on port 22.
``loopback``: hosts lo1..loN at 127.0.0.11.. served by one sshd on the machine's own engine.
Bring-up is idempotent; tear-down removes every process, namespace, link, mount and file.
"""

from __future__ import annotations

import fcntl
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
    Host,
    Layout,
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

    __test__ = False  # not a test class, whatever pytest thinks of the name

    mode: str
    hosts: tuple[Host, ...]
    started: bool


class TestbedError(RuntimeError):
    """A part of the test bed did not come up; the message names it and its log."""

    __test__ = False


# ---- net mode ---------------------------------------------------------------------------------


def up(count: int = 3, layout: Layout | None = None) -> Testbed:
    """Bring up ``count`` namespaced hosts (quick when they already run)."""
    layout = layout or Layout.from_env()
    _require_root()
    with _locked(layout):
        return _up(count, layout)


def _up(count: int, layout: Layout) -> Testbed:
    hosts = netns_hosts(layout, count)
    mode_dir = layout.mode_dir("net")
    mode_dir.mkdir(parents=True, exist_ok=True)
    keypair(hosts[0].ssh_key)
    netns.ensure_bridge(layout)
    started = [_host_up(layout, host, mode_dir / "authorized_keys") for host in hosts]
    host_keys = {h.name: public_key_part(keypair(_host_key(layout, h))) for h in hosts}
    write_client(hosts, host_keys, mode_dir / "authorized_keys")
    for host in hosts:
        _wait_ready(host, host_dir(layout, host.name))
    return Testbed("net", tuple(hosts), any(started))


def down(layout: Layout | None = None) -> None:
    """Remove every namespaced host (any count), including leftovers of a crashed run."""
    layout = layout or Layout.from_env()
    with _locked(layout):
        _down(layout)


def _down(layout: Layout) -> None:
    mode_dir = layout.mode_dir("net")
    dirs = sorted(mode_dir.glob("tb*")) if mode_dir.exists() else []
    with ThreadPoolExecutor(max_workers=max(len(dirs), 1)) as pool:
        list(pool.map(_stop_host, dirs))
    for name in netns.our_netns(layout):
        netns.kill_all_in(name)
    netns.unmount_below(mode_dir)
    netns.remove_all(layout)
    netns.unmount_below(layout.data)
    shutil.rmtree(mode_dir, ignore_errors=True)
    shutil.rmtree(layout.data, ignore_errors=True)


def _host_up(layout: Layout, host: Host, authorized_keys: Path) -> bool:
    run_dir = host_dir(layout, host.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    netns.ensure_netns(layout, host)
    uts = run_dir / "uts"
    netns.ensure_uts(uts, host.name)
    started = False
    if procs.live_pid(run_dir / "dockerd.pid", str(run_dir)) is None:
        _fresh_engine_dirs(layout, host.name)
        procs.start([*netns.enter(host, uts), "unshare", "--mount", "--", "sh", "-c",
                     _DOCKERD_WRAPPER, "sh", *dockerd_argv(layout, host.name)],
                    run_dir / "dockerd.log")
        started = True
    if procs.live_pid(run_dir / "sshd.pid", str(run_dir)) is None:
        keypair(_host_key(layout, host))
        config = run_dir / "sshd_config"
        config.write_text(sshd_config(listen=[host.address], port=host.ssh_port, run_dir=run_dir,
                                      authorized_keys=authorized_keys,
                                      docker_socket=host.docker_socket))
        _start_sshd([*netns.enter(host, uts)], config, run_dir)
        started = True
    return started


def _fresh_engine_dirs(layout: Layout, name: str) -> None:
    """Engines start empty: drop what a crashed run left in this host's data-root."""
    data = layout.data / name
    netns.unmount_below(data)
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    run_dir = host_dir(layout, name)
    (run_dir / "daemon.json").write_text("{}\n")
    (run_dir / "docker.sock").unlink(missing_ok=True)


def _host_key(layout: Layout, host: Host) -> Path:
    return host_dir(layout, host.name) / "ssh_host_ed25519_key"


def _stop_host(run_dir: Path) -> None:
    procs.stop(run_dir / "sshd.pid", str(run_dir))
    procs.stop(run_dir / "dockerd.pid", str(run_dir), timeout=30.0)


# ---- loopback mode ----------------------------------------------------------------------------


def loopback_up(count: int = 3, layout: Layout | None = None,
                engine_socket: Path | None = None) -> Testbed:
    """Bring up ``count`` loopback hosts served by one sshd on the machine's own engine."""
    layout = layout or Layout.from_env()
    _require_root()
    with _locked(layout):
        return _loopback_up(count, layout, engine_socket or local_engine_socket())


def _loopback_up(count: int, layout: Layout, socket_path: Path) -> Testbed:
    hosts = loopback_hosts(layout, count, socket_path)
    run_dir = layout.mode_dir("loopback")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = False
    if procs.live_pid(run_dir / "sshd.pid", str(run_dir)) is None:
        keypair(run_dir / "ssh_host_ed25519_key")
        config = run_dir / "sshd_config"
        config.write_text(sshd_config(listen=[h.address for h in hosts], port=layout.loopback_port,
                                      run_dir=run_dir, authorized_keys=run_dir / "authorized_keys",
                                      docker_socket=socket_path))
        _start_sshd([], config, run_dir)
        started = True
    host_key = public_key_part(keypair(run_dir / "ssh_host_ed25519_key"))
    write_client(hosts, {h.name: host_key for h in hosts}, run_dir / "authorized_keys")
    for host in hosts:
        _wait_ready(host, run_dir)
    return Testbed("loopback", tuple(hosts), started)


def loopback_down(layout: Layout | None = None) -> None:
    """Stop the loopback sshd and remove its files; the machine's engine is left alone."""
    layout = layout or Layout.from_env()
    run_dir = layout.mode_dir("loopback")
    with _locked(layout):
        procs.stop(run_dir / "sshd.pid", str(run_dir))
        shutil.rmtree(run_dir, ignore_errors=True)


def local_engine_socket(environ: Mapping[str, str] = os.environ) -> Path:
    """The machine's engine socket: DOCKER_HOST when it is a unix URL, else the default."""
    url = environ.get("DOCKER_HOST", "")
    return Path(url.removeprefix("unix://")) if url.startswith("unix://") else Path(
        "/var/run/docker.sock")


# ---- shared -----------------------------------------------------------------------------------


@contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """One bring-up or tear-down of a bed at a time, across processes."""
    layout.run.mkdir(parents=True, exist_ok=True)
    with open(layout.run / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
        if [p.name for p in layout.run.iterdir()] == [".lock"]:  # nothing of the bed is left
            shutil.rmtree(layout.run, ignore_errors=True)


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


def status(layout: Layout | None = None) -> dict[str, list[dict[str, object]]]:
    """What runs now, per mode: each host's engine and sshd, found by pidfile."""
    layout = layout or Layout.from_env()
    report: dict[str, list[dict[str, object]]] = {}
    net_dir, lo_dir = layout.mode_dir("net"), layout.mode_dir("loopback")
    for run_dir in sorted(net_dir.glob("tb*")) if net_dir.exists() else []:
        report.setdefault("net", []).append({
            "name": run_dir.name,
            "dockerd": procs.live_pid(run_dir / "dockerd.pid", str(run_dir)),
            "sshd": procs.live_pid(run_dir / "sshd.pid", str(run_dir))})
    if lo_dir.exists():
        report["loopback"] = [{"name": "sshd",
                               "sshd": procs.live_pid(lo_dir / "sshd.pid", str(lo_dir))}]
    return report


def leftovers(layout: Layout | None = None) -> list[str]:
    """Whatever of the namespaced bed still exists: processes, namespaces, links, mounts, files."""
    layout = layout or Layout.from_env()
    mode_dir = layout.mode_dir("net")
    found = [f"process {pid}: {cmd[:80]}" for pid, cmd in _processes_mentioning(
        (f"{mode_dir}/", f"{layout.data}/"))]
    found += [f"netns {name}" for name in netns.our_netns(layout)]
    found += [f"link {name}" for name in netns.our_links(layout)]
    found += [f"mount {point}" for point in
              netns.mounts_below(mode_dir) + netns.mounts_below(layout.data)]
    found += [f"directory {path}" for path in (mode_dir, layout.data) if path.exists()]
    return found


def _processes_mentioning(needles: tuple[str, ...]) -> list[tuple[int, str]]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(needle in cmd for needle in needles) and int(proc.name) != os.getpid():
            found.append((int(proc.name), cmd))
    return found


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

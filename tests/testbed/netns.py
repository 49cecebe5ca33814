"""Network and UTS namespaces of the test hosts, joined by veth pairs to one bridge."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.testbed.layout import Host, Layout
from tests.testbed.procs import run

NETNS_DIR = Path("/run/netns")


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def ensure_bridge(layout: Layout) -> None:
    """The bridge on this machine that every host's veth joins; this machine is .1 on it."""
    if not link_exists(layout.bridge):
        run(["ip", "link", "add", layout.bridge, "type", "bridge"])
    run(["ip", "addr", "replace", f"{layout.gateway}/24", "dev", layout.bridge])
    run(["ip", "link", "set", layout.bridge, "up"])


def ensure_netns(layout: Layout, host: Host) -> None:
    """The host's network namespace with eth0 at its address, linked to the bridge."""
    assert host.netns is not None
    handle = NETNS_DIR / host.netns
    if handle.exists() and not is_mounted(handle):
        handle.unlink()  # a handle that outlived its namespace (a reboot, a crash)
    if not handle.exists():
        run(["ip", "netns", "add", host.netns])
    if not link_exists(host.netns):
        run(["ip", "link", "add", host.netns, "type", "veth", "peer", "name", "eth0",
             "netns", host.netns])
    run(["ip", "link", "set", host.netns, "master", layout.bridge, "up"])
    run(["ip", "-n", host.netns, "addr", "replace", f"{host.address}/24", "dev", "eth0"])
    run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
    run(["ip", "-n", host.netns, "link", "set", "lo", "up"])


def ensure_uts(handle: Path, hostname: str) -> None:
    """A persistent UTS namespace bound on ``handle`` whose hostname is ``hostname``."""
    if not is_mounted(handle):
        handle.touch()
        run(["unshare", f"--uts={handle}", "hostname", hostname])


def enter(host: Host, uts: Path) -> list[str]:
    """The argv prefix that runs a command inside the host's network and UTS namespaces.

    ``nsenter --net`` rather than ``ip netns exec``: the latter remounts /sys, and dockerd
    then fails with "Devices cgroup isn't mounted".
    """
    return ["nsenter", f"--net={NETNS_DIR / str(host.netns)}", f"--uts={uts}"]


def kill_all_in(netns: str) -> None:
    """SIGKILL whatever still runs in our namespace (orphans of a crashed run): all of it ours."""
    if (NETNS_DIR / netns).exists():
        for pid in run(["ip", "netns", "pids", netns], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def our_netns(layout: Layout) -> list[str]:
    """Names of the network namespaces of this bed, whatever their count."""
    if not NETNS_DIR.exists():
        return []
    return sorted(p.name for p in NETNS_DIR.glob(f"{layout.prefix}-*"))


def our_links(layout: Layout) -> list[str]:
    """The bed's bridge and the host ends of its veth pairs, whatever their count."""
    veths = sorted(p.name for p in Path("/sys/class/net").glob(f"{layout.prefix}-*"))
    return [layout.bridge, *veths] if link_exists(layout.bridge) else veths


def remove_all(layout: Layout) -> None:
    """Delete every namespace and link named with the bed's prefix, and its bridge."""
    for name in our_netns(layout):
        run(["ip", "netns", "delete", name], check=False)
    for link in our_links(layout):
        run(["ip", "link", "delete", link], check=False)


def is_mounted(path: Path) -> bool:
    return str(path) in mounts_below(path.parent)


def mounts_below(root: Path) -> list[str]:
    """Mount points at or below ``root`` in this mount namespace, deepest first."""
    prefix = str(root).rstrip("/")
    with open("/proc/self/mountinfo") as info:
        points = [line.split()[4] for line in info]
    inside = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    return sorted(set(inside), key=len, reverse=True)


def unmount_below(root: Path) -> None:
    for point in mounts_below(root):
        run(["umount", "-l", point], check=False)

"""A test bed of real hosts on one machine: namespaces with their own dockerd and sshd.

``python -m tests.testbed up|down|status [--hosts N] [--loopback]`` runs it by hand; the
session fixtures in tests/conftest.py use the same functions.
"""

from __future__ import annotations

from tests.testbed.bed import (
    Testbed,
    TestbedError,
    docker_client,
    down,
    leftovers,
    local_engine_socket,
    loopback_down,
    loopback_up,
    ssh_home,
    status,
    up,
)
from tests.testbed.layout import Host, Layout

__all__ = [
    "Host",
    "Layout",
    "Testbed",
    "TestbedError",
    "docker_client",
    "down",
    "leftovers",
    "local_engine_socket",
    "loopback_down",
    "loopback_up",
    "ssh_home",
    "status",
    "up",
]

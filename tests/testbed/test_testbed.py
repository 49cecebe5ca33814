"""The test bed itself: real namespaces, engines and sshd, reached as the deploy CLI would."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import docker
import docker.errors
import paramiko
import pytest

from tests.testbed import Layout, Testbed, bed, docker_client, ssh_home

pytestmark = pytest.mark.integration


def ssh(host: bed.Host, *command: str) -> str:
    return subprocess.run(host.ssh_argv(*command), capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()


def test_each_host_has_its_own_name_address_and_engine(testbed: Testbed) -> None:
    roots = set()
    for host in testbed.hosts:
        assert ssh(host, "hostname") == host.name
        assert host.address in ssh(host, "ip", "-4", "-o", "addr", "show", "eth0")
        engine = docker_client(host, over_ssh=True)  # paramiko, as docker-py runs it
        info = engine.info()
        engine.close()
        assert info["Name"] == host.name
        roots.add(info["DockerRootDir"])
    assert len(roots) == len(testbed.hosts)


def test_hosts_reach_each_other_on_the_bridge(testbed: Testbed) -> None:
    first, second = testbed.hosts[0], testbed.hosts[1]
    probe = f"import socket; print(socket.create_connection(('{first.address}', 22)).recv(7))"
    assert ssh(second, "python3", "-c", probe) == "b'SSH-2.0'"


def test_an_unknown_host_key_is_refused(testbed: Testbed, tmp_path: Path) -> None:
    host = testbed.hosts[0]
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(host.ssh_config.read_text())
    stranger = bed.Host(host.name, host.address, host.ssh_port, host.ssh_user, tmp_path,
                        host.docker_socket, host.netns)
    with pytest.raises((paramiko.SSHException, docker.errors.DockerException)):
        with ssh_home(stranger):
            docker.DockerClient(base_url=stranger.ssh_url, use_ssh_client=False)


def test_bringing_it_up_again_is_quick_and_starts_nothing(testbed: Testbed,
                                                         testbed_layout: Layout) -> None:
    started = time.monotonic()
    again = bed.up(len(testbed.hosts), testbed_layout)
    assert not again.started and again.hosts == testbed.hosts
    assert time.monotonic() - started < 5


def test_loopback_hosts_reach_the_machine_engine_over_ssh(
    loopback_testbed: Testbed, docker_engine: docker.DockerClient
) -> None:
    engine_id = docker_engine.info()["ID"]
    for host in loopback_testbed.hosts:
        assert ssh(host, "sh", "-c", "echo $SSH_CONNECTION").split()[2] == host.address
        engine = docker_client(host, over_ssh=True)
        assert engine.info()["ID"] == engine_id
        engine.close()

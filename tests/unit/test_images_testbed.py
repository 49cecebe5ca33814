"""tests/testbed/layout.py: the test bed's names, addresses, paths and configs, no processes."""

from __future__ import annotations

from pathlib import Path

import paramiko
import pytest

from tests.testbed.bed import local_engine_socket
from tests.testbed.layout import (
    Layout,
    dockerd_argv,
    loopback_hosts,
    netns_hosts,
    ssh_client_config,
    sshd_config,
)

LAYOUT = Layout("sktb", "10.213.47", Path("/r"), Path("/d"), 2222)


def test_layout_defaults_and_a_second_bed_from_the_environment() -> None:
    assert Layout.from_env({}) == Layout()
    other = Layout.from_env({"TESTBED_PREFIX": "b2", "TESTBED_SUBNET": "10.9.9"})
    assert (other.bridge, other.gateway) == ("b20", "10.9.9.1")
    assert other.run == Path("/run/scheduler-testbed-b2")
    with pytest.raises(ValueError, match="TESTBED_PREFIX"):
        Layout.from_env({"TESTBED_PREFIX": "much-too-long"})


def test_netns_hosts_have_own_address_socket_and_namespace() -> None:
    hosts = netns_hosts(LAYOUT, 3)
    assert [h.name for h in hosts] == ["tb1", "tb2", "tb3"]
    assert [h.address for h in hosts] == ["10.213.47.11", "10.213.47.12", "10.213.47.13"]
    assert hosts[1].docker_socket == Path("/r/net/tb2/docker.sock")
    assert hosts[1].docker_url == "unix:///r/net/tb2/docker.sock"
    assert hosts[1].ssh_url == "ssh://tb2:22"  # the alias; ~/.ssh/config has the address
    assert hosts[1].netns == "sktb-tb2"
    assert hosts[1].known_hosts_name == "10.213.47.12"
    assert hosts[1].ssh_key == Path("/r/net/client/.ssh/id_ed25519")


def test_loopback_hosts_share_one_port_and_the_machine_engine() -> None:
    hosts = loopback_hosts(LAYOUT, 2, Path("/var/run/docker.sock"))
    assert [(h.address, h.ssh_port) for h in hosts] == [("127.0.0.11", 2222), ("127.0.0.12", 2222)]
    assert {h.docker_socket for h in hosts} == {Path("/var/run/docker.sock")}
    assert hosts[0].known_hosts_name == "[127.0.0.11]:2222"
    assert hosts[0].netns is None


def test_client_config_is_what_paramiko_reads_for_docker_py(tmp_path: Path) -> None:
    host = netns_hosts(LAYOUT, 2)[1]
    config = paramiko.SSHConfig.from_text(ssh_client_config(netns_hosts(LAYOUT, 2)))
    found = config.lookup(host.name)  # docker-py and deployctl look the alias up
    assert found["hostname"] == host.address and found["port"] == "22"
    assert found["identityfile"] == [str(host.ssh_key)]
    assert found["stricthostkeychecking"] == "yes"
    # only the alias names the host, as users write it: the address alone finds nothing
    assert "identityfile" not in config.lookup(host.address)


def test_sshd_config_sets_the_hosts_docker_host_and_key_login_only() -> None:
    text = sshd_config(
        listen=["10.213.47.11"],
        port=22,
        run_dir=Path("/r/net/tb1"),
        authorized_keys=Path("/r/net/authorized_keys"),
        docker_socket=Path("/r/net/tb1/docker.sock"),
    )
    lines = text.splitlines()
    assert "SetEnv DOCKER_HOST=unix:///r/net/tb1/docker.sock" in lines
    assert "PasswordAuthentication no" in lines and "ListenAddress 10.213.47.11" in lines
    assert "PidFile /r/net/tb1/sshd.pid" in lines


def test_dockerd_argv_owns_its_roots_and_keeps_off_iptables() -> None:
    argv = dockerd_argv(LAYOUT, "tb1")
    assert argv[argv.index("--data-root") + 1] == "/d/tb1"
    assert argv[argv.index("--exec-root") + 1] == "/r/net/tb1/exec"
    assert "unix:///r/net/tb1/docker.sock" in argv
    assert "--iptables=false" in argv and "--bridge=none" in argv


@pytest.mark.parametrize(
    ("docker_host", "socket"),
    [
        ("", "/var/run/docker.sock"),
        ("unix:///tmp/d.sock", "/tmp/d.sock"),
        ("tcp://127.0.0.1:2375", "/var/run/docker.sock"),
    ],
)
def test_local_engine_socket(docker_host: str, socket: str) -> None:
    assert local_engine_socket({"DOCKER_HOST": docker_host}) == Path(socket)

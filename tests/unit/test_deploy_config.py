"""Inventory loading and validation: the whole file, every problem with its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy import config
from deploy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ENV = {"HOME": "/home/ann", "USER": "ann"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("SCHEDULER_", "DEPLOYCTL_")):
            monkeypatch.delenv(name)


def ssh_reader(entries: dict[str, dict[str, Any]] | None = None, seen: list[str] | None = None):
    """A stand-in for ~/.ssh/config: alias -> settings, as paramiko's lookup returns them."""

    def reader(path: str):
        if seen is not None:
            seen.append(path)
        return lambda alias: {"hostname": alias, **(entries or {}).get(alias, {})}

    return reader


def load(data: dict[str, Any], ssh: dict[str, dict[str, Any]] | None = None) -> config.Config:
    return config.from_mapping(data, ENV, ssh_reader(ssh), Path("/inv"), "cluster.toml")


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(data)
    return list(caught.value.problems)


def test_hosts_flag_alone_makes_a_cluster_with_the_first_host_as_master() -> None:
    data = config.hosts_override({}, "h1 ann@h2:2222, h3")
    cfg = load(data)
    assert [h.name for h in cfg.hosts] == ["h1", "h2:2222", "h3"]
    assert cfg.master.host == "h1" and cfg.master.advertise == "h1:8888"
    h2 = cfg.host("h2:2222").ssh
    assert h2 is not None and (h2.hostname, h2.port, h2.user) == ("h2", 2222, "ann")
    assert cfg.workers.count == 3  # one per host, at least two
    assert cfg.authkey_file == Path("/inv/scheduler.authkey")


def test_localhost_means_the_local_engine_without_ssh() -> None:
    cfg = load(config.hosts_override({}, "localhost"))
    (host,) = cfg.hosts
    assert host.local and host.ssh is None
    assert cfg.master.advertise == "127.0.0.1:8888"
    assert cfg.workers.count == 2


def test_ssh_config_supplies_settings_and_the_inventory_overrides_them() -> None:
    ssh = {
        "web1": {"hostname": "10.0.0.5", "user": "ops", "port": "2200",
                 "identityfile": ["/home/ann/.ssh/ops"], "userknownhostsfile": "~/.ssh/kh"},
        "web2": {"hostname": "10.0.0.6", "user": "ops", "port": "2200"},
    }  # fmt: skip
    data = {
        "ssh": {"user": "deploy"},
        "hosts": [{"name": "web1"}, {"name": "web2", "user": "root", "port": 22,
                                     "known_hosts": "/tmp/kh", "identity_file": "keys/id"}],
    }  # fmt: skip
    cfg = load(data, ssh)
    web1, web2 = (cfg.host(n).ssh for n in ("web1", "web2"))
    assert web1 is not None and web2 is not None
    assert (web1.hostname, web1.port, web1.user) == ("10.0.0.5", 2200, "deploy")
    assert web1.identity_files == ("/home/ann/.ssh/ops",)
    assert web1.known_hosts == "/home/ann/.ssh/kh"
    assert (web2.hostname, web2.port, web2.user) == ("10.0.0.6", 22, "root")
    assert web2.identity_files == ("/inv/keys/id",) and web2.known_hosts == "/tmp/kh"
    assert cfg.host("web1").address == "10.0.0.5"  # the master's advertised address


def test_defaults_without_ssh_config() -> None:
    target = load({"hosts": [{"name": "box"}]}).host("box").ssh
    assert target is not None
    assert (target.user, target.port, target.known_hosts) == (
        "ann", 22, "/home/ann/.ssh/known_hosts")  # fmt: skip
    assert target.identity_files == () and target.connect_timeout == 10


def test_ssh_config_file_is_read_from_home_or_from_the_inventory() -> None:
    seen: list[str] = []
    config.from_mapping({"hosts": [{"name": "a"}]}, ENV, ssh_reader(seen=seen), Path("/inv"))
    config.from_mapping({"ssh": {"config_file": "ssh.conf"}, "hosts": [{"name": "a"}]}, ENV,
                        ssh_reader(seen=seen), Path("/inv"))  # fmt: skip
    assert seen == ["/home/ann/.ssh/config", "/inv/ssh.conf"]


def test_every_problem_is_reported_with_its_key_path() -> None:
    found = problems({
        "cluster": {"name": "Bad Name", "parallel": 0},
        "master": {"host": "nowhere", "port": "x", "tunnel": "maybe"},
        "workers": {"count": -1, "concurency": 2},
        "env": {"SCHEDULER_AUTHKEY": "x", "1BAD": "y", "OK": ["list"]},
        "hosts": [{"name": "a", "port": 70000}, {"name": "a"}, {"address": "b"}, "c",
                  {"name": "localhost", "user": "root"}, {"name": "d", "capacity": True}],
        "extra": 1,
    })  # fmt: skip
    expected = [
        "extra: unknown key",
        "cluster.name: expected lowercase",
        "cluster.parallel: expected 1 to 64, got 0",
        "hosts[0].port: expected 1 to 65535, got 70000",
        "hosts[1].name: 'a' is listed twice",
        "hosts[2].name: missing",
        "hosts[3]: expected a table, got str 'c'",
        "hosts[4]: localhost uses this machine's engine",
        "hosts[5].capacity: expected an integer, got bool True",
        "master.host: 'nowhere' is not one of the hosts",
        "master.port: expected an integer, got str 'x'",
        "master.tunnel: expected one of auto, always, never, got 'maybe'",
        "workers.concurency: unknown key",
        "workers.count: expected 0 to 1000, got -1",
        "env.SCHEDULER_AUTHKEY: set by deployctl itself",
        "env.1BAD: not a valid variable name",
        "env.OK: expected a string or number, got list ['list']",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in found), (prefix, found)
    assert len(found) == len(expected), found


def test_the_error_message_lists_the_problems_under_the_file_name() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"hosts": [{"name": "a", "port": "22"}]})
    text = str(caught.value)
    assert text.startswith("cluster.toml: 1 problem(s):")
    assert "hosts[0].port: expected an integer, got str '22'" in text
    assert caught.value.exit_code == 2


def test_no_hosts_at_all() -> None:
    assert problems({}) == [
        "hosts: expected a non-empty list of [[hosts]] tables, got NoneType None"
    ]


def test_a_local_master_with_remote_workers_needs_an_address_they_can_reach() -> None:
    found = problems({"hosts": [{"name": "localhost"}, {"name": "w1"}]})
    assert found[0].startswith("master.advertise: the master runs on localhost")
    ok = load({"hosts": [{"name": "localhost"}, {"name": "w1"}],
               "master": {"advertise": "10.1.1.1"}})  # fmt: skip
    assert ok.master.advertise == "10.1.1.1:8888"


def test_capacity_zero_hosts_run_no_workers() -> None:
    cfg = load({"hosts": [{"name": "m", "capacity": 0}, {"name": "w", "capacity": 4}]})
    assert [h.name for h in cfg.worker_hosts] == ["w"]
    assert problems({"hosts": [{"name": "m", "capacity": 0}]}) == [
        "hosts: every host has capacity = 0, so no worker can run"]  # fmt: skip


def test_toml_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.toml"
    bad.write_text("[cluster\nname = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad, ENV, ssh_reader())
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "missing.toml", ENV, ssh_reader())


def test_no_inventory_and_no_hosts_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="pass --hosts"):
        config.load(None, ENV, ssh_reader())


def test_hosts_flag_replaces_the_file_hosts_and_keeps_the_rest(tmp_path: Path) -> None:
    inv = tmp_path / "cluster.toml"
    inv.write_text('[cluster]\nname = "prod"\n[master]\nhost = "old"\nport = 9000\n'
                   '[[hosts]]\nname = "old"\n')  # fmt: skip
    cfg = config.load(inv, ENV, ssh_reader(), hosts="new1 new2")
    assert cfg.cluster == "prod" and cfg.master.host == "new1" and cfg.master.port == 9000
    assert cfg.authkey_file == tmp_path / "prod.authkey"


def test_the_example_inventory_is_valid() -> None:
    cfg = config.load(ROOT / "cluster.example.toml", ENV, ssh_reader())
    assert cfg.master.host == cfg.hosts[0].name


def test_an_ssh_alias_in_hosts_resolves_to_its_hostname_for_everything() -> None:
    """`--hosts "h1 h2"` with `Host h1 / HostName 10.0.0.1` in ~/.ssh/config: containers and
    tunnels use 10.0.0.1, never the alias (which no container resolves)."""
    aliases = {"h1": {"hostname": "10.0.0.1"}, "h2": {"hostname": "10.0.0.2", "port": "2202"}}
    cfg = load(config.hosts_override({}, "h1 h2"), aliases)
    assert [h.address for h in cfg.hosts] == ["10.0.0.1", "10.0.0.2"]
    assert cfg.master.advertise == "10.0.0.1:8888"
    h2 = cfg.host("h2").ssh
    assert h2 is not None and (h2.hostname, h2.port) == ("10.0.0.2", 2202)


def test_the_inventory_address_and_advertise_win_over_ssh_config() -> None:
    aliases = {"h1": {"hostname": "10.0.0.1"}}
    data = {"hosts": [{"name": "h1", "address": "192.0.2.7"}]}
    assert load(data, aliases).host("h1").address == "192.0.2.7"
    data = {"hosts": [{"name": "h1"}], "master": {"advertise": "master.lan"}}
    assert load(data, aliases).master.advertise == "master.lan:8888"


def test_defaults_shared_with_the_scheduler_come_from_its_settings() -> None:
    from scheduler.settings import DEFAULT_GRACE_SECONDS, DEFAULT_PORT

    cfg = load({"hosts": [{"name": "h1"}]})
    assert cfg.master.port == DEFAULT_PORT
    assert cfg.workers.grace_seconds == DEFAULT_GRACE_SECONDS


def test_host_labels_as_a_table_or_a_string_read_as_the_slave_reads_them() -> None:
    from scheduler.job import parse_labels

    cfg = load({"hosts": [{"name": "a", "labels": {"zone": "a", "gpu": 1}},
                          {"name": "b", "labels": "zone=a, gpu=1"}, {"name": "c"},
                          {"name": "localhost", "labels": "gpu=2"}],
                "master": {"advertise": "10.1.1.1"}})  # fmt: skip
    a, b, c, local = cfg.hosts
    assert a.labels == b.labels == (("gpu", "1"), ("zone", "a"))
    assert a.labels_text == "gpu=1,zone=a" and parse_labels(a.labels_text) == dict(a.labels)
    assert c.labels == () and c.labels_text == ""
    assert local.labels == (("gpu", "2"),)


def test_bad_host_labels_name_the_host_and_what_to_write() -> None:
    found = problems({"hosts": [
        {"name": "a", "labels": "gpu"},
        {"name": "b", "labels": {"gpu": True}},
        {"name": "c", "labels": ["gpu=1"]},
        {"name": "d", "labels": {"gpu,zone": "1"}},
        {"name": "e", "labels": {"gpu ": "1"}},
        {"name": "f", "labels": {"gpu": ""}},
        {"name": "g", "labels": ",".join(f"k{i}=v" for i in range(65))},
    ], "env": {"SCHEDULER_WORKER_LABELS": "gpu=1"}})  # fmt: skip
    assert found == [
        "hosts[0].labels (host a): bad label 'gpu': write KEY=VALUE pairs separated by commas, "
        "e.g. gpu=1,zone=a (letters, digits and _.:/- only)",
        'hosts[1].labels (host b): expected strings or whole numbers, e.g. labels = '
        '{ gpu = "1", zone = "a" }',
        'hosts[2].labels (host c): expected a table or a string like "gpu=1,zone=a", '
        "got list ['gpu=1']",
        "hosts[3].labels (host d): bad label 'gpu': write KEY=VALUE pairs separated by commas, "
        "e.g. gpu=1,zone=a (letters, digits and _.:/- only)",
        "hosts[4].labels (host e): keys and values take letters, digits and _.:/- only, "
        'e.g. labels = { gpu = "1", zone = "a" }',
        "hosts[5].labels (host f): bad label 'gpu=': write KEY=VALUE pairs separated by commas, "
        "e.g. gpu=1,zone=a (letters, digits and _.:/- only)",
        "hosts[6].labels (host g): at most 64 labels, got 65",
        "env.SCHEDULER_WORKER_LABELS: set by deployctl itself; use hosts[].labels",
    ]

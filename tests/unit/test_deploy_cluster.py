"""Carrying a plan out (with a recording executor) and waiting for the master (fake clock)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from deploy import cluster, config, engine, link, ssh
from deploy.context import Context
from deploy.errors import HostError, MasterError
from deploy.keyfile import Secret
from deploy.observed import Observed
from deploy.parallel import Failures
from deploy.planner import Create, Remove, plan_down, plan_up
from deploy.specs import ImageRef, Images
from scheduler import AuthError, ConnectError

KEY = Secret("k" * 32)
IMAGES = Images(ImageRef("m:1", "sha256:" + "a" * 64), ImageRef("s:1", "sha256:" + "b" * 64))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SCHEDULER_", "DEPLOYCTL_")):
            monkeypatch.delenv(name)


class Recorder:
    """An executor that records what it is asked, and fails on chosen hosts."""

    def __init__(self, broken: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.calls: list[tuple[str, str, str]] = []
        self.broken = broken

    def _do(self, verb: str, host: config.Host, name: str) -> None:
        if host.name in self.broken:
            raise HostError(host.name, host.name, "engine gone", "start it")
        self.calls.append((verb, host.name, name))

    def create(self, host: config.Host, action: Create) -> None:
        self._do("create", host, action.spec.name)

    def start(self, host: config.Host, action: Any) -> None:
        self._do("start", host, action.container.name)

    def remove(self, host: config.Host, action: Remove) -> None:
        self._do("remove", host, action.container.name)

    def remove_volume(self, host: config.Host, action: Any) -> None:
        self._do("remove_volume", host, action.name)


def context(hosts: str = "h1 h2 h3") -> Context:
    data = config.hosts_override({"cluster": {"name": "c"}}, hosts)
    cfg = config.from_mapping(data, {"HOME": "/h"}, lambda p: lambda a: {}, Path("/inv"))
    echoed: list[str] = []
    return Context(cfg, {}, echoed.append, None, None, None)  # type: ignore[arg-type]


def run(ctx: Context, actions: Any, rec: Any, skip: Failures | None = None,
        master_first: bool = True) -> set[str]:  # fmt: skip
    return set(cluster.run(ctx, actions, rec, skip or Failures(), master_first))


def test_master_first_then_the_workers_of_every_host() -> None:
    ctx = context()
    actions = plan_up(ctx.config, IMAGES, KEY, [], 4, {})
    rec = Recorder()
    assert run(ctx, actions, rec) == set()
    assert rec.calls[0] == ("create", "h1", "c-master")
    per_host = {h: sorted(c[2] for c in rec.calls[1:] if c[1] == h) for h in ("h1", "h2", "h3")}
    assert per_host == {"h1": ["c-worker-1", "c-worker-2"], "h2": ["c-worker-3"],
                        "h3": ["c-worker-4"]}  # fmt: skip


class Meeting(Recorder):
    """Creates wait until ``count`` of them run at once: it passes only if they run in parallel."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(count, timeout=10)

    def create(self, host: config.Host, action: Create) -> None:
        if action.spec.role == "worker":
            self.barrier.wait()
        super().create(host, action)


def test_the_containers_of_one_host_are_made_at_once() -> None:
    ctx = context("h1")
    actions = plan_up(ctx.config, IMAGES, KEY, [], cluster.HOST_CONCURRENCY, {})
    rec = Meeting(cluster.HOST_CONCURRENCY)
    assert run(ctx, actions, rec) == set()
    assert len(rec.calls) == 1 + cluster.HOST_CONCURRENCY


def test_an_outdated_worker_goes_before_its_replacement_comes() -> None:
    ctx = context("h1")
    old = Observed("h1", "x", "c-worker-1", "worker", 1, "", "stale", "running")
    actions = plan_up(ctx.config, IMAGES, KEY, [old], 3, {}, with_master=False)
    rec = Recorder()
    run(ctx, actions, rec)
    mine = [c[0] for c in rec.calls if c[2] == "c-worker-1"]
    assert mine == ["remove", "create"] and len(rec.calls) == 4


class Interrupting(Recorder):
    """Ctrl-C arrives while the first removal runs."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx

    def remove(self, host: config.Host, action: Remove) -> None:
        self.ctx.stop.set()
        super().remove(host, action)


def test_after_ctrl_c_nothing_more_starts() -> None:
    ctx = context("h1")
    old = Observed("h1", "x", "c-worker-1", "worker", 1, "", "stale", "running")
    actions = plan_up(ctx.config, IMAGES, KEY, [old], 1, {}, with_master=False)
    rec = Interrupting(ctx)
    run(ctx, actions, rec)
    assert rec.calls == [("remove", "h1", "c-worker-1")]  # not made again half-way


def test_a_host_that_failed_earlier_in_the_command_is_skipped() -> None:
    ctx = context()
    earlier = Failures({"h2": HostError("h2", "h2", "images not shipped", "fix it")})
    rec = Recorder()
    assert run(ctx, plan_up(ctx.config, IMAGES, KEY, [], 3, {}), rec, earlier) == set()
    assert "h2" not in {c[1] for c in rec.calls}


def test_one_broken_host_does_not_stop_the_others() -> None:
    ctx = context()
    actions = plan_up(ctx.config, IMAGES, KEY, [], 6, {})
    rec = Recorder(broken={"h2"})
    assert run(ctx, actions, rec) == {"h2"}
    assert {c[1] for c in rec.calls} == {"h1", "h3"}
    assert len(rec.calls) == 1 + 4


def test_a_failed_master_host_skips_its_workers_but_not_the_rest() -> None:
    ctx = context()
    rec = Recorder(broken={"h1"})
    assert run(ctx, plan_up(ctx.config, IMAGES, KEY, [], 3, {}), rec) == {"h1"}
    assert sorted(c[1] for c in rec.calls) == ["h2", "h3"]


class FakeClient:
    def __init__(self, statuses: list[dict[str, Any]]) -> None:
        self.statuses = statuses

    def status(self) -> dict[str, Any]:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_registered_returns_once_every_worker_is_there() -> None:
    statuses = [{"workers": []}, {"workers": [{"name": "w1"}]},
                {"workers": [{"name": "w1"}, {"name": "w2"}]}]  # fmt: skip
    clock = Clock()
    status = link.wait_registered(FakeClient(statuses), ["w1", "w2"], 10, clock, clock.sleep)  # type: ignore[arg-type]
    assert len(status["workers"]) == 2 and clock.now == 0.5


def test_wait_registered_names_the_missing_workers() -> None:
    clock = Clock()
    client = FakeClient([{"workers": [{"name": "w1"}, {"name": "w2", "draining": True}]}])
    with pytest.raises(MasterError, match="after 3s: w2, w3"):
        link.wait_registered(client, ["w1", "w2", "w3"], 3, clock, clock.sleep)  # type: ignore[arg-type]


def test_busy_workers_from_status() -> None:
    status = {"workers": [{"name": "a", "running": [1, 2]}, {"name": "b", "running": []}]}
    assert link.busy_workers(status) == {"a": 2, "b": 0}


def test_down_removes_workers_before_the_master_and_volumes_last() -> None:
    ctx = context()
    rec = Recorder()
    world = [
        Observed("h1", "m", "c-master", "master", 0, "", "", "running"),
        Observed("h2", "w", "c-worker-1", "worker", 1, "", "", "running"),
    ]
    actions = plan_down(ctx.config, world, [("h1", "c-state")])
    run(ctx, actions, rec, master_first=False)
    assert [c[2] for c in rec.calls] == ["c-worker-1", "c-master", "c-state"]


class Opener:
    """Stands in for scheduler.Client(master=..., authkey=...): refuses ``refusals`` times."""

    def __init__(self, client: FakeClient, refusals: int = 0, error: type = ConnectError) -> None:
        self.client, self.refusals, self.error = client, refusals, error
        self.calls: list[str] = []

    def __call__(self, master: str, authkey: str) -> FakeClient:
        self.calls.append(master)
        if len(self.calls) <= self.refusals:
            raise self.error("not yet")
        return self.client


def master_link(opener: Opener, tunnels: list[str], hosts: str = "h1 h2 h3",
                tunnel: str = "auto") -> link.MasterLink:  # fmt: skip
    ctx = context(hosts)
    cfg = ctx.config
    cfg = type(cfg)(**{**cfg.__dict__, "master": type(cfg.master)(
        **{**cfg.master.__dict__, "tunnel": tunnel})})  # fmt: skip

    def tunnel_to(host: config.Host, address: str, port: int) -> tuple[str, int]:
        tunnels.append(f"{host.name}->{address}:{port}")
        return "127.0.0.1", 40000

    return link.MasterLink(cfg, tunnel_to, opener, direct_timeout=1)  # type: ignore[arg-type]


def test_the_master_is_waited_for_then_one_client_serves_the_command() -> None:
    clock, tunnels = Clock(), []
    opener = Opener(FakeClient([{"workers": [{"name": "w1"}]}]), refusals=0)
    m = master_link(opener, tunnels)
    assert m.wait_ready(KEY, ["w1"], 10, clock, clock.sleep)["workers"] == [{"name": "w1"}]
    with m.use(KEY) as c:
        c.status()
    assert opener.calls == ["h1:8888"] and tunnels == []  # direct, opened once


def test_a_master_not_reached_directly_is_reached_through_its_hosts_loopback() -> None:
    clock, tunnels = Clock(), []
    opener = Opener(FakeClient([{"workers": [{"name": "w1"}]}]), refusals=1)
    m = master_link(opener, tunnels)
    m.wait_ready(KEY, ["w1"], 10, clock, clock.sleep)
    m.reset()
    with m.use(KEY):
        pass
    # the tunnel ends at the master host's own loopback: the alias need not resolve there
    assert tunnels == ["h1->127.0.0.1:8888"]
    assert opener.calls == ["h1:8888", "127.0.0.1:40000", "127.0.0.1:40000"]


def test_a_starting_master_is_retried_until_it_answers() -> None:
    clock, tunnels = Clock(), []
    opener = Opener(FakeClient([{"workers": []}]), refusals=3)
    m = master_link(opener, tunnels, tunnel="never")
    m.wait_ready(KEY, [], 10, clock, clock.sleep)
    assert opener.calls == ["h1:8888"] * 4 and clock.now == 0.75


def test_a_local_master_is_reached_on_loopback() -> None:
    opener, tunnels = Opener(FakeClient([{}])), []
    with master_link(opener, tunnels, hosts="localhost").use(KEY):
        pass
    assert opener.calls == ["127.0.0.1:8888"] and tunnels == []


def test_a_master_with_another_key_is_reported_at_once() -> None:
    clock = Clock()
    m = master_link(Opener(FakeClient([{}]), refusals=5, error=AuthError), [])
    with pytest.raises(MasterError, match="refuses the authkey"):
        m.wait_ready(KEY, ["w1"], 10, clock, clock.sleep)
    assert clock.now == 0


def test_a_master_that_never_answers_times_out_without_the_key() -> None:
    clock = Clock()
    m = master_link(Opener(FakeClient([{}]), refusals=1000), [], tunnel="never")
    with pytest.raises(MasterError, match="does not answer after 2s") as err:
        m.wait_ready(KEY, ["w1"], 2, clock, clock.sleep)
    assert KEY.reveal() not in str(err.value)


def test_closed_connections_refuse_late_users_with_a_host_error() -> None:
    """After Ctrl-C the session closes while log threads may still retry: they get HostError."""
    host = context("h1").config.host("h1")
    pool = ssh.SSHPool()
    engines = engine.Engines(pool.docker_socket)
    engines.close()
    pool.close()
    for use in (lambda: engines.client(host), lambda: pool.client(host),
                lambda: pool.docker_socket(host)):  # fmt: skip
        with pytest.raises(HostError, match="connections closed"):
            use()

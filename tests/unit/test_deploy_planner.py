"""The planner: desired state vs observed containers -> actions, with no engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy import config
from deploy.errors import DeployError
from deploy.keyfile import Secret
from deploy.observed import Observed
from deploy.planner import (
    Create,
    Remove,
    RemoveVolume,
    Start,
    images_needed,
    place,
    plan_down,
    plan_up,
    state_volume,
)  # fmt: skip
from deploy.specs import ImageRef, Images

KEY = Secret("k" * 32)
IMAGES = Images(ImageRef("scheduler-master:hash-a", "sha256:" + "a" * 64),
                ImageRef("scheduler-slave:hash-b", "sha256:" + "b" * 64))  # fmt: skip


def make_config(hosts: list[dict[str, Any]], **sections: Any) -> config.Config:
    data = {"cluster": {"name": "c"}, "hosts": hosts, **sections}
    return config.from_mapping(data, {"HOME": "/h"}, lambda p: lambda a: {}, Path("/inv"))


THREE = make_config([{"name": "h1"}, {"name": "h2"}, {"name": "h3"}])


def run(actions: list, observed: list[Observed]) -> list[Observed]:
    """A fake engine: what the world looks like after the actions."""
    world = {o.id: o for o in observed}
    for a in actions:
        if isinstance(a, Remove):
            del world[a.container.id]
        elif isinstance(a, Start):
            world[a.container.id] = Observed(**{**a.container.__dict__, "state": "running"})
        elif isinstance(a, Create):
            s = a.spec
            cid = f"{s.host}/{s.name}/{len(world)}"
            world[cid] = Observed(s.host, cid, s.name, s.role, s.index, s.image.version,
                                  s.digest, "running")  # fmt: skip
    return list(world.values())


def workers_by_host(observed: list[Observed]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for o in sorted(observed, key=lambda o: o.index):
        if o.role == "worker":
            out.setdefault(o.host, []).append(o.index)
    return out


def test_place_spreads_evenly_in_host_order() -> None:
    assert place([("a", None), ("b", None), ("c", None)], 5) == {"a": 2, "b": 2, "c": 1}


def test_place_weighs_by_capacity_and_respects_it() -> None:
    assert place([("a", 1), ("b", 3)], 4) == {"a": 1, "b": 3}
    assert place([("a", 2), ("b", 6)], 4) == {"a": 1, "b": 3}
    assert place([("m", 0), ("a", None)], 3) == {"a": 3}
    with pytest.raises(DeployError, match="5 workers do not fit: the hosts' total capacity is 4"):
        place([("a", 1), ("b", 3)], 5)


def test_place_only_adds_when_the_count_grows() -> None:
    hosts = [("a", 2), ("b", None), ("c", 5)]
    for n in range(30):
        small, big = place(hosts, n), place(hosts, n + 1)
        assert sum(big.values()) - sum(small.values()) == 1
        assert all(big[h] >= small[h] for h in small)


def test_empty_hosts_get_the_master_then_workers_spread() -> None:
    actions = plan_up(THREE, IMAGES, KEY, [], 5, {})
    assert isinstance(actions[0], Create) and actions[0].spec.role == "master"
    assert actions[0].host == "h1"
    creates = [a.spec for a in actions[1:]]
    assert [(s.host, s.name) for s in creates] == [
        ("h1", "c-worker-1"), ("h1", "c-worker-2"), ("h2", "c-worker-3"),
        ("h2", "c-worker-4"), ("h3", "c-worker-5"),
    ]  # fmt: skip


def test_up_twice_plans_nothing() -> None:
    world = run(plan_up(THREE, IMAGES, KEY, [], 5, {}), [])
    assert plan_up(THREE, IMAGES, KEY, world, 5, {}) == []


def test_scale_up_only_adds_and_scale_down_only_removes() -> None:
    world = run(plan_up(THREE, IMAGES, KEY, [], 5, {}), [])
    more = plan_up(THREE, IMAGES, KEY, world, 10, {}, with_master=False)
    assert all(isinstance(a, Create) for a in more) and len(more) == 5
    world = run(more, world)
    assert {h: len(i) for h, i in workers_by_host(world).items()} == {"h1": 4, "h2": 3, "h3": 3}
    fewer = plan_up(THREE, IMAGES, KEY, world, 1, {}, with_master=False)
    assert all(isinstance(a, Remove) for a in fewer) and len(fewer) == 9
    assert workers_by_host(run(fewer, world)) == {"h1": [1]}


def test_scale_down_removes_idle_workers_first_and_drains_busy_ones() -> None:
    world = run(plan_up(THREE, IMAGES, KEY, [], 6, {}), [])  # h1: 1,2  h2: 3,4  h3: 5,6
    busy = {"c-worker-1": 2, "c-worker-3": 1, "c-worker-4": 1}
    actions = plan_up(THREE, IMAGES, KEY, world, 3, busy, with_master=False)
    removed = {a.container.name: a for a in actions if isinstance(a, Remove)}
    assert set(removed) == {"c-worker-2", "c-worker-4", "c-worker-6"}
    assert removed["c-worker-2"].reason == "scale down, idle"
    assert removed["c-worker-4"].reason == "scale down, draining 1 running job(s)"
    assert removed["c-worker-4"].timeout == 60 + 15  # grace, then SIGKILL


def test_idle_workers_go_before_busy_ones_on_the_same_host() -> None:
    one = make_config([{"name": "h1"}])
    world = run(plan_up(one, IMAGES, KEY, [], 3, {}), [])
    busy = {"c-worker-1": 1, "c-worker-2": 0, "c-worker-3": 1}
    actions = plan_up(one, IMAGES, KEY, world, 2, busy, with_master=False)
    assert [a.container.name for a in actions] == ["c-worker-2"]


def test_stopped_containers_are_started_not_recreated() -> None:
    world = run(plan_up(THREE, IMAGES, KEY, [], 2, {}), [])
    stopped = [Observed(**{**o.__dict__, "state": "exited"}) for o in world]
    actions = plan_up(THREE, IMAGES, KEY, stopped, 2, {})
    assert len(actions) == 3 and all(isinstance(a, Start) for a in actions)


def test_changed_image_or_key_replaces_containers_in_place() -> None:
    world = run(plan_up(THREE, IMAGES, KEY, [], 3, {}), [])
    new = Images(IMAGES.master, ImageRef("scheduler-slave:hash-c", "sha256:" + "c" * 64))
    actions = plan_up(THREE, new, KEY, world, 3, {})
    assert [type(a).__name__ for a in actions] == ["Remove", "Create"] * 3
    assert [(a.host, a.spec.index) for a in actions if isinstance(a, Create)] == [
        ("h1", 1), ("h2", 2), ("h3", 3)]  # fmt: skip
    rekeyed = plan_up(THREE, IMAGES, Secret("z" * 32), world, 3, {})
    assert len([a for a in rekeyed if isinstance(a, Create)]) == 4  # master too


def test_changed_host_labels_replace_that_hosts_workers_only() -> None:
    def labelled(h2: object) -> config.Config:
        return make_config([{"name": "h1"}, {"name": "h2", "labels": h2}, {"name": "h3"}])

    world = run(plan_up(labelled("gpu=1"), IMAGES, KEY, [], 6, {}), [])
    assert plan_up(labelled({"gpu": "1"}), IMAGES, KEY, world, 6, {}) == []  # same labels
    actions = plan_up(labelled("gpu=1,zone=b"), IMAGES, KEY, world, 6, {})
    assert [(type(a).__name__, a.host) for a in actions] == [
        ("Remove", "h2"), ("Remove", "h2"), ("Create", "h2"), ("Create", "h2")]  # fmt: skip
    assert {a.reason for a in actions if isinstance(a, Remove)} == {"outdated, replaced"}
    world = run(actions, world)
    assert workers_by_host(world) == {"h1": [1, 2], "h2": [3, 4], "h3": [5, 6]}
    assert plan_up(labelled("zone=b,gpu=1"), IMAGES, KEY, world, 6, {}) == []  # order: same
    unlabelled = plan_up(THREE, IMAGES, KEY, world, 6, {})  # labels dropped: replaced again
    assert {a.host for a in unlabelled} == {"h2"} and len(unlabelled) == 4


def test_unreachable_hosts_are_left_alone_and_not_compensated() -> None:
    actions = plan_up(THREE, IMAGES, KEY, [], 6, {}, reachable={"h1", "h3"})
    assert sorted({a.host for a in actions}) == ["h1", "h3"]
    assert len([a for a in actions if isinstance(a, Create)]) == 1 + 4


def test_new_workers_never_reuse_a_name_the_master_still_knows() -> None:
    actions = plan_up(THREE, IMAGES, KEY, [], 2, {"c-worker-1": 0, "c-worker-2": 1})
    assert [a.spec.name for a in actions[1:]] == ["c-worker-3", "c-worker-4"]


def test_duplicates_and_strays_are_removed() -> None:
    world = run(plan_up(THREE, IMAGES, KEY, [], 3, {}), [])
    dup = next(o for o in world if o.name == "c-worker-2")
    world.append(Observed(**{**dup.__dict__, "id": "copy", "host": "h3"}))
    world.append(Observed("h2", "odd", "c-odd", "sidecar", 0, "", "", "running"))
    actions = plan_up(THREE, IMAGES, KEY, world, 3, {})
    removed = sorted((a.container.id, a.reason) for a in actions if isinstance(a, Remove))
    assert removed == [("copy", "duplicate index"), ("odd", "unknown role 'sidecar'")]


def test_a_moved_master_is_removed_from_the_old_host() -> None:
    world = run(plan_up(THREE, IMAGES, KEY, [], 0, {}), [])
    moved = make_config([{"name": "h1"}, {"name": "h2"}, {"name": "h3"}], master={"host": "h2"})
    actions = plan_up(moved, IMAGES, KEY, world, 0, {})
    assert [(type(a).__name__, a.host) for a in actions] == [("Remove", "h1"), ("Create", "h2")]
    assert actions[0].reason == "master moved to another host"


def test_down_drains_workers_then_stops_the_master_then_volumes() -> None:
    world = run(plan_up(THREE, IMAGES, KEY, [], 3, {}), [])
    actions = plan_down(THREE, world, [state_volume(THREE)])
    assert [a.container.role for a in actions[:-1]] == ["worker"] * 3 + ["master"]
    assert actions[-1] == RemoveVolume("h1", "c-state")
    assert plan_down(THREE, [], []) == []


def test_images_go_only_where_new_containers_run_them() -> None:
    actions = plan_up(THREE, IMAGES, KEY, [], 2, {})
    assert images_needed(actions) == {"h1": (IMAGES.master, IMAGES.slave), "h2": (IMAGES.slave,)}
    world = run(actions, [])
    stopped = [Observed(**{**o.__dict__, "state": "exited"}) for o in world]
    assert images_needed(plan_up(THREE, IMAGES, KEY, stopped, 2, {})) == {}  # restarts: no images

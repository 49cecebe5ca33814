"""The shipping plan and the delta archive: which layers a host has, and what is sent. No engine."""

from __future__ import annotations

import io
import json
import tarfile
import zlib

from deploy.observed import Holdings
from deploy.shipplan import (
    Ship,
    delta_stream,
    empty_paths,
    gzipped,
    held_layers,
    plan_ship,
    read_manifest,
)
from deploy.specs import ImageRef

SLAVE = ImageRef("scheduler-slave:hash-b", "sha256:" + "b" * 64)
MASTER = ImageRef("scheduler-master:hash-a", "sha256:" + "a" * 64)
CHAINS = {SLAVE.ref: ("base", "kit", "slave"), MASTER.ref: ("base", "kit", "master")}


def test_held_layers_is_the_longest_shared_chain_prefix() -> None:
    host = Holdings({}, (("base",), ("base", "kit", "old"), ("other", "kit")))
    assert held_layers(("base", "kit", "slave"), host) == 2
    assert held_layers(("kit", "slave"), host) == 0  # a layer counts only with its whole chain
    assert held_layers(("base", "kit", "slave"), Holdings()) == 0


def test_ship_plan_sends_what_a_host_lacks_by_id_and_names_what_it_has() -> None:
    other = "sha256:" + "c" * 64
    needed = {h: (MASTER, SLAVE) if h == "h1" else (SLAVE,) for h in ("h1", "h2", "h3", "h4")}
    found = {
        "h1": Holdings({MASTER.ref: MASTER.id}, (CHAINS[MASTER.ref],)),
        "h2": Holdings({SLAVE.ref: other}, (("base", "kit", "older"),)),  # another build
        "h3": Holdings({SLAVE.ref: SLAVE.id}, (CHAINS[SLAVE.ref],)),
        "h4": Holdings({"scheduler-slave:latest": SLAVE.id}, (CHAINS[SLAVE.ref],)),
    }
    assert plan_ship(needed, found, CHAINS) == [
        Ship("h1", (SLAVE,), (None,), (), (2,), (3,)),
        Ship("h2", (SLAVE,), (other,), (), (2,), (3,)),
        Ship("h4", (), (), (SLAVE,)),
    ]  # fmt: skip
    assert plan_ship(needed, {"h3": found["h3"]}, CHAINS) == []  # unreachable: not in found


def saved(layers: dict[str, bytes], manifest: list[dict[str, object]]) -> tarfile.TarFile:
    """A `docker save`-shaped archive (legacy layout) in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        files = {**layers, "manifest.json": json.dumps(manifest).encode()}
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r:")


MANIFEST = [
    {"RepoTags": [SLAVE.ref], "Layers": ["l1/layer.tar", "l2/layer.tar", "l3/layer.tar"]},
    {"RepoTags": [MASTER.ref], "Layers": ["l1/layer.tar", "l2/layer.tar", "m3/layer.tar"]},
]


def test_a_layer_is_emptied_only_when_every_image_listing_it_has_it_held() -> None:
    assert empty_paths(MANIFEST, {SLAVE.ref: 2, MASTER.ref: 2}) == {"l1/layer.tar", "l2/layer.tar"}
    # l2 is the master's second layer too, and the master has only its first
    assert empty_paths(MANIFEST, {SLAVE.ref: 3, MASTER.ref: 1}) == {"l1/layer.tar", "l3/layer.tar"}
    assert empty_paths(MANIFEST, {}) == set()


def test_the_delta_archive_keeps_every_file_and_empties_the_held_layers() -> None:
    layers = {"l1/layer.tar": b"x" * 5000, "l2/layer.tar": b"y" * 700, "l3/layer.tar": b"z" * 10,
              "m3/layer.tar": b"m" * 10}  # fmt: skip
    archive = saved(layers, MANIFEST)
    empty = empty_paths(read_manifest(archive), {SLAVE.ref: 2, MASTER.ref: 2})
    data = zlib.decompress(b"".join(gzipped(delta_stream(archive, empty))), 31)
    with tarfile.open(fileobj=io.BytesIO(data)) as out:
        got = {m.name: out.extractfile(m).read() for m in out.getmembers()}  # type: ignore[union-attr]
    assert got["l1/layer.tar"] == b"" and got["l2/layer.tar"] == b""
    assert got["l3/layer.tar"] == b"z" * 10 and got["m3/layer.tar"] == b"m" * 10
    assert json.loads(got["manifest.json"]) == MANIFEST
    assert b"x" * 100 not in data  # the big held layer is not in it

"""What to send each host, and the delta archive that sends it. Pure: no engine, no network.

A host gets an image it lacks as a ``docker save`` archive in which every layer it already has
is an empty file: ``docker load`` skips reading a layer whose chain the engine holds, and the
image id comes out the same. A layer counts as held when some image on the host starts with
the same chain of layers (diff ids) up to and including it.
"""

from __future__ import annotations

import copy
import json
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from .observed import Holdings
from .specs import ImageRef

BLOCK = 512
CHUNK = 2**20


@dataclass(frozen=True)
class Ship:
    """Images a host lacks, by id, before its containers are made: sent (only the layers it
    lacks), or only named there when the host holds the same image under another name."""

    host: str
    images: tuple[ImageRef, ...]  # to send
    found: tuple[str | None, ...]  # the id each of those names has on the host now; None: absent
    names: tuple[ImageRef, ...] = ()  # there by id: only to be tagged
    held: tuple[int, ...] = ()  # per image to send: how many of its first layers the host has
    layers: tuple[int, ...] = ()  # per image to send: how many layers it has


def held_layers(chain: Sequence[str], holdings: Holdings) -> int:
    """How many of ``chain``'s first layers the host has (the longest shared prefix)."""
    best = 0
    for theirs in holdings.chains:
        n = 0
        for mine, other in zip(chain, theirs, strict=False):
            if mine != other:
                break
            n += 1
        best = max(best, n)
    return best


def plan_ship(
    needed: Mapping[str, Sequence[ImageRef]],
    found: Mapping[str, Holdings],
    chains: Mapping[str, Sequence[str]],
) -> list[Ship]:
    """A Ship for each host in ``found`` that lacks an image of ``needed``.

    ``chains`` gives each reference's layer chain here (empty when unknown: all is sent).
    """
    ships = []
    for host, have in found.items():
        lacking = [ref for ref in needed[host] if have.ids.get(ref.ref) != ref.id]
        send = tuple(ref for ref in lacking if not have.has_id(ref.id))
        name = tuple(ref for ref in lacking if have.has_id(ref.id))
        if lacking:
            ships.append(Ship(
                host, send, tuple(have.ids.get(r.ref) for r in send), name,
                tuple(held_layers(chains.get(r.ref, ()), have) for r in send),
                tuple(len(chains.get(r.ref, ())) for r in send),
            ))  # fmt: skip
    return ships


def empty_paths(manifest: Sequence[Mapping[str, Any]], held: Mapping[str, int]) -> set[str]:
    """Layer files of a ``docker save`` manifest that may be sent empty.

    ``held`` maps a reference (one of the manifest's RepoTags) to how many of its first
    layers the host has. A file shared by several images is emptied only if every image
    that lists it has it among the held ones.
    """
    verdict: dict[str, bool] = {}
    for entry in manifest:
        tags = [str(t) for t in entry.get("RepoTags") or ()]
        count = max((held.get(t, 0) for t in tags), default=0)
        for i, path in enumerate(entry.get("Layers") or ()):
            verdict[str(path)] = verdict.get(str(path), True) and i < count
    return {path for path, empty in verdict.items() if empty}


def read_manifest(archive: tarfile.TarFile) -> list[dict[str, Any]]:
    member = archive.extractfile("manifest.json")
    if member is None:
        raise ValueError("the archive has no manifest.json")
    return list(json.load(member))


def delta_stream(archive: tarfile.TarFile, empty: set[str]) -> Iterator[bytes]:
    """The archive again, in order, with the ``empty`` files sent as empty files."""
    for member in archive.getmembers():
        info = copy.copy(member)
        if member.name in empty:
            info.size = 0
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if info.size and member.isfile():
            source = archive.extractfile(member)
            assert source is not None
            yield from _blocks(source)
            if pad := -info.size % BLOCK:
                yield b"\0" * pad
    yield b"\0" * (2 * BLOCK)


def _blocks(source: IO[bytes]) -> Iterator[bytes]:
    while block := source.read(CHUNK):
        yield block


def gzipped(chunks: Iterable[bytes], level: int = 1) -> Iterator[bytes]:
    """A gzip stream of ``chunks`` (``docker load`` reads it as it is)."""
    packer = zlib.compressobj(level, zlib.DEFLATED, 31)
    for chunk in chunks:
        if out := packer.compress(chunk):
            yield out
    yield packer.flush()

"""Session fixtures of the test bed, imported by tests/conftest.py.

``docker_engine``: the machine's engine (started by scripts/engine.sh if none answers, and
stopped at the end only if this session started it: an engine found running, say the one
``make cluster-up`` started, stays). Under ``make test`` (ENGINE_OWNER set) make itself stops
the engine it started once pytest is done. ``role_images``: the master and slave images,
built by ``deploy.build`` (skipped when up to date). ``testbed``: three namespaced hosts
with their own engines and sshd. ``loopback_testbed``: three 127.0.0.x hosts on one sshd and
the machine's engine. Each is torn down at the end of the session if the session started it,
and the namespaced bed's tear-down is checked to leave nothing behind.

Developers sharing one machine: TESTBED_PREFIX/TESTBED_SUBNET give a session its own bed
(tests/testbed/layout.py), and TESTBED_KEEP_ENGINE=1 keeps the machine's engine running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from tests.testbed import bed
from tests.testbed.layout import Layout

ENGINE_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "engine.sh"
TEST_LABEL = "org.scheduler-kit.test"


def remove_labelled(client: docker.DockerClient, label: str = TEST_LABEL) -> None:
    """Remove containers (and their anonymous volumes) that tests labelled, crashed runs' too."""
    for container in client.containers.list(all=True, filters={"label": label}):
        container.remove(force=True, v=True)
    for volume in client.volumes.list(filters={"label": label}):
        volume.remove(force=True)


def engine_script(command: str, owner: str) -> None:
    subprocess.run([str(ENGINE_SCRIPT), command], check=True,
                   env={**os.environ, "ENGINE_OWNER": owner})


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    outer = os.environ.get("ENGINE_OWNER")  # make test: make stops the engine it started
    owner = outer or f"pytest-{os.getpid()}-{time.time_ns()}"
    engine_script("start", owner)
    client = docker.from_env(timeout=120)
    remove_labelled(client)
    yield client
    remove_labelled(client)
    client.close()
    if outer is None and os.environ.get("TESTBED_KEEP_ENGINE") != "1":
        engine_script("stop", owner)  # ends the engine only if this session started it


@pytest.fixture(scope="session")
def role_images(docker_engine: docker.DockerClient) -> Iterator[dict[str, str]]:
    """role -> a reference of this session's own to freshly built or up-to-date images.

    The session's tag keeps them while a later build in the same session (deployctl after a
    change) drops the older ``hash-`` tags; it is removed at the end.
    """
    from deploy.build import build_images
    from deploy.engine import Engines

    engines = Engines()
    try:
        built = build_images(engines, sys.stderr)
    finally:
        engines.close()
    session = f"session-{os.getpid()}"
    refs = {}
    for image in built:
        docker_engine.images.get(image.image_id).tag(image.repository, session)
        refs[image.role] = f"{image.repository}:{session}"
    yield refs
    for ref in refs.values():
        try:
            docker_engine.images.remove(ref)
        except docker.errors.APIError:
            pass  # still used by a container another session made: it goes with that


@pytest.fixture(scope="session")
def testbed_layout() -> Layout:
    """Read once: the autouse fixtures of single tests may change the environment."""
    return Layout.from_env()


@pytest.fixture(scope="session")
def testbed(testbed_layout: Layout) -> Iterator[bed.Testbed]:
    running = bed.up(3, testbed_layout)
    yield running
    if running.started:
        bed.down(testbed_layout)
        assert bed.leftovers(testbed_layout) == [], "the test bed's tear-down left these"


@pytest.fixture(scope="session")
def loopback_testbed(docker_engine: docker.DockerClient,
                     testbed_layout: Layout) -> Iterator[bed.Testbed]:
    running = bed.loopback_up(3, testbed_layout)
    yield running
    if running.started:
        bed.loopback_down(testbed_layout)

"""Tests never stop what they did not start: an engine (and the cluster on it) that was running
before a test session runs after it; an engine the session started goes with it.

Played on a second engine of our own (its own socket, data and exec root), so the machine's
engine, which this very session uses, is never at stake.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest

from tests.testbed.fixtures import ENGINE_SCRIPT

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SESSION = Path(__file__).with_name("engine_session.py")
USER_LABEL = {"deployctl.cluster": "users-cluster"}


@dataclass
class SecondEngine:
    run_dir: Path
    data_root: Path

    @property
    def url(self) -> str:
        return f"unix://{self.run_dir}/docker.sock"

    def env(self, owner: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "ENGINE_OWNER"}
        env.update(DOCKER_HOST=self.url, ENGINE_RUN_DIR=str(self.run_dir),
                   ENGINE_DATA_ROOT=str(self.data_root))  # fmt: skip
        if owner is not None:
            env["ENGINE_OWNER"] = owner
        return env

    def script(self, command: str, owner: str | None = None) -> None:
        subprocess.run([str(ENGINE_SCRIPT), command], env=self.env(owner), check=True,
                       capture_output=True, timeout=120)  # fmt: skip

    @contextlib.contextmanager
    def client(self, timeout: int = 120) -> Iterator[docker.DockerClient]:
        client = docker.DockerClient(base_url=self.url, timeout=timeout)
        try:
            yield client
        finally:
            client.close()

    def answers(self) -> bool:
        try:
            with self.client(5) as client:
                return bool(client.ping())
        except (docker.errors.DockerException, OSError):
            return False

    def session(self, owner: str | None = None) -> subprocess.CompletedProcess[str]:
        """A child pytest session against this engine, as `pytest` (or `make test`) runs."""
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(SESSION)],
            cwd=ROOT, env=self.env(owner), capture_output=True, text=True, timeout=300)


@pytest.fixture
def second(docker_engine: docker.DockerClient) -> Iterator[SecondEngine]:
    name = f"sk-own-{uuid.uuid4().hex[:6]}"
    engine = SecondEngine(Path("/run") / name, Path("/var/lib") / name)
    yield engine
    engine.script("stop")  # no owner: ends whatever engine.sh started there
    for path in (engine.run_dir, engine.data_root):  # dockerd leaves mounts (netns, overlays)
        for point in sorted(_mounts_below(path), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
    assert not engine.run_dir.exists() and not engine.data_root.exists()


def _mounts_below(root: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(f"{root}/")]


def _users_cluster(engine: SecondEngine, base: docker.models.images.Image) -> str:
    """A running container of someone's cluster, as `make cluster-up` leaves one."""
    with engine.client() as client:
        client.images.load(base.save(chunk_size=1 << 20))
        made = client.containers.run(base.id, ["python3", "-c", "import time; time.sleep(600)"],
                                     labels=USER_LABEL, detach=True, network_mode="host",
                                     init=True, user="root")  # fmt: skip
        return str(made.id)


def _running(engine: SecondEngine, cid: str) -> bool:
    with engine.client() as client:
        return bool(client.containers.get(cid).status == "running")


def test_a_session_leaves_running_the_engine_and_cluster_it_found(
    second: SecondEngine, docker_engine: docker.DockerClient, role_images: dict[str, str]
) -> None:  # fmt: skip
    second.script("start")  # `make cluster-up` / `make deps`: no owner
    base = docker_engine.images.get(role_images["slave"])
    cid = _users_cluster(second, base)
    for owner in (None, "make-test-1"):  # pytest by hand, then under `make test`
        proc = second.session(owner)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert second.answers() and _running(second, cid)
    second.script("stop", owner="make-test-1")  # what make does at the end: not its engine
    assert second.answers() and _running(second, cid)


def test_a_session_stops_the_engine_it_started(second: SecondEngine) -> None:
    assert not second.answers()
    proc = second.session()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not second.answers()


def test_under_make_the_engine_make_started_is_left_to_make(second: SecondEngine) -> None:
    second.script("start", owner="make-test-2")  # the bootstrap step of `make test`
    proc = second.session("make-test-2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert second.answers()  # pytest is done, make is not: its trap stops the engine
    second.script("stop", owner="make-test-2")
    assert not second.answers()

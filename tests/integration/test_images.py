"""The role images on the test bed: master on tb1, slaves on tb2 and tb3, all host networking.

Images are built on the machine's engine, shipped to the empty host engines by save | load
through the SDK (to tb1 over SSH as the deploy CLI does; to tb2 and tb3 on their sockets, which
is quicker: paramiko moves about 13 MB/s), and started through the SDK.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker
import pytest
from docker.models.containers import Container

from scheduler import Client
from tests.testbed import Host, Testbed, docker_client
from tests.testbed.fixtures import TEST_LABEL, remove_labelled

pytestmark = pytest.mark.integration

PORT = 18888  # not the default, so a cluster of another test cannot answer
GRACE = 15  # the slaves' drain grace; the engine's stop timeout must exceed it
LABELS = {TEST_LABEL: "images"}
SECOND = 1_000_000_000  # the engine counts health-check times in nanoseconds
# Only the timing: the test command stays the image's own HEALTHCHECK.
FAST_HEALTH = {"interval": SECOND, "timeout": 5 * SECOND, "retries": 3, "start_period": 0}


def ship(source: docker.DockerClient, target: docker.DockerClient, ref: str) -> None:
    """docker save | docker load, streamed through the SDK; skipped if the image is there."""
    image = source.images.get(ref)
    if any(ref in img.tags for img in target.images.list()):
        return
    target.images.load(image.save(chunk_size=1 << 20, named=ref))


def run_container(engine: docker.DockerClient, image: str, name: str,
                  environment: dict[str, str], *, binds: dict[str, Any] | None = None,
                  stop_timeout: int | None = None) -> Container:
    """Create and start a host-networked container (the low-level call: run() lacks
    stop_timeout); the test label marks it for clean-up."""
    api = engine.api
    created = api.create_container(
        image, name=name, environment=environment, labels=LABELS, healthcheck=FAST_HEALTH,
        stop_timeout=stop_timeout,
        host_config=api.create_host_config(network_mode="host", binds=binds, init=True))
    container = engine.containers.get(created["Id"])
    container.start()
    return container


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def health(container: Container) -> str:
    container.reload()
    return str(container.attrs["State"].get("Health", {}).get("Status", "none"))


def wait_healthy(container: Container, timeout: float = 60) -> None:
    wait_until(lambda: health(container) == "healthy", timeout, f"{container.name} healthy")


@dataclass
class ImageCluster:
    """The running containers of the test, and how to reach the master."""

    testbed: Testbed
    engines: dict[str, docker.DockerClient]
    images: dict[str, str]
    authkey: str
    master: Container
    slaves: dict[str, Container]

    @property
    def master_host(self) -> Host:
        return self.testbed.hosts[0]

    def client(self) -> Client:
        return Client(master=f"{self.master_host.address}:{PORT}", authkey=self.authkey)

    def start_master(self) -> Container:
        self.master = run_container(
            self.engines[self.master_host.name], self.images["master"], "sk-test-master",
            {"SCHEDULER_AUTHKEY": self.authkey, "SCHEDULER_BIND": f"0.0.0.0:{PORT}",
             "SCHEDULER_LEASE_SECONDS": "6", "SCHEDULER_PROGRESS_SECONDS": "1"},
            binds={"sk-test-state": {"bind": "/var/lib/scheduler", "mode": "rw"}})
        return self.master

    def start_slave(self, host: Host) -> Container:
        self.slaves[host.name] = run_container(
            self.engines[host.name], self.images["slave"], "sk-test-slave",
            {"SCHEDULER_AUTHKEY": self.authkey,
             "SCHEDULER_MASTER": f"{self.master_host.address}:{PORT}",
             "SCHEDULER_WORKER_NAME": host.name, "SCHEDULER_CONCURRENCY": "2",
             "SCHEDULER_LEASE_SECONDS": "6", "SCHEDULER_GRACE_SECONDS": str(GRACE)},
            stop_timeout=GRACE + 15)
        return self.slaves[host.name]

    def logs(self) -> str:
        return self.master.logs().decode(errors="replace")


@pytest.fixture(scope="module")
def image_cluster(docker_engine: docker.DockerClient, role_images: dict[str, str],
                  testbed: Testbed) -> Iterator[ImageCluster]:
    master_host, *slave_hosts = testbed.hosts
    engines = {host.name: docker_client(host, over_ssh=host is master_host)
               for host in testbed.hosts}
    for engine in engines.values():
        remove_labelled(engine)
    plan = [(master_host, role_images["master"])]
    plan += [(host, role_images["slave"]) for host in slave_hosts]
    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(lambda job: ship(docker_engine, engines[job[0].name], job[1]), plan))
    engines[master_host.name].volumes.create("sk-test-state", labels=LABELS)
    key = secrets.token_urlsafe(24)
    cluster = ImageCluster(testbed, engines, role_images, key, None, {})  # type: ignore[arg-type]
    try:
        cluster.start_master()
        for host in slave_hosts:
            cluster.start_slave(host)
        yield cluster
    finally:
        for engine in engines.values():
            remove_labelled(engine)
            engine.close()


def test_health_checks_report_healthy(image_cluster: ImageCluster) -> None:
    for container in [image_cluster.master, *image_cluster.slaves.values()]:
        wait_healthy(container)
        assert container.attrs["Config"]["Healthcheck"]["Test"][1].endswith("healthcheck")
    assert image_cluster.master.attrs["Config"]["User"] == "scheduler"


def test_batch_of_shell_and_python_jobs_completes(image_cluster: ImageCluster) -> None:
    def cube(x: int) -> int:
        return x**3

    with image_cluster.client() as client:
        shell = [client.submit_shell(["sh", "-c", f"sleep 0.3; echo $(({i} * 7)) $(hostname)"])
                 for i in range(12)]
        assert client.map(cube, range(40)) == [x**3 for x in range(40)]
        outputs = [handle.get(timeout=60).split() for handle in shell]
        status = client.status()
    assert [int(out[0]) for out in outputs] == [i * 7 for i in range(12)]
    assert {out[1] for out in outputs} == {"tb2", "tb3"}  # ran on both slave hosts
    assert {w["name"] for w in status["workers"]} == {"tb2", "tb3"}
    assert status["counts"]["failed"] == 0


def test_master_logs_show_dispatch_and_progress(image_cluster: ImageCluster) -> None:
    logs = image_cluster.logs()
    assert "dispatched to tb2" in logs and "dispatched to tb3" in logs
    assert "succeeded on" in logs
    assert "progress:" in logs
    assert image_cluster.authkey not in logs


def test_stopping_a_busy_slave_drains_it(image_cluster: ImageCluster) -> None:
    busy = image_cluster.slaves["tb2"]
    with image_cluster.client() as client:
        handles = [client.submit_shell(["sh", "-c", "sleep 2; echo done"]) for _ in range(8)]
        client.flush()
        running = wait_until(lambda: _running_on(client, "tb2"), 30, "a job running on tb2")
        started = time.monotonic()
        busy.stop(timeout=GRACE + 15)
        stopped_in = time.monotonic() - started
        results = [handle.get(timeout=90) for handle in handles]
        counts = client.status()["counts"]
        drained = [client.job(job_id) for job_id in running]
    busy.reload()
    assert busy.attrs["State"]["ExitCode"] == 0, busy.logs().decode()[-2000:]
    assert stopped_in < GRACE, "the slave was killed instead of draining"
    assert "draining" in busy.logs().decode()
    # What tb2 held when stopped finished there or went back to the queue unharmed (a job
    # it had leased but not started runs on tb3): none was killed and retried.
    assert [(j["state"], j["attempts"]) for j in drained] == [("succeeded", 1)] * len(running)
    assert [r.strip() for r in results] == ["done"] * 8
    assert counts["failed"] == 0 and counts["queued"] == 0 and counts["running"] == 0
    busy.start()
    wait_healthy(busy)


def test_killed_master_restarted_on_its_volume_keeps_queued_jobs(
    image_cluster: ImageCluster,
) -> None:
    for slave in image_cluster.slaves.values():
        slave.stop(timeout=GRACE + 15)
    with image_cluster.client() as client:
        ids = [client.submit_shell(["echo", f"kept {i}"]).id for i in range(6)]
        # Queued, not leased: wait until the master has seen both slaves leave.
        wait_until(lambda: client.status()["counts"]["queued"] == 6, 30, "6 queued jobs")
    image_cluster.master.kill()
    image_cluster.master.remove()
    wait_healthy(image_cluster.start_master())
    for slave in image_cluster.slaves.values():
        slave.start()
    with image_cluster.client() as client:
        jobs = client.wait(ids, timeout=60)
    assert [job["state"] for job in jobs] == ["succeeded"] * 6
    for slave in image_cluster.slaves.values():
        wait_healthy(slave)


def _running_on(client: Client, worker: str) -> list[int]:
    """The ids of the jobs ``worker`` runs now (empty if none)."""
    found = [w["running"] for w in client.status()["workers"] if w["name"] == worker]
    return list(found[0]) if found else []

"""deployctl with mutual TLS on the 3-host test bed (issue #13, item 4): the real CLI, engines
and sshd; certificates from the cluster's own CA beside the inventory.

The CLI runs as a subprocess with HOME at the bed's client home, as in test_deployctl.py. The
master's TLS is checked from here with ``scheduler.tls`` (the workers' hosts are reachable on
the bed's bridge): a plain connection gets no challenge, deployctl's certificate is accepted,
a revoked worker's is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from scheduler import certs, tls
from tests.integration.test_deployctl import host_engine, remove_cluster
from tests.testbed import Testbed

pytestmark = pytest.mark.integration

CLUSTER = "itls"
PORT = 18920  # not test_deployctl.py's 18890..18897
LABEL = f"deployctl.cluster={CLUSTER}"
DEPLOYCTL = Path(sys.executable).with_name("deployctl")
PEM = re.compile(r"-----(BEGIN|END) ")


@dataclass
class Bed:
    testbed: Testbed
    workdir: Path
    outputs: list[str]  # everything deployctl printed, checked for key material at the end

    @property
    def certs(self) -> Path:
        return self.workdir / f"{CLUSTER}.certs"

    def engine(self, name: str) -> contextlib.AbstractContextManager[docker.DockerClient]:
        return host_engine(self.testbed, name)

    def containers(self) -> dict[str, dict[str, str]]:
        """host -> {name: id} of this cluster's containers, from each engine directly."""
        out = {}
        for host in self.testbed.hosts:
            with self.engine(host.name) as client:
                found = client.containers.list(all=True, filters={"label": LABEL})
                out[host.name] = {c.name: c.id for c in found}
        return out

    def where(self, name: str) -> str:
        return next(h for h, found in self.containers().items() if name in found)

    def address(self, name: str) -> str:
        return next(h.address for h in self.testbed.hosts if h.name == name)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SCHEDULER_", "DEPLOYCTL_"))}  # fmt: skip
        env["HOME"] = str(self.testbed.hosts[0].home)
        proc = subprocess.run([str(DEPLOYCTL), "-i", "cluster.toml", *args], cwd=self.workdir,
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        self.outputs += [proc.stdout, proc.stderr]
        if check and proc.returncode != 0:
            raise AssertionError(f"deployctl {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")  # fmt: skip
        return proc

    def authkey(self) -> str:
        return (self.workdir / f"{CLUSTER}.authkey").read_text().strip()

    def secrets(self) -> list[str]:
        """The authkey and every line of every private key deployctl's CA directory holds."""
        lines = [line for key in self.certs.glob("*.key") for line in key.read_text().splitlines()
                 if line and not line.startswith("-----")]  # fmt: skip
        return [self.authkey(), *lines]

    def client_tls(self, name: str) -> Any:
        return tls.client_context(tls.TLSConfig(self.certs / "ca.pem", self.certs / f"{name}.pem",
                                                self.certs / f"{name}.key"))  # fmt: skip


def _wipe(bed: Bed) -> None:
    for host in bed.testbed.hosts:
        with bed.engine(host.name) as client:
            remove_cluster(client, LABEL)


@pytest.fixture(scope="module")
def bed(testbed: Testbed, role_images: dict[str, str], tmp_path_factory) -> Iterator[Bed]:
    workdir = tmp_path_factory.mktemp("deployctl-tls")
    b = Bed(testbed, workdir, [])
    # no master.tls: a cluster of several hosts runs with TLS by default
    (workdir / "cluster.toml").write_text(
        f'[cluster]\nname = "{CLUSTER}"\n[master]\nport = {PORT}\nready_timeout = 90\n'
        "[workers]\ncount = 4\nconcurrency = 2\ngrace_seconds = 5\n"
        + "".join(f'[[hosts]]\nname = "tb{i}"\n' for i in (1, 2, 3)))  # fmt: skip
    _wipe(b)
    yield b
    _wipe(b)


@pytest.fixture(scope="module")
def up(bed: Bed) -> subprocess.CompletedProcess[str]:
    bed.run("init")
    return bed.run("up")


def test_init_makes_the_ca_beside_the_inventory_and_never_replaces_it(bed: Bed) -> None:
    first = bed.run("init").stdout
    assert f"CA created: {bed.certs}" in first
    ca_key = (bed.certs / "ca.key").read_bytes()
    assert stat.S_IMODE(bed.certs.stat().st_mode) == 0o700
    assert stat.S_IMODE((bed.certs / "ca.key").stat().st_mode) == 0o600
    assert f"CA already there (kept): {bed.certs}" in bed.run("init").stdout
    assert (bed.certs / "ca.key").read_bytes() == ca_key


def test_up_issues_a_certificate_per_container_and_runs_jobs_end_to_end(bed: Bed, up) -> None:
    issued = {c.name: c.role for c in certs.list_certs(bed.certs)}
    assert issued == {"itls-master": "master", "itls-deployctl": "client",
                      **{f"itls-worker-{i}": "worker" for i in range(1, 5)}}  # fmt: skip
    for i in range(1, 5):
        assert f"issued certificate itls-worker-{i} (worker): new" in up.stderr
    jobs = bed.workdir / "batch.jobs"
    jobs.write_text("".join(f"sh -c 'sleep 0.3; echo tls job {i}'\n" for i in range(16)))
    bed.run("submit", "--wait", "--timeout", "180", "--file", str(jobs))
    done = json.loads(bed.run("jobs", "--json").stdout)
    ran = [j for j in done if "tls job" in j.get("command", "")]
    assert len(ran) == 16 and {j["state"] for j in ran} == {"succeeded"}
    assert len({j["worker"] for j in ran}) >= 2  # more than one host's worker took part
    view = json.loads(bed.run("status", "--json").stdout)
    assert {w["name"] for w in view["master"]["workers"]} == {
        f"itls-worker-{i}" for i in range(1, 5)}  # fmt: skip


def test_the_master_speaks_only_mutual_tls_with_certificates_of_the_clusters_ca(
    bed: Bed, up
) -> None:  # fmt: skip
    address = (bed.address("tb1"), PORT)
    conn = tls.connect(address, bed.authkey().encode(), context=bed.client_tls("itls-deployctl"))
    assert conn.identity == ("itls-master", "master")  # the master shows its own certificate
    conn.close()
    with socket.create_connection(address, timeout=30) as plain:  # the classic handshake
        plain.sendall(b"\x00\x00\x00\x04ping")
        try:
            answer = plain.recv(4096)
        except (TimeoutError, ConnectionResetError):
            answer = b""
    assert b"CHALLENGE" not in answer, "the master answered a plain connection"


def test_docker_inspect_shows_no_key_material(bed: Bed, up) -> None:
    secrets = bed.secrets()
    assert len(secrets) > 6  # the authkey and the bodies of 7 keys (CA, master, 4, deployctl)
    seen = 0
    for host in bed.testbed.hosts:
        with bed.engine(host.name) as client:
            for container in client.containers.list(all=True, filters={"label": LABEL}):
                info = client.api.inspect_container(container.id)
                config = info["Config"]
                shown = json.dumps([config.get("Env"), config.get("Labels"), config.get("Cmd"),
                                    config.get("Entrypoint"), info.get("Args")])  # fmt: skip
                whole = json.dumps(info)
                for text in (shown, whole):
                    assert not PEM.search(text), (container.name, text)
                    assert not [s for s in secrets if s in text], container.name
                env = dict(e.split("=", 1) for e in config["Env"])
                assert "SCHEDULER_AUTHKEY" not in env
                assert env["SCHEDULER_TLS_KEY"] == f"/etc/scheduler/tls/{container.name}.key"
                mount = next(m for m in info["Mounts"] if m["Destination"] == "/etc/scheduler/tls")
                assert (mount["Type"], mount["Name"], mount["RW"]) == (
                    "volume", f"{container.name}-tls", False)  # fmt: skip
                listing = container.exec_run(["stat", "-c", "%n %a %U", *(
                    f"/etc/scheduler/tls/{f}" for f in (f"{container.name}.key", "authkey"))])
                assert listing.exit_code == 0, listing.output
                assert [line.split()[1:] for line in listing.output.decode().splitlines()] == [
                    ["400", "scheduler"], ["400", "scheduler"]]  # fmt: skip
                seen += 1
            for volume in client.volumes.list(filters={"label": LABEL}):
                assert not [s for s in secrets if s in json.dumps(volume.attrs)]
    assert seen == 5  # the master and four workers


def _serial_inside(bed: Bed, name: str) -> str:
    with bed.engine(bed.where(name)) as client:
        return client.containers.get(name).exec_run(
            ["cat", f"/etc/scheduler/tls/{name}.pem"]).output.decode()  # fmt: skip


def test_up_reissues_a_certificate_expiring_within_30_days_and_replaces_only_its_container(
    bed: Bed, up
) -> None:  # fmt: skip
    before = bed.containers()
    certs.issue(bed.certs, "itls-worker-2", "worker", days=10)  # as if 80 days had passed
    soon = (bed.certs / "itls-worker-2.pem").read_text()
    rotated = bed.run("up", "--no-build", "--verbose")  # debug logs too: checked at the end
    assert "issued certificate itls-worker-2 (worker): expires in 9 day(s)" in rotated.stderr
    assert rotated.stderr.count("issued certificate") == 1
    after = bed.containers()
    changed = {n for h in after for n in after[h] if before[h].get(n) != after[h][n]}
    assert changed == {"itls-worker-2"}, rotated.stderr
    fresh = (bed.certs / "itls-worker-2.pem").read_text()
    assert fresh != soon and _serial_inside(bed, "itls-worker-2") == fresh
    view = json.loads(bed.run("status", "--json").stdout)
    assert "itls-worker-2" in {w["name"] for w in view["master"]["workers"]}
    again = bed.run("up", "--no-build")  # nothing expires soon any more: nothing changes
    assert "issued" not in again.stderr and bed.containers() == after


def test_revoke_cuts_the_worker_off_and_removes_it(bed: Bed, up, tmp_path: Path) -> None:
    name = "itls-worker-3"
    host = bed.where(name)
    address = (bed.address("tb1"), PORT)
    key = bed.authkey().encode()
    kept = tmp_path / "revoked"  # the worker's files, as a thief of its host would have them
    shutil.copytree(bed.certs, kept)
    stolen = tls.client_context(tls.TLSConfig(kept / "ca.pem", kept / f"{name}.pem",
                                              kept / f"{name}.key"))  # fmt: skip
    tls.connect(address, key, context=stolen).close()  # accepted while the worker is trusted

    proc = bed.run("revoke", "worker-3")
    assert proc.stdout.startswith(f"revoked {name}: 1 certificate(s); revocation list sent to "
                                  f"the master on tb1; removed {host}/{name}"), proc.stdout
    assert name not in bed.containers()[host]
    with bed.engine(host) as client, pytest.raises(docker.errors.NotFound):
        client.volumes.get(f"{name}-tls")  # its key went with it
    assert [c.revoked for c in certs.list_certs(bed.certs) if c.name == name] == [True]
    with pytest.raises(tls.TLSRefused, match="revoked"):
        tls.connect(address, key, context=stolen)  # the running master read the new list
    tls.connect(address, key, context=bed.client_tls("itls-deployctl")).close()  # others: yes
    bed.run("submit", "--wait", "--timeout", "120", "--", "echo", "after the revocation")

    # workers.count: `up` makes a replacement, with a certificate of its own (under the same
    # name only if the master has already forgotten the revoked worker: a new serial then)
    before = {n for found in bed.containers().values() for n in found}
    again = bed.run("up", "--no-build")
    (fresh,) = {n for found in bed.containers().values() for n in found} - before
    assert re.search(rf"issued certificate {fresh} \(worker\): (new|revoked)\n", again.stderr)
    assert not next(c for c in certs.list_certs(bed.certs) if c.name == fresh).revoked
    view = json.loads(bed.run("status", "--json").stdout)
    assert fresh in {w["name"] for w in view["master"]["workers"]}


def test_deployctl_printed_no_key_material(bed: Bed, up) -> None:
    bed.run("up", "--dry-run")
    bed.run("logs", "--tail", "20")
    secrets = bed.secrets()
    for text in bed.outputs:
        assert not PEM.search(text), text
        assert not [s for s in secrets if s in text]


def test_down_leaves_no_key_behind(bed: Bed, up) -> None:
    bed.run("down")
    for host in bed.testbed.hosts:
        with bed.engine(host.name) as client:
            assert client.containers.list(all=True, filters={"label": LABEL}) == []
            left = [v.name for v in client.volumes.list(filters={"label": LABEL})]
            assert [v for v in left if v.endswith("-tls")] == []

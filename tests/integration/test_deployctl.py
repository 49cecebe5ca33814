"""deployctl on the test bed: three hosts with their own engines and sshd, the real CLI.

The CLI runs as a subprocess with HOME set to the test bed's client home, so paramiko finds
the bed's ~/.ssh/config, key and known_hosts exactly as a user's would be found. The hosts are
ssh aliases (``Host tb1`` / ``HostName 10.213.47.11``) that nothing else resolves.
The last tests install the kit's wheel in a fresh virtualenv and deploy with that deployctl.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import pytest

from tests.testbed import Layout, Testbed, wheelenv
from tests.testbed.bed import up as bring_up
from tests.testbed.layout import host_dir
from tests.testbed.procs import live_pid

pytestmark = pytest.mark.integration

CLUSTER = "itest"
PORT = 18890  # not the image tests' 8888, so a leftover of theirs cannot collide
LABEL = f"deployctl.cluster={CLUSTER}"
DEPLOYCTL = Path(sys.executable).with_name("deployctl")


@contextlib.contextmanager
def host_engine(testbed: Testbed, name: str) -> Iterator[docker.DockerClient]:
    """A client of the bed host's engine, on its own socket (not over SSH)."""
    host = next(h for h in testbed.hosts if h.name == name)
    client = docker.DockerClient(base_url=host.docker_url, timeout=120)
    try:
        yield client
    finally:
        client.close()


def remove_cluster(client: docker.DockerClient, label: str) -> None:
    """Remove a cluster's containers and volumes (journal, TLS files) by its label."""
    for c in client.containers.list(all=True, filters={"label": label}):
        c.remove(force=True)
    for v in client.volumes.list(filters={"label": label}):
        v.remove(force=True)


@dataclass
class Bed:
    testbed: Testbed
    home: Path
    workdir: Path

    def engine(self, name: str) -> contextlib.AbstractContextManager[docker.DockerClient]:
        return host_engine(self.testbed, name)

    def containers(self) -> dict[str, list[tuple[str, str]]]:
        """host -> [(name, id)] of this cluster's containers, read from each engine directly."""
        out = {}
        for host in self.testbed.hosts:
            with self.engine(host.name) as client:
                found = client.containers.list(all=True, filters={"label": LABEL})
                out[host.name] = sorted((c.name, c.id) for c in found)
        return out

    def address(self, name: str) -> str:
        return next(h.address for h in self.testbed.hosts if h.name == name)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SCHEDULER_", "DEPLOYCTL_"))}  # fmt: skip
        env["HOME"] = str(self.home)
        return env

    def run(self, *args: str, inventory: str | None = "cluster.toml", check: bool = True,
            timeout: float = 300, deployctl: Path = DEPLOYCTL,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``deployctl -i INVENTORY ARGS`` (no -i when ``inventory`` is None)."""
        given = ["-i", inventory] if inventory else []
        proc = subprocess.run([str(deployctl), *given, *args], cwd=cwd or self.workdir,
                              env=self.env(), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"deployctl {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")  # fmt: skip
        return proc


def inventory(hosts: list[str], extra: str = "", workers: int = 5) -> str:
    body = (f'[cluster]\nname = "{CLUSTER}"\n[master]\nport = {PORT}\nready_timeout = 90\n'
            f"[workers]\ncount = {workers}\nconcurrency = 2\ngrace_seconds = 10\n")  # fmt: skip
    return body + "".join(f'[[hosts]]\nname = "{h}"\n' for h in hosts) + extra


OUR_IMAGES = ("scheduler-master:", "scheduler-slave:", "scheduler-base:", "wtest-master:",
              "wtest-slave:")  # fmt: skip


def remove_everywhere(testbed: Testbed, label: str) -> None:
    """Remove a cluster's containers and volumes from every host of the bed."""
    for host in testbed.hosts:
        with host_engine(testbed, host.name) as client:
            remove_cluster(client, label)


def _wipe(bed: Bed, images: bool) -> None:
    remove_everywhere(bed.testbed, LABEL)
    if not images:
        return
    for host in bed.testbed.hosts:  # make the engines empty of our images: `up` ships them
        with bed.engine(host.name) as client:
            for image in client.images.list():
                if any(t.startswith(OUR_IMAGES) for t in image.tags):
                    try:
                        client.images.remove(image.id, force=True)
                    except docker.errors.APIError:
                        pass  # in use by another test's container: it stays


@pytest.fixture(scope="module")
def bed(testbed: Testbed, role_images: dict[str, str], tmp_path_factory) -> Iterator[Bed]:
    workdir = tmp_path_factory.mktemp("deployctl")
    b = Bed(testbed, testbed.hosts[0].home, workdir)
    (workdir / "cluster.toml").write_text(inventory(["tb1", "tb2", "tb3"]))
    _wipe(b, images=True)
    yield b
    _wipe(b, images=False)


@pytest.fixture(scope="module")
def up(bed: Bed) -> subprocess.CompletedProcess[str]:
    return bed.run("up")


def status(bed: Bed, inventory: str = "cluster.toml") -> dict:
    return json.loads(bed.run("status", "--json", inventory=inventory, check=False).stdout)


def test_up_ships_images_and_spreads_workers(bed: Bed, up) -> None:
    assert "tb2: images loaded" in up.stderr and "tb3: images loaded" in up.stderr
    found = bed.containers()
    names = {h: [n for n, _ in found[h]] for h in found}
    assert names["tb1"] == ["itest-master", "itest-worker-1", "itest-worker-2"]
    assert names["tb2"] == ["itest-worker-3", "itest-worker-4"]
    assert names["tb3"] == ["itest-worker-5"]
    assert "itest-worker-5" in up.stdout  # the table printed at the end


def test_up_waits_until_workers_registered(bed: Bed, up) -> None:
    view = status(bed)
    registered = {w["name"] for w in view["master"]["workers"]}
    assert {f"itest-worker-{i}" for i in range(1, 6)} <= registered


def test_second_up_touches_nothing(bed: Bed, up) -> None:
    before = bed.containers()
    # --no-build: the checkout's scheduler/ may be edited while the suite runs; that a build
    # with unchanged inputs is skipped is checked with the wheel's frozen copy below
    again = bed.run("up", "--no-build")
    assert bed.containers() == before
    assert "shipping" not in again.stderr and "started" not in again.stderr
    assert bed.run("up", "--dry-run").stdout.startswith("nothing to do")


def test_hosts_as_ssh_aliases_and_options_after_the_command(bed: Bed, up) -> None:
    """`--hosts "tb1 tb2 tb3"` after the command: the aliases resolve through ~/.ssh/config to
    the same addresses the inventory gave, so the cluster is the same and nothing changes; the
    workers dial the master's address, never the alias (which no container resolves)."""
    before = bed.containers()
    again = bed.run("up", "--no-build", "--hosts", "tb1 tb2 tb3", "--verbose", inventory=None)
    assert bed.containers() == before, again.stderr
    with bed.engine("tb2") as client:
        worker = client.containers.list(filters={"label": LABEL})[0]
        env = dict(e.split("=", 1) for e in worker.attrs["Config"]["Env"])
    assert env["SCHEDULER_MASTER"] == f"{bed.address('tb1')}:{PORT}"
    view = json.loads(bed.run("status", "--json", "--hosts", "tb1 tb2 tb3",
                              inventory=None).stdout)  # fmt: skip
    assert view["healthy"] and view["hosts"][0]["address"] == bed.address("tb1")
    assert "--hosts" in bed.run("scale", "--help", inventory=None).stdout  # listed everywhere


def test_status_does_not_alarm_the_master(bed: Bed, up) -> None:
    """Reaching the master from deployctl is an authenticated connection, not a probe that
    the master logs as a refused peer."""
    started = time.time()
    for _ in range(3):
        bed.run("status")
    lines = bed.run("logs", "master", "--since", f"{started - 1:.3f}").stdout.splitlines()
    assert not [line for line in lines if "WARNING" in line or "refused" in line], lines


def test_status_json(bed: Bed, up) -> None:
    view = status(bed)
    assert view["healthy"] is True
    hosts = {h["name"]: h for h in view["hosts"]}
    assert all(h["reachable"] for h in hosts.values())
    assert [c["name"] for c in hosts["tb1"]["containers"] if c["role"] == "master"] == [
        "itest-master"]  # fmt: skip
    assert all(c["state"] == "running" for h in hosts.values() for c in h["containers"])
    assert set(view["master"]["jobs"]) >= {"queued", "running", "succeeded", "failed"}


def test_job_shows_one_job_with_its_reason_and_output(bed: Bed, up) -> None:
    failed = bed.run("submit", "--wait", "--", "sh", "-c",
                     "echo out-line; echo err-line >&2; exit 3", check=False)  # fmt: skip
    assert failed.returncode == 5, failed.stderr
    job_id = re.search(r"job (\d+) failed", failed.stderr).group(1)  # type: ignore[union-attr]
    shown = bed.run("job", job_id)
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines()[:2])
    assert fields == {"job": job_id, "state": "failed"}, shown.stdout
    assert re.search(r"^exit code\s+3$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^worker\s+itest-worker-\d", shown.stdout, re.M), shown.stdout
    assert "stdout:\n  out-line" in shown.stdout and "stderr:\n  err-line" in shown.stdout
    info = json.loads(bed.run("job", job_id, "--json").stdout)
    assert (info["id"], info["state"], info["exit_code"]) == (int(job_id), "failed", 3)
    assert info["stderr"].strip() == "err-line"
    missing = bed.run("job", "987654321", check=False)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        "error: job 987654321: no such job on the master; see 'deployctl jobs' for the ids"]


def test_metrics_through_ssh_match_the_masters_status(bed: Bed, up) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = bed.run("metrics").stdout
    after = status(bed)["master"]  # idle cluster: nothing changes between the two
    samples = {(s.name, s.labels.get("state", "")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert samples[("scheduler_jobs", state)] == after["jobs"][state], (state, after)
    assert samples[("scheduler_workers_connected", "")] == len(after["workers"]) == 5
    assert samples[("scheduler_slots", "")] == 10  # 5 workers x concurrency 2
    closed = '[env]\nSCHEDULER_HTTP = "127.0.0.1:1"\n'  # read from the inventory: no `up`
    (bed.workdir / "nohttp.toml").write_text(inventory(["tb1", "tb2", "tb3"], closed))
    refused = bed.run("metrics", inventory="nohttp.toml", check=False)
    assert refused.returncode == 3 and refused.stdout == "", refused.stdout
    assert refused.stderr.startswith("error: host tb1 (") and len(refused.stderr.splitlines()) == 1
    assert "no HTTP answer from 127.0.0.1:1 there: connect failed" in refused.stderr


def test_dashboard_tunnels_until_ctrl_c(bed: Bed, up) -> None:
    env = {k: v for k, v in bed.env().items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    port = _free_port()
    proc = subprocess.Popen([str(DEPLOYCTL), "-i", "cluster.toml", "dashboard", "--port",
                             str(port)], cwd=bed.workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert url == f"http://127.0.0.1:{port}/", (url, proc.poll())
        with urllib.request.urlopen(url + "api/status", timeout=10) as answer:
            view = json.load(answer)
        assert {w["name"] for w in view["workers"]} == {f"itest-worker-{i}" for i in range(1, 6)}
        with urllib.request.urlopen(url, timeout=10) as page:
            assert b"<html" in page.read().lower()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert "tunnel closed" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as holder:  # a local port in use: one line, exit 1
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = bed.run("dashboard", "--port", str(holder.getsockname()[1]), check=False)
    assert busy.returncode == 1 and busy.stdout == "", busy.stdout
    assert busy.stderr.startswith("error: local port ") and "cannot listen" in busy.stderr


def test_top_once_prints_one_frame_of_the_cluster(bed: Bed, up) -> None:
    frame = bed.run("top", "--once", "--interval", "0.2").stdout
    for word in ("queued", "succeeded", "jobs/s", "ETA", "itest-worker-5"):
        assert word in frame, (word, frame)


def test_dry_run_shows_the_plan_without_the_key(bed: Bed, up) -> None:
    plan = bed.run("scale", "workers", "7", "--dry-run").stdout
    assert plan.count("create itest-worker-") == 2
    # several hosts: TLS by default, and the authkey is a file in each container's TLS volume
    assert "SCHEDULER_AUTHKEY_FILE=/etc/scheduler/tls/authkey" in plan
    assert "SCHEDULER_AUTHKEY=" not in plan
    key = (bed.workdir / f"{CLUSTER}.authkey").read_text().strip()
    assert oct((bed.workdir / f"{CLUSTER}.authkey").stat().st_mode)[-3:] == "600"
    for args in (["up", "--dry-run"], ["down", "--dry-run"], ["status"], ["logs", "--tail", "5"]):
        proc = bed.run(*args)
        assert key not in proc.stdout + proc.stderr
    assert len(bed.containers()["tb3"]) == 1  # the dry run changed nothing


def test_scale_up_and_down_during_a_batch_loses_no_job(bed: Bed, up) -> None:
    jobs = bed.workdir / "batch.jobs"
    jobs.write_text("".join(f"sh -c 'sleep 0.5; echo job {i}'\n" for i in range(40)))
    ids = [int(i) for i in bed.run("submit", "--file", str(jobs)).stdout.split()]
    bed.run("scale", "workers", "5")
    grown = bed.run("scale", "workers", "8")
    assert grown.stderr.count("started itest-worker-") == 3
    shrunk = bed.run("scale", "workers", "1")
    assert shrunk.stderr.count("removed itest-worker-") == 7
    assert sum(len(v) for v in bed.containers().values()) == 2  # master + one worker
    bed.run("submit", "--wait", "--timeout", "120", "--", "true")
    done = json.loads(bed.run("jobs", "--json").stdout)
    mine = [j for j in done if j["id"] in ids]
    assert len(mine) == 40 and {j["state"] for j in mine} == {"succeeded"}
    assert sorted(j["id"] for j in mine) == sorted(ids)
    bed.run("scale", "workers", "5")


def test_verify_kills_a_worker_and_the_master_and_accounts_for_every_job(bed: Bed, up) -> None:
    """`deployctl verify --restart-master`: the scheduler's chaos run on the deployed cluster,
    a worker container and the master's killed with the engine mid-batch."""
    proc = bed.run("verify", "--restart-master", "--jobs", "10", "--seconds", "3", "--json")
    report = json.loads(proc.stdout)
    assert report["ok"] and report["lost"] == [] and report["twice_on_healthy"] == []
    assert report["killed"].startswith("itest-worker-") and report["master_crashes"] == 1
    assert sorted(report["once"] + report["rerun_after_kill"]) == list(range(10))
    assert f"killed {report['killed']} (SIGKILL)" in proc.stderr
    assert "killed itest-master (SIGKILL)" in proc.stderr
    view = status(bed)  # the cluster is left as verify found it
    assert view["healthy"] and {c["state"] for h in view["hosts"] for c in h["containers"]} == {
        "running"}  # fmt: skip


def test_logs_show_dispatch_and_progress(bed: Bed, up) -> None:
    bed.run("submit", "--wait", "--", "sh", "-c", "echo hello; sleep 1")
    text = bed.run("logs", "master").stdout
    assert "tb1/itest-master" in text
    assert "dispatched" in text and "progress:" in text
    every = bed.run("logs", "--tail", "3").stdout
    assert "tb2/itest-worker-" in every and "tb1/itest-master" in every


@dataclass
class Follower:
    """``deployctl logs -f`` running in the background, its output collected line by line."""

    proc: subprocess.Popen[str]
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def start(cls, bed: Bed, *args: str) -> Follower:
        proc = subprocess.Popen([str(DEPLOYCTL), "logs", "-f", *args], cwd=bed.workdir,
                                env=bed.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        follower = cls(proc)
        for stream, into in ((proc.stdout, follower.out), (proc.stderr, follower.err)):
            threading.Thread(target=follower._read, args=(stream, into), daemon=True).start()
        return follower

    def _read(self, stream, into: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            with self.changed:
                into.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait(self, what: str, holds: Callable[[], bool], timeout: float = 60) -> None:
        with self.changed:
            if not self.changed.wait_for(holds, timeout):
                seen = "\n".join(self.out[-30:] + ["--- stderr"] + self.err)
                raise AssertionError(f"deployctl logs -f: no {what} within {timeout:g}s\n{seen}")

    def lines_of(self, who: str) -> list[str]:
        with self.changed:
            return [line for line in self.out if line.startswith(f"{who} ")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # how a user ends following
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def _drop_sshd(layout: Layout, host: str) -> None:
    """End the host's sshd: the listener (by its pidfile) and every process below it (the
    per-connection monitors, their unprivileged children that hold the connections, and the
    sessions they run), as the host going away would."""
    run_dir = host_dir(layout, host)
    listener = live_pid(run_dir / "sshd.pid", str(run_dir))
    assert listener is not None, f"{host}: sshd is not running"
    parents = {int(p.name): _parent(p) for p in Path("/proc").glob("[0-9]*")}
    doomed, grew = {listener}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in doomed} - doomed
        doomed |= below
        grew = bool(below)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _restart(bed: Bed, host: str, name: str) -> None:
    """Restart a container through the host's own engine socket (not over SSH)."""
    with bed.engine(host) as client:
        client.containers.get(name).restart(timeout=10)


def test_logs_follow_survives_a_host_dropping_out(
    bed: Bed, up, testbed_layout: Layout
) -> None:  # fmt: skip
    """tb3's sshd goes away mid-follow: the other hosts' lines keep coming, and the lines tb3
    wrote meanwhile come once it is back, none twice. (On a shared bed, other sessions over
    tb3's SSH are cut for those seconds too.)"""
    names = {h: [n for n, _ in found if "-worker-" in n] for h, found in bed.containers().items()}
    on_tb2, on_tb3 = f"tb2/{names['tb2'][0]}", f"tb3/{names['tb3'][0]}"
    connected = "connected to master"
    follower = Follower.start(bed, "--tail", "1")
    try:
        follower.wait("line from every host", lambda: {ln.split("/")[0] for ln in follower.out}
                      >= {"tb1", "tb2", "tb3"})  # fmt: skip
        _drop_sshd(testbed_layout, "tb3")
        follower.wait("warning about tb3", lambda: any(
            line.startswith(f"warning: {on_tb3}: ") for line in follower.err))  # fmt: skip
        before = len(follower.lines_of(on_tb3))
        _restart(bed, "tb3", names["tb3"][0])  # lines on tb3 while deployctl cannot reach it
        _restart(bed, "tb2", names["tb2"][0])
        follower.wait("tb2 line while tb3 is away", lambda: any(
            connected in line for line in follower.lines_of(on_tb2)[1:]))  # fmt: skip
        assert len(follower.lines_of(on_tb3)) == before  # tb3 really was out of reach
        bring_up(3, testbed_layout)  # sshd back; tb3's engine and containers never stopped
        follower.wait("tb3's lines from while it was away", lambda: any(
            connected in line for line in follower.lines_of(on_tb3)[before:]))  # fmt: skip
        # stderr and stdout are read by two threads here: the notice may come second
        follower.wait("tb3 followed again", lambda: f"{on_tb3}: following again" in follower.err)
        time.sleep(2)  # anything printed twice would come now
        tb3 = follower.lines_of(on_tb3)
        assert len(tb3) == len(set(tb3)), "a line of tb3 was printed twice"
        assert any("draining" in line for line in tb3[before:])  # from before the restart
    finally:
        code = follower.stop()
        bring_up(3, testbed_layout)  # whatever happened above, tb3's sshd runs again
    assert code == 130, f"exit {code}:\n" + "\n".join(follower.err)
    assert not any("Traceback" in line or "interrupted" in line for line in follower.err)


def _override(bed: Bed, name: str, host: str, line: str) -> None:
    text = inventory(["tb1", "tb2", "tb3"]).replace(
        f'name = "{host}"\n', f'name = "{host}"\n{line}'
    )
    (bed.workdir / name).write_text(text)


def test_unknown_host_key_is_refused_until_trusted(bed: Bed, up) -> None:
    fresh = bed.workdir / "fresh_known_hosts"
    fresh.write_text("")
    _override(bed, "fresh.toml", "tb2", f'known_hosts = "{fresh}"\n')
    refused = bed.run("status", inventory="fresh.toml", check=False)
    assert refused.returncode == 3
    match = re.search(rf"host tb2 \({re.escape(bed.address('tb2'))}:22\): host key not in "
                      r".*?(SHA256:\S+)\)", refused.stdout)  # fmt: skip
    assert match, refused.stdout
    assert "deployctl hosts trust tb2 --fingerprint" in refused.stdout
    wrong = bed.run("hosts", "trust", "tb2", "--fingerprint", "SHA256:nope",
                    inventory="fresh.toml", check=False)  # fmt: skip
    assert wrong.returncode != 0 and "not the fingerprint" in wrong.stderr
    bed.run("hosts", "trust", "tb2", "--fingerprint", match.group(1), inventory="fresh.toml")
    assert status(bed, "fresh.toml")["healthy"] is True


def test_changed_host_key_is_always_refused(bed: Bed, up) -> None:
    real = (bed.home / ".ssh" / "known_hosts").read_text()
    entry = next(line for line in real.splitlines() if line.startswith(f"{bed.address('tb3')} "))
    forged = bed.workdir / "forged_known_hosts"
    # tb3's address with tb1's key: what a man in the middle would look like
    tb1_key = next(line for line in real.splitlines() if line.startswith(f"{bed.address('tb1')} "))
    forged.write_text(entry.split()[0] + " " + " ".join(tb1_key.split()[1:]) + "\n")
    _override(bed, "forged.toml", "tb3", f'known_hosts = "{forged}"\n')
    for args in (
        ["status"],
        ["--accept-new-host-keys", "status"],
        ["hosts", "trust", "tb3", "--yes"],
    ):
        proc = bed.run(*args, inventory="forged.toml", check=False)
        assert proc.returncode != 0
        assert "HOST KEY HAS CHANGED" in proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_host_down_is_reported_while_the_others_work(bed: Bed, up) -> None:
    down_host = f'[[hosts]]\nname = "tb4"\naddress = "127.0.0.1"\nport = {_free_port()}\n'
    (bed.workdir / "four.toml").write_text(inventory(["tb1", "tb2", "tb3"], down_host, workers=6))
    before = bed.containers()
    proc = bed.run("up", inventory="four.toml", check=False)
    assert proc.returncode == 3
    assert "tb4: cannot connect over SSH" in proc.stderr
    assert "failed on 1 of 4 host(s)" in proc.stderr
    view = status(bed, "four.toml")
    tb4 = next(h for h in view["hosts"] if h["name"] == "tb4")
    assert tb4["reachable"] is False and "cannot connect over SSH" in tb4["error"]
    assert view["master"]["reachable"] is True
    # tb4's share (workers 6 -> 2 per host with tb1..tb3 taking 1.5 each) is missing, not moved
    assert sum(len(v) for v in bed.containers().values()) >= sum(len(v) for v in before.values())
    bed.run("up")  # back to the three-host inventory


def test_a_master_address_the_workers_cannot_reach_fails_fast(bed: Bed, up) -> None:
    """master.advertise = an alias only this machine's ssh knows: `up` says so in seconds."""
    text = inventory(["tb2", "tb3"], workers=2).replace(f'name = "{CLUSTER}"', 'name = "itestadv"')
    text = text.replace(f"port = {PORT}", f'port = {PORT + 5}\nadvertise = "tb1"')
    (bed.workdir / "advertise.toml").write_text(text)
    started = time.monotonic()
    proc = bed.run("up", "--no-build", inventory="advertise.toml", check=False)
    took = time.monotonic() - started
    try:
        assert proc.returncode == 4, proc.stderr
        assert f"master address tb1:{PORT + 5}: not reachable from worker host(s) tb2 (" \
            in proc.stderr
        assert "set master.advertise" in proc.stderr
        assert took < 40  # not ready_timeout (90 s)
    finally:
        bed.run("down", "--volumes", inventory="advertise.toml")


def test_a_container_in_the_way_that_is_not_ours_is_left_alone(bed: Bed, up) -> None:
    """A name conflict with a container deployctl did not make: one clear line, nothing
    removed (issue #7, item 5)."""
    (bed.workdir / "conflict.toml").write_text(
        inventory(["tb3"], workers=1).replace(f'name = "{CLUSTER}"', 'name = "itestc"')
        .replace(f"port = {PORT}", f"port = {PORT + 6}"))  # fmt: skip
    with bed.engine("tb3") as client:
        image = client.images.list(name="scheduler-slave")[0]
        foreign = client.containers.create(image.id, name="itestc-worker-1",
                                           command=["sleep", "600"], labels={"owner": "ann"})
    try:
        proc = bed.run("up", "--no-build", inventory="conflict.toml", check=False)
        assert proc.returncode == 3, proc.stderr
        assert ("container name itestc-worker-1 is taken by a container that is not this "
                "cluster's (not deployctl") in proc.stderr  # fmt: skip
        assert "docker rm -f itestc-worker-1" in proc.stderr
        with bed.engine("tb3") as client:
            assert client.containers.get("itestc-worker-1").id == foreign.id  # still there
    finally:
        with bed.engine("tb3") as client:
            client.containers.get("itestc-worker-1").remove(force=True)
        bed.run("down", "--volumes", inventory="conflict.toml")


def test_down_removes_everything_it_made(bed: Bed, up) -> None:
    bed.run("down")
    assert all(v == [] for v in bed.containers().values())
    with bed.engine("tb1") as client:
        assert client.volumes.get(f"{CLUSTER}-state")  # the journal stays without --volumes
    bed.run("down", "--volumes")
    with bed.engine("tb1") as client, pytest.raises(docker.errors.NotFound):
        client.volumes.get(f"{CLUSTER}-state")
    assert bed.run("down").stdout.strip() == "nothing to remove"


# ---- the kit as users install it: a wheel in a fresh virtualenv -----------------------------

WHEEL_CLUSTER = "wtest"


@dataclass
class Installed:
    venv: wheelenv.Venv
    bare: wheelenv.Venv  # without the deploy extra
    workdir: Path

    @property
    def deployctl(self) -> Path:
        return self.venv.bin / "deployctl"


def _remove_images(client: docker.DockerClient, repositories: tuple[str, ...]) -> None:
    for repository in repositories:
        for image in client.images.list(name=repository):
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(image.id, force=True)


@pytest.fixture(scope="module")
def installed(bed: Bed, docker_engine: docker.DockerClient,
              tmp_path_factory) -> Iterator[Installed]:  # fmt: skip
    work = tmp_path_factory.mktemp("wheel")
    wheel = wheelenv.build_wheel(work)
    kit = Installed(wheelenv.install(wheel, work / "venv"),
                    wheelenv.install(wheel, work / "bare", extra=None), work / "cluster")
    kit.workdir.mkdir()
    # Images of their own name: the one-line change must not untag the session's role images.
    images = f'[images]\nmaster = "{WHEEL_CLUSTER}-master"\nslave = "{WHEEL_CLUSTER}-slave"\n'
    (kit.workdir / "cluster.toml").write_text(images + inventory(
        ["tb1", "tb2", "tb3"], workers=3).replace(f'name = "{CLUSTER}"', f'name = "{WHEEL_CLUSTER}"'
        ).replace(f"port = {PORT}", f"port = {PORT + 7}"))  # fmt: skip
    yield kit
    bed.run("down", "--volumes", deployctl=kit.deployctl, cwd=kit.workdir, check=False)
    _remove_images(docker_engine, (f"{WHEEL_CLUSTER}-master", f"{WHEEL_CLUSTER}-slave"))


def test_without_the_deploy_extra_deployctl_says_what_to_install(installed: Installed) -> None:
    proc = subprocess.run([str(installed.bare.bin / "deployctl"), "status"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "deployctl: typer, docker, paramiko not installed; install the deploy extra: "
        "pip install 'scheduler-kit[deploy]'"]  # fmt: skip


def test_an_installed_deployctl_builds_from_any_directory(bed: Bed, installed: Installed,
                                                          tmp_path: Path) -> None:  # fmt: skip
    run = functools.partial(bed.run, inventory=None, deployctl=installed.deployctl, cwd=tmp_path)
    assert run("--version").stdout.strip() == "deployctl 0.1.0"
    assert run("base-image").stdout.strip() == "scheduler-base:bookworm"  # made once, reused
    built = run("build").stdout
    assert "scheduler-master:hash-" in built and "scheduler-slave:hash-" in built
    assert run("build").stdout.count("up to date") == 2  # unchanged inputs: nothing rebuilt


def test_up_from_the_wheel_on_empty_hosts_then_a_one_line_change_ships_only_the_delta(
    bed: Bed, installed: Installed
) -> None:  # fmt: skip
    """Issue #8's bar: after a one-line change to the scheduler, `up` on 3 hosts ships at most
    5 MB per host (held layers go as empty files) and finishes in seconds."""
    run = functools.partial(bed.run, inventory=None, deployctl=installed.deployctl,
                            cwd=installed.workdir)  # fmt: skip
    _wipe(bed, images=True)
    first = run("up")
    assert first.stderr.count("images loaded") == 3
    wheelenv.one_line_change(installed.venv, f"a one-line change {time.time_ns()}")
    started = time.monotonic()
    second = run("up")
    took = time.monotonic() - started
    sent = [float(m) for m in re.findall(r"images loaded in [\d.]+s \(([\d.]+) MB sent\)",
                                         second.stderr)]  # fmt: skip
    assert len(sent) == 3 and max(sent) <= 5.0, second.stderr
    assert "layers there" in second.stderr and "built" in second.stderr
    assert took < 30, f"up after a one-line change took {took:.1f}s"  # ~7 s on the bed
    images = {c["image"] for h in json.loads(run("status", "--json").stdout)["hosts"]
              for c in h["containers"]}  # fmt: skip
    assert all(":hash-" in i for i in images)  # one name, the content tag, everywhere
    scaled = run("scale", "workers", "4")
    assert "started wtest-worker-" in scaled.stderr
    images = {c["image"] for h in json.loads(run("status", "--json").stdout)["hosts"]
              for c in h["containers"] if c["role"] == "worker"}  # fmt: skip
    assert len(images) == 1 and ":hash-" in images.pop()  # scale runs what up runs

"""Jobs several times longer than the lease, under the faults a cluster meets.

Time is compressed with settings (a 1-2 s silence limit), not by sleeping through the
defaults. Each job leaves one marker file per execution, so the tests count how often
jobs really ran, independently of what the scheduler says about itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cloudpickle
import pytest

from scheduler import SubmitError

from . import jobs
from .scheduler_procs import Cluster, hold_ahead, wait_until

cloudpickle.register_pickle_by_value(jobs)
pytestmark = pytest.mark.integration


def marked(marks: Path, seconds: float, tag: str) -> str:
    """A shell job that leaves a marker per execution, then sleeps."""
    return f"touch {marks}/{tag}.$$; sleep {seconds}"


def executions(marks: Path) -> Counter[str]:
    return Counter(p.name.split(".")[0] for p in marks.iterdir())


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    path = tmp_path / "marks"
    path.mkdir()
    return path


@pytest.fixture
def fast(tmp_path):
    """A master that declares a slave dead after 1 s of silence (heartbeats every 1/3 s)."""
    c = Cluster(tmp_path, lease=1.0)
    c.start_master()
    yield c
    c.stop()


def test_healthy_slaves_run_jobs_four_times_the_lease_exactly_once(fast, marks):
    for name in ("a", "b"):
        fast.start_slave(name, concurrency=2)
    fast.wait_slaves("a", "b")
    with fast.client() as client:
        handles = [client.submit_shell(marked(marks, 4, f"j{i}"), shell=True) for i in range(8)]
        assert all(h.get(timeout=60) == "" for h in handles)
        infos = [client.job(h.id) for h in handles]
    assert [i["attempts"] for i in infos] == [1] * 8
    assert executions(marks) == {f"j{i}": 1 for i in range(8)}
    assert "rejected" not in fast.master.log()


def test_drain_lets_jobs_longer_than_the_lease_finish_where_they_run(fast, marks):
    slave = fast.start_slave("drainee", concurrency=2, SCHEDULER_GRACE_SECONDS="30")
    fast.wait_slaves("drainee")
    with fast.client() as client:
        handles = [client.submit_shell(marked(marks, 4, f"d{i}"), shell=True) for i in range(2)]
        wait_until(lambda: len(executions(marks)) == 2, what="both jobs to start")
        time.sleep(1.0)
        slave.signal(signal.SIGTERM)
        fast.start_slave("other")  # would take the jobs if the drain gave them up
        assert slave.wait(30) == 0
        assert [h.get(timeout=10) for h in handles] == ["", ""]
        assert [client.job(h.id)["worker"] for h in handles] == ["drainee", "drainee"]
        assert [client.job(h.id)["attempts"] for h in handles] == [1, 1]
    assert executions(marks) == {"d0": 1, "d1": 1}


def test_kill9_of_a_slave_reruns_only_what_it_held(fast, marks):
    victim = fast.start_slave("victim", concurrency=2)
    fast.wait_slaves("victim")
    with fast.client() as client:
        hold_ahead(client)
        handles = [client.submit_shell(marked(marks, 3, f"k{i}"), shell=True) for i in range(4)]
        wait_until(lambda: len(executions(marks)) == 2, what="two jobs to start")
        started = {handles[int(tag[1:])].id for tag in executions(marks)}
        fast.start_slave("survivor", concurrency=2)
        fast.wait_slaves("survivor")

        def victim_reported() -> bool:  # a heartbeat told the master what had started
            view = {w["name"]: w for w in client.status()["workers"]}["victim"]
            return set(view["running"]) == started and len(view["waiting"]) == 2

        wait_until(victim_reported, what="the victim's heartbeat")
        victim.signal(signal.SIGKILL)
        assert [h.get(timeout=60) for h in handles] == [""] * 4
        infos = {h.id: client.job(h.id) for h in handles}
    # what it ran counts as an attempt; what it had only prefetched does not
    assert {i for i, info in infos.items() if info["attempts"] == 2} == started
    assert all(info["worker"] == "survivor" for info in infos.values())
    counts = executions(marks)
    assert sorted(counts.values()) == [1, 1, 2, 2]


def test_master_kill9_mid_batch_reruns_nothing(tmp_path, marks):
    cluster = Cluster(tmp_path, lease=2.0)
    cluster.start_master()
    try:
        for name in ("a", "b"):
            cluster.start_slave(name, concurrency=2)
        cluster.wait_slaves("a", "b")
        with cluster.client() as client:
            ids = [client.submit_shell(marked(marks, 4, f"m{i}"), shell=True).id
                   for i in range(8)]  # fmt: skip
        wait_until(lambda: len(executions(marks)) == 4, what="four jobs to start")
        for _ in range(3):  # again and again, while the jobs run
            time.sleep(1.0)
            cluster.restart_master()
        with cluster.client() as client:
            done = client.wait(ids, timeout=90)
        assert [j["state"] for j in done] == ["succeeded"] * 8
        assert [j["attempts"] for j in done] == [1] * 8
        assert executions(marks) == {f"m{i}": 1 for i in range(8)}
        assert "kept its" in cluster.master.log() or "running on slaves" in cluster.master.log()
    finally:
        cluster.stop()


def test_a_non_utf8_string_from_a_job_does_not_stop_the_master(fast, tmp_path):
    fast.start_slave("s1")
    fast.wait_slaves("s1")
    with fast.client() as client:
        bad = client.apply_async(jobs.boom, ("name \udcff",))
        with pytest.raises(ValueError, match="name \udcff"):  # as the job raised it
            bad.get(timeout=20)
        weird = tmp_path / os.fsdecode(b"caf\xe9")
        weird.write_text("x")
        listing = client.submit_shell(["ls", str(tmp_path)], name="n\udcff").get(timeout=20)
        assert "caf" in listing
        # later submits from any client are saved and run as before
        assert client.apply_async(jobs.square, (7,)).get(timeout=20) == 49
    fast.restart_master()
    with fast.client() as client:
        assert "\\udcff" in client.job(bad.id)["error"]
        assert client.apply_async(jobs.square, (8,)).get(timeout=20) == 64


def test_timeouts_are_checked_and_any_finite_one_works(fast):
    fast.start_slave("s1")
    fast.wait_slaves("s1")
    with fast.client() as client:
        for bad in (float("inf"), float("nan"), 0, -1, 10**12):
            with pytest.raises(SubmitError, match="timeout must be"):
                client.apply_async(jobs.square, (2,), timeout=bad).get(timeout=10)
        # beyond poll()'s 24.8 days: the slot must not die on it
        long = client.apply_async(jobs.square, (3,), timeout=30 * 86400.0)
        assert long.get(timeout=20) == 9
        assert client.apply_async(jobs.square, (4,)).get(timeout=20) == 16


def test_cancelled_jobs_that_left_memory_do_not_stall_the_cluster(tmp_path):
    cluster = Cluster(tmp_path, lease=1.0)
    cluster.start_master(SCHEDULER_KEEP_FINISHED="3")
    try:
        with cluster.client() as client:
            handles = [client.submit_shell(["echo", str(i)]) for i in range(30)]
            client.flush()
            for h in handles[:10]:
                client.cancel(h.id)
            wait_until(lambda: client.status()["in_memory"] == 23, what="eviction")  # 20 + 3
            cluster.start_slave("s1", concurrency=2)
            assert [h.get(timeout=30) for h in handles[10:]] == [f"{i}\n" for i in range(10, 30)]
    finally:
        cluster.stop()


def test_silent_connections_are_dropped_and_counted_once(fast):
    silent = []
    for _ in range(150):  # more than the 64 allowed in handshake at once
        silent.append(socket.create_connection(("127.0.0.1", fast.port)))
    try:
        with fast.client() as client:  # still served meanwhile
            assert client.ping()["version"]

        def all_closed() -> bool:
            for sock in silent:
                sock.settimeout(0.01)
                try:
                    data = sock.recv(4096)
                    while data and data != b"":  # the challenge, then the close
                        data = sock.recv(4096)
                except TimeoutError:
                    return False
                except OSError:
                    pass
            return True

        wait_until(all_closed, timeout=20, what="the master to drop silent peers")
        log = fast.master.log()
        assert log.count("refused") == 1, log  # the first, then counted for the summary
        assert "over the limit" in log or "no handshake" in log
    finally:
        for sock in silent:
            sock.close()
    with fast.client() as client:
        assert client.status()["workers"] == []


# -- the journal on a full disk ---------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs for the master's state directory."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_refuses_submits_clearly_and_loses_nothing(tmp_path, tiny_disk):
    cluster = Cluster(tmp_path, lease=1.0)
    cluster.start_master(SCHEDULER_STATE_DIR=str(tiny_disk / "state"))
    try:
        cluster.start_slave("s1", concurrency=2)
        cluster.wait_slaves("s1")
        with cluster.client() as client:
            before = client.submit_shell("sleep 2; echo before", shell=True)
            client.flush()
            filler = fill(tiny_disk)
            with pytest.raises(SubmitError, match="journal cannot write.*nothing was queued"):
                for _ in range(40):  # until the journal needs a page it cannot have
                    batch = [client.submit_shell(["echo", "x" * 200]) for _ in range(500)]
                    client.flush()
                    [h.id for h in batch]  # noqa: B018 (raises for a refused batch)
            assert client.status()["journal_error"]  # reads are still served
            filler.unlink()
            assert before.get(timeout=30) == "before\n"  # finished while the disk was full
            after = client.submit_shell(["echo", "after"])
            assert after.get(timeout=30) == "after\n"
        cluster.restart_master(SCHEDULER_STATE_DIR=str(tiny_disk / "state"))
        with cluster.client() as client:
            # the slave reports again what the killed master may not have saved
            assert client.result(after.id).get(timeout=30) == "after\n"
            assert client.job(before.id)["state"] == "succeeded"
            assert client.job(after.id)["attempts"] == 1  # and it ran once
            counts = client.status()["counts"]
        assert counts["queued"] == counts["running"] == 0  # no refused job came back
    finally:
        cluster.stop()


# -- a network partition of a host in its own namespace ----------------------------------


@pytest.fixture
def partitioned_host(tmp_path):
    """A network namespace joined to this machine by a veth pair: 10.213.99.1 here,
    10.213.99.2 there. Yields (argv prefix to run inside, host-side link name)."""
    tag = f"sp{os.getpid() % 100000}"
    ns, link = f"{tag}ns", f"{tag}h"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", "10.213.99.1/30", "dev", link)
        ip("link", "set", link, "up")
        ip("-n", ns, "addr", "add", "10.213.99.2/30", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ("nsenter", f"--net=/run/netns/{ns}"), link
    finally:
        subprocess.run(["ip", "link", "del", link], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_a_partitioned_host_loses_its_job_once_and_its_late_run_is_dropped(
    tmp_path, marks, partitioned_host
):
    prefix, link = partitioned_host
    cluster = Cluster(tmp_path, lease=1.5)
    cluster.host = "10.213.99.1"
    cluster.start_master()
    try:
        far = cluster.start_slave("far", prefix=prefix)
        cluster.wait_slaves("far")
        with cluster.client() as client:
            job = client.submit_shell(marked(marks, 5, "p"), shell=True)
            wait_until(lambda: executions(marks)["p"] == 1, what="the job to start far away")
            near = cluster.start_slave("near")
            cluster.wait_slaves("near")
            subprocess.run(["ip", "link", "set", link, "down"], check=True)
            wait_until(lambda: client.job(job.id)["worker"] == "near", timeout=20,
                       what="the job to move")  # fmt: skip
            time.sleep(1.5)  # down for twice the silence limit in all
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
            assert job.get(timeout=30) == ""
            info = client.job(job.id)
            assert (info["worker"], info["attempts"]) == ("near", 2)
            far.wait_log(r"job \d+ its lease went elsewhere; killing it|registering again",
                         timeout=30)  # fmt: skip
        assert executions(marks)["p"] == 2
        master_log = cluster.master.log()
        assert "told to drop 1 run" in master_log or "rejected" in master_log
        assert near.popen.poll() is None and far.popen.poll() is None
    finally:
        cluster.stop()


# -- scheduler verify --------------------------------------------------------------------


def test_verify_kills_a_slave_and_crashes_the_master_and_accounts_for_every_job(tmp_path):
    cluster = Cluster(tmp_path, lease=1.5)
    cluster.start_master()
    try:
        for name in ("v1", "v2", "v3"):
            cluster.start_slave(name, concurrency=2)
        cluster.wait_slaves("v1", "v2", "v3")
        master_pid = cluster.master.pid
        out = subprocess.run(
            [sys.executable, "-m", "scheduler", "--master", cluster.address, "verify",
             "--jobs", "10", "--seconds", "3", "--restart-master", "--json"],
            env=cluster.env(), capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        report = json.loads(out.stdout)
        assert report["ok"] and report["lost"] == [] and report["twice_on_healthy"] == []
        assert report["master_crashes"] == 1 and report["rerun_after_kill"]
        assert sorted(report["once"] + report["rerun_after_kill"]) == list(range(10))
        assert report["moved_after"] is not None  # its speed is measured by make bench
        killed = report["killed"]
        assert cluster.slaves[killed].wait(10) == 137  # it died as if killed
        assert cluster.master.pid == master_pid and cluster.master.popen.poll() is None
        assert cluster.master.log().count("master listening on") == 2
    finally:
        cluster.stop()


# -- a queue longer than the master keeps in memory ---------------------------------


def test_a_queue_beyond_the_memory_window_survives_a_kill9_and_runs_each_job_once(tmp_path):
    """150,000 queued jobs (the master keeps 100,000 records; the rest wait in the
    journal), the master killed and restarted before any ran: every one runs, once,
    and returns its own result."""
    n = 150_000
    cluster = Cluster(tmp_path)
    cluster.start_master()
    try:
        with cluster.client() as client:
            handles = [client.apply_async(jobs.square, (i,)) for i in range(n)]
            client.flush()
            status = client.status()
            assert status["counts"]["queued"] == n and status["in_memory"] <= 100_000
            cluster.restart_master()  # kill -9, and again on the same journal
            cluster.start_slave("s1", concurrency=2)
            cluster.start_slave("s2", concurrency=2)
            assert [h.get(timeout=240) for h in handles] == [i * i for i in range(n)]
            attempts = Counter(j["attempts"] for j in client.iter_jobs())
        assert attempts == {1: n}
    finally:
        cluster.stop()

"""Nothing lost: dying slaves, a dying master, drains, retries, bad peers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import cloudpickle
import pytest

from scheduler import AuthError, Client, JobFailed

from . import jobs
from .scheduler_procs import hold_ahead, wait_until

cloudpickle.register_pickle_by_value(jobs)
pytestmark = pytest.mark.integration


def test_kill9_of_a_slave_mid_job_loses_nothing(cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    doomed = cluster.start_slave("doomed", concurrency=2)
    cluster.wait_slaves("doomed")
    with cluster.client() as client:
        hold_ahead(client)
        handles = [client.apply_async(jobs.nap, (1.5, str(marks), f"j{i}")) for i in range(4)]
        wait_until(lambda: len(os.listdir(marks)) >= 2, what="two jobs to start")

        def two_waiting() -> bool:  # a heartbeat told the master which two only wait
            (worker,) = client.status()["workers"]
            return len(worker["waiting"]) == 2

        wait_until(two_waiting, what="the master to know which jobs only wait")
        doomed.signal(signal.SIGKILL)
        cluster.start_slave("rescuer", concurrency=2)
        results = [h.get(timeout=30) for h in handles]
        assert results == ["rescuer"] * 4
        infos = [client.job(h.id) for h in handles]
    assert all(i["state"] == "succeeded" for i in infos)
    # the two that were running on the dead slave ran a second time, the rest once
    assert sorted(i["attempts"] for i in infos) == [1, 1, 2, 2]
    assert "requeued (its slave stopped answering)" in cluster.master.log()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_job_processes_die_with_a_killed_slave(cluster, tmp_path):
    slave = cluster.start_slave("oomed")
    cluster.wait_slaves("oomed")
    with cluster.client() as client:
        client.apply_async(jobs.nap, (60, str(tmp_path), "long"))
        (mark,) = wait_until(lambda: list(tmp_path.glob("long-*")), what="job to start")
        pid = int(mark.name.split("-")[1])
        slave.signal(signal.SIGKILL)  # as the OOM killer would
        wait_until(lambda: not _alive(pid), timeout=5, what="the orphaned job process to die")


def test_a_late_result_from_a_lapsed_lease_is_rejected(cluster):
    frozen = cluster.start_slave("frozen")
    cluster.wait_slaves("frozen")
    with cluster.client() as client:
        handle = client.apply_async(jobs.nap, (1.0,))
        wait_until(lambda: client.job(handle.id)["state"] == "running", what="job to start")
        frozen.signal(signal.SIGSTOP)  # the slave vanishes; its job process carries on
        cluster.start_slave("second")
        assert handle.get(timeout=30) == "second"
        frozen.signal(signal.SIGCONT)  # comes back: its old run is refused either way
        cluster.master.wait_log(
            r"slave frozen: 1 outcome\(s\) rejected|slave frozen told to drop 1 run"
        )
        info = client.job(handle.id)
    assert (info["state"], info["worker"], info["attempts"]) == ("succeeded", "second", 2)


def test_master_kill9_and_restart_loses_nothing(cluster):
    with cluster.client() as client:
        queued = [client.submit_shell(["echo", str(i)]) for i in range(300)]
        client.flush()
        ids = [h.id for h in queued]
    cluster.start_slave("s1", concurrency=2)
    cluster.wait_slaves("s1")
    with cluster.client() as client:
        running = client.apply_async(jobs.nap, (1.0,))
        wait_until(lambda: client.job(running.id)["state"] == "running", what="a running job")
        ids.append(running.id)
    cluster.kill_master()
    cluster.start_master()
    log = cluster.master.log()
    assert "301 jobs" in log and "running on slaves that have" in log
    with cluster.client() as client:
        done = client.wait(ids, timeout=60)
    assert [j["state"] for j in done] == ["succeeded"] * len(ids)
    assert done[0]["stdout"] == "0\n" and done[299]["stdout"] == "299\n"


def test_sigterm_drains_a_slave(cluster, tmp_path):
    slave = cluster.start_slave("drainee", SCHEDULER_GRACE_SECONDS="20")
    cluster.wait_slaves("drainee")
    with cluster.client() as client:
        hold_ahead(client)
        first = client.apply_async(jobs.nap, (1.5, str(tmp_path), "first"))
        rest = [client.apply_async(jobs.nap, (0.1,)) for _ in range(3)]
        wait_until(lambda: list(tmp_path.glob("first-*")), what="first job to start")
        slave.signal(signal.SIGTERM)
        assert slave.wait(20) == 0
        # the running job was allowed to finish; leased-but-unstarted ones were handed back
        assert first.get(timeout=5) == "drainee"
        assert all(client.job(h.id)["state"] in ("queued", "succeeded") for h in rest)
        assert "handed back" in slave.log() or all(h.ready() for h in rest)
        assert client.status()["workers"] == []
        cluster.start_slave("next")
        assert [h.get(timeout=30) for h in rest].count("next") >= 1
        assert [client.job(h.id)["attempts"] for h in rest] == [1, 1, 1] or all(
            h.get() == "drainee" for h in rest
        )


def test_drain_past_grace_requeues_the_running_job(cluster, tmp_path):
    slave = cluster.start_slave("hasty", SCHEDULER_GRACE_SECONDS="0.5")
    cluster.wait_slaves("hasty")
    marker = tmp_path / "started"
    with cluster.client() as client:
        long = client.submit_shell(f"touch {marker}; sleep 30", shell=True)
        wait_until(marker.exists, what="job to start")
        started = time.monotonic()
        slave.signal(signal.SIGTERM)
        assert slave.wait(20) == 0
        assert time.monotonic() - started < 10  # behaviour, not speed: the 30 s job was not awaited
        info = client.job(long.id)
        assert (info["state"], info["attempts"]) == ("queued", 0)
        assert "requeued 1 job(s) still running after the grace period" in slave.log()


def test_max_attempts_then_failed_with_the_reason(cluster):
    with cluster.client() as client:
        handle = client.apply_async(jobs.kill_my_slave, max_attempts=2)
        for name in ("victim1", "victim2"):
            proc = cluster.start_slave(name)
            assert proc.wait(30) == -signal.SIGKILL
        with pytest.raises(JobFailed) as exc:
            handle.get(timeout=30)
    assert "stopped answering (silent for 2s); gave up after 2 attempts" in exc.value.error


def test_wrong_key_is_refused_clearly_and_the_master_keeps_serving(cluster):
    with pytest.raises(AuthError, match="refused the authkey"):
        Client(cluster.address, "x" * 24)
    slave = cluster.start_slave("intruder", SCHEDULER_AUTHKEY="y" * 24)
    assert slave.wait(20) == 3
    out = slave.log()
    assert "error: master at" in out and "Traceback" not in out
    assert cluster.authkey not in out and "y" * 24 not in out
    cluster.master.wait_log(r"refused 1 connection\(s\) \(1 wrong authkey\) from 127\.0\.0\.1")
    with cluster.client() as client:
        assert client.ping()["version"]


def test_garbage_and_dropped_connections_on_the_port(cluster):
    for payload in (
        b"GET / HTTP/1.0\r\n\r\n",
        os.urandom(4096),
        b"\xff\xff\xff\xff" + b"x" * 10,
        b"",
    ):
        with socket.create_connection(("127.0.0.1", cluster.port)) as sock:
            try:  # the master may have hung up already: a reset is its answer too
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(5)
                while sock.recv(4096):
                    pass
            except OSError:
                pass
    # one line for the first, the next ones are counted for the minute's summary
    cluster.master.wait_log(r"refused 1 connection\(s\) \(1 bad handshake\)")
    assert cluster.master.log().count("refused") == 1
    assert cluster.master.popen.poll() is None
    cluster.start_slave("s1")
    with cluster.client() as client:
        assert client.submit_shell(["echo", "still here"]).get(timeout=20) == "still here\n"
    assert "Traceback" not in cluster.master.log()


def test_a_slave_started_before_its_master_waits_for_it(tmp_path):
    from .scheduler_procs import Cluster

    early = Cluster(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        early.port = s.getsockname()[1]
    try:
        slave = early.start_slave("early")
        slave.wait_log(r"retrying in .* \(attempt 2\)")
        early.start_master()
        early.wait_slaves("early")
        with early.client() as client:
            assert client.submit_shell(["true"]).get(timeout=20) == ""
    finally:
        early.stop()


@pytest.mark.parametrize("key, message", [(None, "is not set"), ("short", "too short")])
def test_missing_or_short_key_is_a_one_line_error(tmp_path, key, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    if key:
        env["SCHEDULER_AUTHKEY"] = key
    for role in ("master", "slave"):
        out = subprocess.run([sys.executable, "-m", "scheduler", role], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode == 2
        assert out.stderr.count("\n") == 1 and message in out.stderr

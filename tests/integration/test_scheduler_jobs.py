"""Jobs of both kinds through real master and slave processes on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import cloudpickle
import pytest

from scheduler import JobFailed, SubmitError

from . import jobs
from .scheduler_procs import wait_until

cloudpickle.register_pickle_by_value(jobs)
pytestmark = pytest.mark.integration


def test_python_jobs_succeed_and_fail_with_states_and_outputs(busy):
    with busy.client() as client:
        ok = client.apply_async(jobs.square, (7,), name="sq")
        bad = client.apply_async(jobs.boom, ("kaput",))
        crashed = client.apply_async(jobs.crash)
        assert ok.get(timeout=20) == 49
        with pytest.raises(ValueError, match="kaput") as failure:  # as Pool raises it
            bad.get(timeout=20)
        with pytest.raises(JobFailed) as death:
            crashed.get(timeout=20)
        assert ok.successful() and not bad.successful()
        assert "ValueError: kaput" in str(failure.value.__cause__)
        assert "exited with 13" in death.value.error and death.value.exit_code == 13
        info = client.job(ok.id)
        assert (info["state"], info["name"], info["attempts"], info["worker"]) == (
            "succeeded",
            "sq",
            1,
            "s1",
        )
        assert info["ended"] >= info["started"] >= info["submitted"]
        assert client.job(bad.id)["state"] == "failed"
        # the slave survived the crashing job and still serves
        assert client.apply_async(jobs.square, (3,)).get(timeout=20) == 9


def test_shell_jobs_report_exit_codes_and_output(busy):
    with busy.client() as client:
        echo = client.submit_shell(["sh", "-c", "echo out; echo err >&2"])
        false = client.submit_shell(["false"])
        missing = client.submit_shell(["no-such-program-xyz"])
        piped = client.submit_shell("echo a b | wc -w", shell=True)
        assert echo.get(timeout=20) == "out\n"
        assert piped.get(timeout=20).strip() == "2"
        for handle, code in ((false, 1), (missing, 127)):
            with pytest.raises(JobFailed) as exc:
                handle.get(timeout=20)
            assert exc.value.exit_code == code
        info = client.job(echo.id)
        assert (info["stdout"], info["stderr"], info["exit_code"]) == ("out\n", "err\n", 0)


def test_map_and_imap_unordered(busy):
    with busy.client() as client:
        assert client.map(jobs.square, range(200), chunksize=1) == [x * x for x in range(200)]
        assert client.map(jobs.square, range(100)) == [x * x for x in range(100)]
        assert sorted(client.imap_unordered(jobs.square, range(50))) == [x * x for x in range(50)]
        assert list(client.imap(jobs.square, range(20), chunksize=3)) == [x * x for x in range(20)]
        counts = client.status()["counts"]
        # 200 + 50 single jobs; chunked maps make fewer jobs than items
        assert 250 < counts["succeeded"] < 370 and counts["queued"] == counts["running"] == 0


def test_functions_from_a_users_main_script(busy, tmp_path):
    script = tmp_path / "user.py"
    script.write_text(
        textwrap.dedent(f"""
        from scheduler import Client

        def triple(x):
            return 3 * x

        with Client({busy.address!r}, {busy.authkey!r}) as client:
            print(client.map(triple, [1, 2, 3]))
    """)
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[3, 6, 9]"


def test_timeouts_kill_the_whole_process_group(busy, tmp_path):
    marker = "sleep 301.25"
    with busy.client() as client:
        shell = client.submit_shell(f"{marker} & {marker}; echo never", shell=True, timeout=1)
        py = client.apply_async(jobs.nap, (60,), timeout=1)
        for handle in (shell, py):
            with pytest.raises(JobFailed) as exc:
                handle.get(timeout=20)
            assert "timed out after 1s" in exc.value.error
        left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
        assert left.stdout == "", "the job's background process outlived its timeout"
        assert client.apply_async(jobs.square, (5,)).get(timeout=20) == 25


def test_a_job_printing_far_too_much_is_capped(busy):
    with busy.client() as client:
        # 200 MiB to stdout from a shell job, 20 MiB from a python job
        big = client.submit_shell("head -c 209715200 /dev/zero | tr '\\0' 'x'", shell=True)
        out = big.get(timeout=60)
        assert len(out) < 70 * 1024 and "bytes dropped" in out
        assert client.apply_async(jobs.shout, (20 * 1024,)).get(timeout=60) == "done"
        info = client.job(big.id)
        assert info["state"] == "succeeded" and len(info["stdout"]) < 70 * 1024
        # a return value too large to carry through the master fails the job, clearly
        with pytest.raises(ValueError, match="over the 16777216-byte limit"):
            client.apply_async(jobs.big, (20 * 1024 * 1024,)).get(timeout=60)
        assert len(client.apply_async(jobs.big, (1024,)).get(timeout=60)) == 1024


def test_cancel_queued_and_running_jobs(cluster):
    with cluster.client() as client:
        queued = client.submit_shell(["true"])
        client.cancel(queued.id)
        assert client.job(queued.id)["state"] == "cancelled"
        cluster.start_slave("s1")
        cluster.wait_slaves("s1")
        running = client.submit_shell(["sleep", "30"])
        wait_until(lambda: client.job(running.id)["state"] == "running", what="job to run")
        assert client.cancel(running.id)["state"] == "cancelled"
        with pytest.raises(JobFailed) as exc:
            running.get(timeout=10)
        assert exc.value.state == "cancelled"
        assert client.apply_async(jobs.square, (4,)).get(timeout=20) == 16
        assert client.job(queued.id)["state"] == "cancelled"


def test_bad_input_is_refused_with_a_clear_error_and_the_master_keeps_serving(busy):
    import threading

    with busy.client() as client:
        with pytest.raises(SubmitError, match="empty command"):
            client.submit_shell([])
        with pytest.raises(SubmitError, match="cannot pickle"):
            client.apply_async(threading.Lock().acquire)
        with pytest.raises(SubmitError, match="unknown job kind 'perl'"):
            client._link.call("submit", [("perl", ("x", False), "", None, None, None)], {}, None)
        with pytest.raises(SubmitError, match="empty command"):
            client._link.call("submit", [("shell", ([], False), "", None, None, None)], {}, None)
        with pytest.raises(SubmitError, match="malformed"):
            client._link.call("submit", ["garbage"], {}, None)
        assert client.apply_async(jobs.square, (6,)).get(timeout=20) == 36
    assert "submit refused: unknown job kind" in busy.master.log()


def test_cli_submit_jobs_status_cancel_wait(busy, tmp_path):
    env = busy.env()

    def cli(*args, ok=True):
        out = subprocess.run([sys.executable, "-m", "scheduler", "--master", busy.address, *args],
                             capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
        assert (out.returncode == 0) == ok, out.stderr
        return out

    waited = cli("submit", "--wait", "--", "echo", "hello").stdout.splitlines()
    ids = waited[:1]
    assert ids[0].isdigit() and waited[1:] == [f"job {ids[0]} succeeded; stdout:", "  hello"]
    failing = cli("submit", "--wait", "--", "sh", "-c", "exit 3", ok=False)
    assert "job 2 failed: exited with 3" in failing.stderr and "Traceback" not in failing.stderr
    batch = tmp_path / "batch.txt"
    batch.write_text("echo one\n# a comment\necho two | tr a-z A-Z\n")
    file_ids = cli("submit", "--file", str(batch)).stdout.split()
    assert len(file_ids) == 2
    cli("wait", *file_ids)
    listed = json.loads(cli("jobs", "--json").stdout)
    by_id = {str(j["id"]): j for j in listed}
    assert by_id[ids[0]]["state"] == "succeeded" and by_id[ids[0]]["stdout"] == "hello\n"
    assert by_id[file_ids[1]]["stdout"] == "TWO\n"
    failed = json.loads(cli("jobs", "--state", "failed", "--json").stdout)
    assert [j["exit_code"] for j in failed] == [3]
    status = json.loads(cli("status", "--json").stdout)
    assert status["counts"]["succeeded"] == 3 and status["counts"]["failed"] == 1
    assert [w["name"] for w in status["workers"]] == ["s1"]
    assert set(status["counts"]) == {"queued", "running", "succeeded", "failed", "cancelled"}
    long_id = cli("submit", "--", "sleep", "30").stdout.strip()
    assert "cancelled" in cli("cancel", long_id).stdout
    assert "Traceback" not in cli("cancel", "999999", ok=False).stderr
    assert "human" not in cli("status").stdout and "s1" in cli("status").stdout


def test_long_jobs_after_short_ones_are_shared_between_slaves(cluster):
    """Prefetch grows on tiny jobs; when jobs turn long, idle slaves take the surplus back."""
    for name in ("a", "b"):
        cluster.start_slave(name)
    cluster.wait_slaves("a", "b")
    with cluster.client() as client:
        client.map(jobs.noop_item, range(3000), chunksize=1)  # both slaves learn "jobs are tiny"
        ran_on = client.map(jobs.nap, [0.05] * 60, chunksize=1)
    assert min(ran_on.count("a"), ran_on.count("b")) >= 15, ran_on


def test_old_finished_jobs_leave_memory_but_stay_in_the_journal(tmp_path):
    from .scheduler_procs import Cluster

    small = Cluster(tmp_path)
    small.start_master(SCHEDULER_KEEP_FINISHED="5")
    try:
        small.start_slave("s1")
        with small.client() as client:
            handles = [client.apply_async(jobs.square, (i,)) for i in range(20)]
            assert [h.get(timeout=30) for h in handles] == [i * i for i in range(20)]
            first = handles[0].id
            wait_until(lambda: client.status()["in_memory"] == 5, what="eviction")
            assert client.job(first)["state"] == "succeeded"  # read back from the journal
            listed = client.jobs(state="succeeded")  # from memory and the journal, newest first
            assert [j["id"] for j in listed] == [h.id for h in reversed(handles)]
            assert [j["id"] for j in client.jobs(limit=3)] == [h.id for h in handles[:-4:-1]]
            assert client.status()["counts"]["succeeded"] == 20
        small.kill_master()
        small.start_master(SCHEDULER_KEEP_FINISHED="5")
        with small.client() as client:
            status = client.status()
            assert (status["total"], status["counts"]["succeeded"]) == (20, 20)
            assert client.result(first).get(timeout=10) == 0
            assert client.apply_async(jobs.square, (9,)).get(timeout=30) == 81
            assert client.job(21)["state"] == "succeeded"
    finally:
        small.stop()


def test_a_handle_on_a_finished_job_resolves_after_the_collector_went_idle(busy):
    """``result(id)`` after every pending job came back: the idle collector must wake."""
    with busy.client() as client:
        first = client.apply_async(jobs.nap, (0.0,))
        assert first.get(timeout=30) == "s1"
        # the collector drained its last pending job and sleeps until there is another
        for _ in range(20):
            assert client.result(first.id).get(timeout=10) == "s1"


def test_two_handles_on_one_running_job_both_resolve(busy):
    """``result(id)`` while a handle already waits for the job (as ``wait()`` did for a
    job that started between its listings of queued and running jobs, listed twice)."""
    with busy.client() as client:
        job = client.apply_async(jobs.nap, (1.0,))
        again = client.result(job.id)
        assert again.get(timeout=10) == job.get(timeout=10) == "s1"
        late = client.apply_async(jobs.nap, (1.0,))
        assert [j["state"] for j in client.wait([late.id, late.id], timeout=10)] == ["succeeded"]


def test_scheduler_jobs_says_why_a_queued_job_waits(cluster):
    env = cluster.env()

    def cli(*args):
        argv = [sys.executable, "-m", "scheduler", "--master", cluster.address, *args]
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    job_id = cli("submit", "--", "true").strip()
    assert "waiting: no slave connected" in cli("jobs")
    assert json.loads(cli("job", job_id, "--json"))["reason"] == "no slave connected"
    assert "waiting      no slave connected" in cli("job", job_id)
    cluster.start_slave("s1")
    cluster.wait_slaves("s1")
    cli("wait", job_id)
    assert "waiting" not in cli("jobs")  # it ran: nothing to explain

"""The scheduler as a newcomer meets it: why a job failed, Pool's errors, Unix manners."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest

from scheduler import JobFailed
from scheduler.errors import RemoteTraceback

from . import jobs
from .scheduler_procs import Cluster, Proc, wait_until

cloudpickle.register_pickle_by_value(jobs)
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One master and one slave for the read-mostly tests of this module."""
    c = Cluster(tmp_path_factory.mktemp("newcomer"), lease=2.0)
    c.start_master()
    c.start_slave("s1", concurrency=2)
    c.wait_slaves("s1")
    yield c
    c.stop()


def cli(cluster: Cluster, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scheduler", *argv],
        env={**cluster.env(SCHEDULER_MASTER=cluster.address), **(env or {})},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


# -- errors as multiprocessing.Pool raises them ------------------------------------------


def test_the_jobs_own_exception_is_raised_with_the_remote_traceback(running):
    with running.client() as client:
        with pytest.raises(ZeroDivisionError) as caught:
            client.apply_async(jobs.divide, (1, 0)).get(timeout=20)
        with pytest.raises(jobs.Oops, match="my detail"):
            client.apply_async(jobs.raise_oops, ("my detail",)).get(timeout=20)
        errors = []
        client.apply_async(jobs.divide, (1, 0), error_callback=errors.append).wait(20)
        wait_until(lambda: errors, what="the error callback")
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    # the traceback names the user's file and line, not <dynamic-code>
    assert f'File "{jobs.__file__}"' in cause.text and "in divide" in cause.text
    assert isinstance(errors[0], ZeroDivisionError)


def test_an_exception_that_cannot_be_rebuilt_is_a_jobfailed_naming_its_type(running):
    with running.client() as client, pytest.raises(JobFailed) as caught:
        client.apply_async(jobs.raise_unbuildable).get(timeout=20)
    assert caught.value.exc_type.endswith("Unbuildable") and "1/2" in caught.value.error


def test_exit_codes_of_python_jobs(running):
    with running.client() as client:
        assert client.apply_async(jobs.leave, (0,)).get(timeout=20) is None  # success
        with pytest.raises(JobFailed) as left:
            client.apply_async(jobs.leave, (3,)).get(timeout=20)
        with pytest.raises(JobFailed) as hard:
            client.apply_async(jobs.hard_exit, (4,)).get(timeout=20)
        info = client.job(hard.value.job_id)
    assert left.value.exit_code == 3 and "SystemExit: 3" in left.value.error
    assert hard.value.exit_code == 4 and info["exit_code"] == 4
    assert "exited with 4" in hard.value.error


def test_a_module_next_to_the_script_travels_when_named(running, tmp_path):
    (tmp_path / "helper.py").write_text("def double(x):\n    return 2 * x\n")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import helper
        from scheduler import Client

        def work(x):
            return helper.double(x)

        ship = [helper] if sys.argv[1] == "ship" else []
        with Client("{running.address}", ship_modules=ship) as pool:
            try:
                print(pool.map(work, [1, 2, 3]))
            except ModuleNotFoundError as exc:
                print("missing:", exc)
    """))
    env = running.env()
    shipped = subprocess.run([sys.executable, str(script), "ship"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shipped.stdout.strip() == "[2, 4, 6]", shipped.stderr
    bare = subprocess.run([sys.executable, str(script), "bare"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "missing: module 'helper' is not installed on slave s1" in bare.stdout, bare.stderr
    assert "Client(ship_modules=[helper])" in bare.stdout


# -- the command line -----------------------------------------------------------------------


def test_submit_wait_says_why_a_job_failed_and_shows_output(running, tmp_path):
    ok = cli(running, "submit", "--wait", "--shell", "--", "echo hello from the job")
    assert ok.returncode == 0 and "hello from the job" in ok.stdout
    bad = cli(running, "submit", "--wait", "--", "sh", "-c", "echo no such file >&2; exit 2")
    assert bad.returncode == 1
    assert "failed: exited with 2" in bad.stderr and "no such file" in bad.stderr
    (tmp_path / "data").mkdir()
    here = cli(running, "submit", "--wait", "--cwd", str(tmp_path / "data"), "--env", "WHO=me",
               "--shell", "--", "pwd; echo $WHO")  # fmt: skip
    assert f"{tmp_path / 'data'}\n  me" in here.stdout, here.stderr
    assert "Traceback" not in bad.stderr + here.stderr


def test_job_shows_one_job_whole(running):
    with running.client() as client:
        handle = client.submit_shell("echo out; echo err >&2; exit 3", shell=True)
        handle.wait(20)
    shown = cli(running, "job", str(handle.id))
    assert shown.returncode == 0
    for expected in ("state        failed", "attempts     1 of 3", "exit code    3",
                     "error        exited with 3", "stdout:\n  out", "stderr:\n  err"):  # fmt: skip
        assert expected in shown.stdout, shown.stdout


def test_jobs_lists_newest_first_with_a_footer_and_ends_quietly_in_a_pipe(running):
    with running.client() as client:
        handles = [client.submit_shell(["true"]) for _ in range(30)]
        client.wait([h.id for h in handles])
    listed = cli(running, "jobs", "--limit", "3")
    rows = listed.stdout.splitlines()[1:]
    assert [int(r.split()[0]) for r in rows] == [h.id for h in handles[:-4:-1]]
    assert "more (newest first; --limit N, --all, --json)" in listed.stderr
    piped = subprocess.run(
        f"{sys.executable} -m scheduler jobs --all | head -1", shell=True,
        env=running.env(SCHEDULER_MASTER=running.address), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert piped.stdout.startswith("     ID") and piped.stderr == ""


def test_cancel_of_a_finished_job_says_so_and_fails(running):
    with running.client() as client:
        done = client.submit_shell(["true"])
        done.wait(20)
    out = cli(running, "cancel", str(done.id))
    assert out.returncode == 1 and "already succeeded; nothing cancelled" in out.stderr


def test_options_before_or_after_the_command_and_version(running, tmp_path):
    assert cli(running, "--version").stdout.startswith("scheduler ")
    assert cli(running, "status", "--master", running.address).returncode == 0
    assert cli(running, "--master", running.address, "status").returncode == 0
    for sub in ("submit", "jobs", "job", "wait", "verify"):
        text = cli(running, sub, "--help").stdout
        assert "--master" in text and "``" not in text
    argv = [sys.executable, "-m", "scheduler", "--master", running.address, "slave",
            "--concurrency", "1", "--name", "early-flag"]  # fmt: skip
    env = running.env(SCHEDULER_CONCURENCY="1",
                      SCHEDULER_HEALTH_FILE=str(tmp_path / "health"))  # fmt: skip
    slave = Proc(argv, env, tmp_path / "early.log")
    try:
        running.wait_slaves("early-flag")
        assert "did you mean SCHEDULER_CONCURRENCY?" in slave.log()
    finally:
        slave.stop()


def test_settings_say_what_they_expect(running):
    out = cli(running, "slave", env={"SCHEDULER_CONCURRENCY": "two"})
    assert out.returncode == 2
    assert "SCHEDULER_CONCURRENCY: expected a positive integer, got 'two'" in out.stderr
    out = cli(running, "status", env={"SCHEDULER_MASTER": "http://127.0.0.1:1"})
    assert out.returncode == 2 and "without a scheme" in out.stderr
    assert "Traceback" not in out.stderr


def test_our_own_clients_and_stopping_slaves_leave_no_false_alarms(running):
    for _ in range(10):
        assert cli(running, "submit", "--", "true").returncode == 0
    idle = running.start_slave("idle")
    running.wait_slaves("idle")
    idle.signal(signal.SIGTERM)
    assert idle.wait(20) == 0
    assert "refused" not in running.master.log()
    assert "unreachable" not in idle.log()


def test_a_second_sigterm_ends_the_drain_and_hands_the_job_back(tmp_path):
    cluster = Cluster(tmp_path, lease=2.0)
    cluster.start_master()
    try:
        slave = cluster.start_slave("stubborn", SCHEDULER_GRACE_SECONDS="300")
        cluster.wait_slaves("stubborn")
        marker = tmp_path / "started"
        with cluster.client() as client:
            long = client.submit_shell(f"touch {marker}; sleep 300", shell=True)
            wait_until(marker.exists, what="the job to start")
            slave.signal(signal.SIGTERM)
            slave.wait_log("Ctrl-C again to stop now")
            time.sleep(0.5)
            slave.signal(signal.SIGTERM)
            assert slave.wait(20) == 0
            info = client.job(long.id)
        assert (info["state"], info["attempts"]) == ("queued", 0)
    finally:
        cluster.stop()


def test_a_job_running_in_the_slaves_directory_by_default(running):
    with running.client() as client:
        where = client.submit_shell(["pwd"]).get(timeout=20).strip()
    assert where == os.getcwd()  # the slave was started from the test's directory

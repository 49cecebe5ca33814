"""Jobs that come after others, with real processes: in order, cancelled down the chain when
one fails, refused for unknown ids, kept across a master restart, from the CLI too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scheduler import JobFailed, SubmitError

from .scheduler_procs import wait_until

pytestmark = pytest.mark.integration


def test_a_chain_runs_in_order_though_slots_are_free(busy, tmp_path):
    log = tmp_path / "order"
    with busy.client() as client:
        first = client.submit_shell(f"sleep 0.3; echo a >> {log}", shell=True)
        second = client.submit_shell(f"echo b >> {log}", shell=True, after=[first])
        both = [first, second]
        third = client.submit_shell(f"echo c >> {log}", shell=True, after=both)
        assert third.get(timeout=30) == ""
        assert client.job(third.id)["after"] == [first.id, second.id]
    assert log.read_text().split() == ["a", "b", "c"]


def test_a_failure_cancels_what_comes_after_it(busy):
    with busy.client() as client:
        bad = client.submit_shell(["sh", "-c", "exit 4"])
        dependent = client.submit_shell(["true"], after=[bad])
        with pytest.raises(JobFailed) as failed:
            dependent.get(timeout=30)
        assert failed.value.state == "cancelled"
        assert client.job(dependent.id)["error"] == f"job {bad.id} it comes after failed"
        with pytest.raises(SubmitError, match="no job 999999"):
            client.submit_shell(["true"], after=[999999]).get(timeout=10)


def test_a_waiting_job_keeps_waiting_across_a_master_restart(busy, tmp_path):
    log = tmp_path / "order"
    with busy.client() as client:
        slow = client.submit_shell(f"sleep 2; echo slow >> {log}", shell=True)
        later = client.submit_shell(f"echo later >> {log}", shell=True, after=[slow.id])
        later_id = later.id
        wait_until(lambda: client.job(slow.id)["state"] == "running", what="the first job")
        assert client.job(later_id)["reason"] == f"waiting for job {slow.id}"
    busy.restart_master()
    with busy.client() as client:
        wait_until(lambda: client.job(later_id)["state"] == "succeeded", timeout=30,
                   what="the job after it")  # fmt: skip
    assert log.read_text().split() == ["slow", "later"]


def test_the_cli_takes_after_and_refuses_bad_ids(busy):
    def cli(*args):
        argv = [sys.executable, "-m", "scheduler", "--master", busy.address, *args]
        return subprocess.run(argv, capture_output=True, text=True, env=busy.env(), timeout=60)

    first = cli("submit", "--", "true").stdout.strip()
    done = cli("submit", "--wait", "--after", first, "--", "echo", "after")
    assert done.returncode == 0 and "after" in done.stdout, done.stderr
    bad = cli("submit", "--after", "12,x", "--", "true")
    assert bad.returncode == 2 and "expected job ids like 12,13" in bad.stderr
    unknown = cli("submit", "--after", "424242", "--", "true")
    assert unknown.returncode != 0 and "no job 424242" in unknown.stderr
    assert "Traceback" not in unknown.stderr + bad.stderr

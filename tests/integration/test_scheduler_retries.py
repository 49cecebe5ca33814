"""Retries with backoff, with real processes: a failed run is tried again after a doubling
wait, its history kept; the wait survives a master restart; the CLI shows it all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler import JobFailed

from .scheduler_procs import wait_until

pytestmark = pytest.mark.integration


def flaky(counter: Path, succeed_at: int) -> str:
    """A shell command that fails until its run number reaches ``succeed_at``."""
    return (f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; "
            f"echo run $n >&2; [ $n -ge {succeed_at} ]")  # fmt: skip


def test_a_failing_job_is_retried_until_it_succeeds_and_keeps_its_history(busy, tmp_path):
    counter = tmp_path / "runs"
    with busy.client() as client:
        handle = client.submit_shell(flaky(counter, 3), shell=True, retries=2, retry_backoff=0.2)
        assert handle.get(timeout=30) == ""
        info = client.job(handle.id)
    assert counter.read_text().strip() == "3"
    assert (info["state"], info["failures"], info["retries"]) == ("succeeded", 2, 2)
    assert [(h["worker"], h["exit_code"]) for h in info["history"]] == [("s1", 1), ("s1", 1)]
    assert info["history"][1]["started"] - info["history"][0]["ended"] >= 0.1  # backed off
    shown = subprocess.run([sys.executable, "-m", "scheduler", "--master", busy.address, "job",
                            str(handle.id)], capture_output=True, text=True, env=busy.env(),
                           timeout=60).stdout  # fmt: skip
    assert "retries      2 of 2 used" in shown and "failed run 2 s1" in shown


def test_retries_spent_the_job_fails_with_its_last_error(busy, tmp_path):
    counter = tmp_path / "runs"
    with busy.client() as client:
        handle = client.submit_shell(flaky(counter, 99), shell=True, retries=1, retry_backoff=0)
        with pytest.raises(JobFailed):
            handle.get(timeout=30)
        info = client.job(handle.id)
    assert counter.read_text().strip() == "2" and info["failures"] == 1
    assert info["state"] == "failed" and info["exit_code"] == 1


def test_a_backoff_survives_a_master_restart(busy, tmp_path):
    counter = tmp_path / "runs"
    with busy.client() as client:
        handle = client.submit_shell(flaky(counter, 2), shell=True, retries=1, retry_backoff=3)
        job_id = handle.id
        wait_until(lambda: client.job(job_id)["failures"] == 1, what="the first failure")
        reason = client.job(job_id)["reason"]
    assert reason.startswith("backing off until")
    busy.restart_master()  # kill -9: the backoff and the history come back from the journal
    with busy.client() as client:
        wait_until(lambda: client.job(job_id)["state"] == "succeeded", timeout=30,
                   what="the retry after the restart")  # fmt: skip
        info = client.job(job_id)
    assert counter.read_text().strip() == "2" and len(info["history"]) == 1


def test_the_cli_and_bad_values(busy):
    def cli(*args):
        argv = [sys.executable, "-m", "scheduler", "--master", busy.address, *args]
        return subprocess.run(argv, capture_output=True, text=True, env=busy.env(), timeout=60)

    bad = cli("submit", "--retries", "-1", "--", "true")
    assert bad.returncode != 0 and "retries must be a whole number" in bad.stderr
    assert "Traceback" not in bad.stderr
    ok = cli("submit", "--wait", "--retries", "2", "--retry-backoff", "0.1", "--", "true")
    assert ok.returncode == 0, ok.stderr
    job = json.loads(cli("job", ok.stdout.split()[0], "--json").stdout)
    assert (job["retries"], job["failures"]) == (2, 0)

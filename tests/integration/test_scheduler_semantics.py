"""Priorities, arrays and placement with real processes: what runs first, how many of an
array run at once, where a job may run, and all of it across a master kill -9.

Each shell job leaves a marker per execution (``tag.pid.start-ns``) and, when it ends,
one more (``tag.pid.end-ns``), so the tests count runs and overlaps from the files, not
from what the scheduler says about itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from .scheduler_procs import Cluster, hold_ahead, wait_until

pytestmark = pytest.mark.integration


def marked(marks: Path, seconds: float, tag: str, fail_first: bool = False) -> str:
    """A shell job that leaves start and end markers; ``fail_first``: its first run
    exits 1 (a failure to retry)."""
    flaky = f"if [ ! -e {marks}/{tag}.failed ]; then touch {marks}/{tag}.failed; exit 1; fi; "
    return (f"{flaky if fail_first else ''}touch {marks}/{tag}.$$.start-$(date +%s%N); "
            f"sleep {seconds}; touch {marks}/{tag}.$$.end-$(date +%s%N)")  # fmt: skip


def runs(marks: Path) -> Counter[str]:
    return Counter(p.name.split(".")[0] for p in marks.glob("*.start-*"))


def most_at_once(marks: Path, prefix: str) -> int:
    """The largest number of runs of jobs tagged ``prefix...`` that overlapped in time."""
    events = []
    for p in marks.glob(f"{prefix}*"):
        if ".start-" in p.name or ".end-" in p.name:
            kind, ns = p.name.rsplit(".", 1)[1].split("-")
            events.append((int(ns), 1 if kind == "start" else -1))
    level = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start
        level += step
        peak = max(peak, level)
    return peak


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    path = tmp_path / "marks"
    path.mkdir()
    return path


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "scheduler", "--master", cluster.address, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=cluster.env(), timeout=60)


@pytest.mark.parametrize("held_ahead", [False, True], ids=["fresh", "after-short-jobs"])
def test_a_high_priority_job_waits_for_one_run_per_slot_not_for_the_queue(
    cluster, marks, held_ahead
):
    cluster.start_slave("s1", concurrency=2)
    cluster.wait_slaves("s1")
    with cluster.client() as client:
        if held_ahead:  # its jobs were short so far: it leases the long ones ahead too
            hold_ahead(client)
        low = [client.submit_shell(marked(marks, 0.4, f"low{i}"), shell=True) for i in range(30)]
        wait_until(lambda: len(runs(marks)) >= 2, what="the low-priority queue to start")
        done = cli(cluster, "submit", "--priority", "10", "--shell", "--",
                   marked(marks, 0.1, "high"))  # fmt: skip
        assert done.returncode == 0, done.stderr
        high = int(done.stdout)
        wait_until(lambda: client.job(high)["state"] == "succeeded", what="the urgent job")
        info = client.job(high)
        assert info["priority"] == 10
        started_between = [
            j for j in (client.job(h.id) for h in low)
            if j["started"] and info["submitted"] < j["started"] < info["started"]
        ]  # fmt: skip
        # two slots: at most one low job each may start after it was submitted
        assert len(started_between) <= 2, started_between
        left = [h.id for h in low if client.job(h.id)["state"] == "queued"]
        assert len(left) >= 20  # it went ahead of the queue, not after it
        for job_id in left:
            client.cancel(job_id)


def test_an_array_runs_every_index_at_most_cap_at_once(cluster, marks):
    for name in ("a", "b"):
        cluster.start_slave(name, concurrency=2)
    cluster.wait_slaves("a", "b")
    command = marked(marks, 0.3, "t{}") + "; echo index={} env=$SCHEDULER_ARRAY_INDEX"
    done = cli(cluster, "submit", "--array", "1-8%2", "--wait", "--shell", "--", command)
    assert done.returncode == 0, done.stderr
    assert "8 tasks" in done.stderr and "at most 2 at once" in done.stderr
    ids = [int(line) for line in done.stdout.split()]
    with cluster.client() as client:
        shown = [client.job(i)["stdout"].strip() for i in ids]
    assert shown == [f"index={i} env={i}" for i in range(1, 9)]
    assert runs(marks) == {f"t{i}": 1 for i in range(1, 9)}
    assert most_at_once(marks, "t") == 2  # four slots free, two at a time: the cap
    first = ids[0]
    listing = cli(cluster, "jobs")
    assert f"8 tasks: 8 succeeded, at most 2 at once (--array {first})" in listing.stdout
    (entry,) = json.loads(cli(cluster, "jobs", "--json").stdout)
    assert (entry["id"], entry["tasks"], entry["counts"]) == (first, 8, {"succeeded": 8})
    shown = cli(cluster, "job", str(ids[2])).stdout
    assert f"array        {first}, index 3, at most 2 at once" in shown
    tasks = json.loads(cli(cluster, "jobs", "--array", str(first), "--json").stdout)
    assert sorted(t["array_index"] for t in tasks) == list(range(1, 9))
    bad = cli(cluster, "submit", "--array", "1-8%0", "--", "true")
    assert bad.returncode == 2 and "after % give a whole number >= 1" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_map_with_max_running_is_one_capped_array(cluster, marks):
    cluster.start_slave("a", concurrency=4)
    cluster.wait_slaves("a")
    with cluster.client() as client:
        assert client.map(abs, range(-6, 6), chunksize=1, max_running=3) == [
            abs(i) for i in range(-6, 6)]  # fmt: skip
        (entry,) = client.jobs()
        assert (entry["tasks"], entry["max_running"]) == (12, 3)
        tasks = client.jobs(array=entry["id"])
        spans = sorted((t["started"], t["ended"]) for t in tasks)
    peak = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert peak <= 3


def test_jobs_run_only_where_their_labels_are_and_say_when_nowhere(cluster):
    cluster.start_slave("gpu-box", concurrency=1, SCHEDULER_WORKER_LABELS="gpu=1,zone=a")
    cluster.start_slave("cpu-box", concurrency=2)
    cluster.wait_slaves("gpu-box", "cpu-box")
    with cluster.client() as client:
        shown = {w["name"]: w["labels"] for w in client.status()["workers"]}
        assert shown == {"gpu-box": {"gpu": "1", "zone": "a"}, "cpu-box": {}}
        assert "[gpu=1,zone=a]" in cli(cluster, "status").stdout
        gpu = [client.submit_shell(["sh", "-c", "echo $SCHEDULER_WORKER_NAME"],
                                   requires={"gpu": "1"}) for _ in range(6)]  # fmt: skip
        assert [h.get(timeout=30).strip() for h in gpu] == ["gpu-box"] * 6
        tpu = cli(cluster, "submit", "--requires", "tpu=1", "--priority", "3", "--", "echo", "tpu")
        tpu_id = int(tpu.stdout)
        shown = cli(cluster, "job", str(tpu_id)).stdout
        assert "requires     tpu=1" in shown and "priority     3" in shown
        wait_until(lambda: client.job(tpu_id).get("reason") == "no slave with tpu=1 connected",
                   what="the reason")  # fmt: skip
        assert "waiting: no slave with tpu=1 connected" in cli(cluster, "jobs").stdout
        cluster.start_slave("tpu-box", SCHEDULER_WORKER_LABELS="tpu=1")
        wait_until(lambda: client.job(tpu_id)["state"] == "succeeded", what="the tpu job")
        assert client.job(tpu_id)["worker"] == "tpu-box"


def test_a_bad_label_setting_stops_the_slave_with_one_line(cluster):
    slave = cluster.start_slave("odd", SCHEDULER_WORKER_LABELS="gpu")
    assert slave.wait(20) != 0
    log = slave.log()
    assert "SCHEDULER_WORKER_LABELS: bad label 'gpu'" in log and "Traceback" not in log


def test_a_master_kill9_mid_array_with_dependencies_and_retries_loses_and_repeats_nothing(
    tmp_path, marks
):
    cluster = Cluster(tmp_path, lease=2.0)
    cluster.start_master()
    try:
        for name in ("a", "b"):
            cluster.start_slave(name, concurrency=2)
        cluster.wait_slaves("a", "b")
        with cluster.client() as client:
            tasks = client.submit_array(
                marked(marks, 0.6, "t{}"), range(8),
                max_running=2, shell=True, retries=1, retry_backoff=0.5,
            )  # fmt: skip
            flaky = client.submit_shell(marked(marks, 0.2, "flaky", fail_first=True),
                                        shell=True, retries=1, retry_backoff=3.0)  # fmt: skip
            last = client.submit_shell(marked(marks, 0.1, "last"), shell=True,
                                       after=[*tasks, flaky], priority=5)  # fmt: skip
            ids = [t.id for t in tasks]
            wait_until(lambda: len(runs(marks)) >= 3, what="the array to be under way")
            queued = next(i for i in ids if client.job(i)["state"] == "queued")
            assert client.job(queued)["reason"] == f"array {ids[0]} has 2 task(s) running, its cap"
            assert client.job(last.id)["reason"].startswith("waiting for job ")
        cluster.restart_master()
        with cluster.client() as client:
            still = [i for i in ids if client.job(i)["state"] == "queued"]
            if still:  # the reasons survive the restart
                assert client.job(still[-1])["reason"].startswith(
                    ("array ", "held after a master restart"))  # fmt: skip
            done = client.wait([*ids, flaky.id, last.id], timeout=90)
        assert [j["state"] for j in done] == ["succeeded"] * 10
        assert runs(marks) == {**{f"t{i}": 1 for i in range(8)}, "flaky": 1, "last": 1}
        assert done[8]["failures"] == 1 and len(done[8]["history"]) == 1  # tried again once
        assert most_at_once(marks, "t") <= 2  # the cap held across the restart
        ended = max(int(p.name.rsplit("-", 1)[1]) for p in marks.glob("*.end-*")
                    if not p.name.startswith("last"))  # fmt: skip
        (started,) = [int(p.name.rsplit("-", 1)[1]) for p in marks.glob("last.*.start-*")]
        assert started > ended  # after everything it comes after
    finally:
        cluster.stop()

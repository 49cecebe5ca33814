"""Retention, `scheduler prune` and `scheduler backup` with real master and slave processes."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import cloudpickle
import pytest

from scheduler import UnknownJob
from scheduler.journal import WAL_KEEP_BYTES

from . import jobs
from .scheduler_procs import Cluster, wait_until

cloudpickle.register_pickle_by_value(jobs)
pytestmark = pytest.mark.integration

WAVE = 3_000


def journal_ids(state_dir: Path, where: str = "1", name: str = "journal.sqlite3") -> list[int]:
    """The ids of the journal's jobs ``where`` so, read beside the master (WAL)."""
    uri = f"file:{state_dir / name}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return [i for (i,) in db.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY id")]


def disk(state_dir: Path) -> int:
    """The journal's bytes as SQLite counts them (pages in use or free), read beside the
    master: what the file holds once its WAL is copied in, whenever that happens."""
    uri = f"file:{state_dir / 'journal.sqlite3'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
        return pages * size


def wal(state_dir: Path) -> int:
    path = state_dir / "journal.sqlite3-wal"
    return path.stat().st_size if path.exists() else 0


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def scheduler(cluster: Cluster, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler", *args], env=cluster.env(**env),
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.fixture
def make_cluster(tmp_path):
    made: list[Cluster] = []

    def make(name: str = "a", **env: str) -> Cluster:
        (tmp_path / name).mkdir()
        made.append(Cluster(tmp_path / name))
        made[-1].start_master(**env)
        return made[-1]

    yield make
    for cluster in made:
        cluster.stop()


def test_a_soak_with_retention_keeps_rows_disk_and_memory_bounded(make_cluster):
    cluster = make_cluster(SCHEDULER_RETAIN_COUNT="2000")
    state = cluster.tmp / "state"
    cluster.start_slave("s1", concurrency=2)
    cluster.wait_slaves("s1")
    sizes, wals, memory = [], [], []
    with cluster.client() as client:
        for _ in range(10):  # 30,000 no-op jobs
            assert client.map(jobs.noop_item, range(WAVE), chunksize=1) == [None] * WAVE
            # a pass comes once 1,000 more finished: at most 2,000 + 999 are left
            wait_until(lambda: len(journal_ids(state)) <= 3_000, what="a retention pass")
            sizes.append(disk(state))
            wals.append(wal(state))
            memory.append(rss(cluster.master.pid))  # type: ignore[union-attr]
        assert client.status()["in_memory"] <= 2_000  # the memory window follows the count
    later = 7 * WAVE  # jobs run after the third wave
    # unpruned, each no-op job takes about 120 bytes of journal: the space freed is reused
    assert sizes[-1] - sizes[2] < 20 * later, sizes
    assert max(wals) < WAL_KEEP_BYTES, wals  # it starts over (copied in by the checkpointer)
    # a finished job kept in memory costs about 400 bytes (Worker.batch on the board still
    # keeps an entry, some 100 bytes, for every job a slave was handed)
    assert memory[-1] - memory[2] < 200 * later, memory
    assert journal_ids(state, "state != 'succeeded'") == []
    lines = [line for line in cluster.master.log().splitlines() if "left the journal" in line]
    assert len(lines) >= 5 and "beyond the newest 2000 finished" in lines[0]


def test_an_age_limit_prunes_in_the_background(make_cluster):
    cluster = make_cluster(SCHEDULER_RETAIN="1s")  # a pass every second (the least)
    cluster.start_slave("s1")
    with cluster.client() as client:
        client.map(jobs.noop_item, range(20), chunksize=1)
    state = cluster.tmp / "state"
    wait_until(lambda: journal_ids(state) == [20], what="jobs older than 1s to go")
    cluster.master.wait_log(r"retention: \d+ job\(s\) left the journal \(ended over 1s ago\)")  # type: ignore[union-attr]


def test_scheduler_prune_asks_the_master_and_says_how_many_left(make_cluster):
    cluster = make_cluster(SCHEDULER_RETAIN="off")
    cluster.master.wait_log("retention off")  # type: ignore[union-attr]
    cluster.start_slave("s1")
    with cluster.client() as client:
        client.map(jobs.noop_item, range(40), chunksize=1)
    state = cluster.tmp / "state"
    wait_until(lambda: len(journal_ids(state, "state = 'succeeded'")) == 40, what="saved")

    none = scheduler(cluster, "prune", "--master", cluster.address)
    assert none.returncode == 0 and none.stdout.startswith("0 job(s) left the journal (no rule")
    kept = scheduler(cluster, "prune", "--keep", "10", "--master", cluster.address)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.startswith("30 job(s) left the journal (beyond the newest 10 finished)")
    assert journal_ids(state) == list(range(31, 41))
    every = scheduler(cluster, "--master", cluster.address, "prune", "--older-than", "0", "--json")
    assert every.returncode == 0 and json.loads(every.stdout)["jobs"] == 9
    assert journal_ids(state) == [40]  # the newest stays: a restart numbers on from it

    for bad, message in (
        (["--keep", "-1"], "--keep: expected a whole number"),
        (["--older-than", "3y"], "--older-than: expected a duration"),
    ):
        refused = scheduler(cluster, "prune", *bad, "--master", cluster.address)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.startswith(f"error: {message}") and refused.stderr.count("\n") == 1

    cluster.restart_master(SCHEDULER_RETAIN="off")
    with cluster.client() as client:
        assert [j["id"] for j in client.jobs()] == [40]
        with pytest.raises(UnknownJob):
            client.job(1)
        assert client.apply_async(jobs.square, (4,)).get(timeout=30) == 16
        assert client.jobs(limit=1)[0]["id"] == 41  # no id given twice


def test_a_backup_taken_while_jobs_come_in_is_a_journal_a_master_starts_from(make_cluster):
    cluster = make_cluster()
    cluster.start_slave("s1")
    copy = cluster.tmp / "copy.sqlite3"
    stop = threading.Event()
    submitted: list[int] = []

    def submit() -> None:
        with cluster.client() as client:
            while not stop.is_set():
                handles = [client.apply_async(jobs.noop_item, (i,)) for i in range(200)]
                client.flush()
                submitted.extend(h.id for h in handles)

    submitter = threading.Thread(target=submit)
    submitter.start()
    try:
        wait_until(lambda: len(submitted) >= 1_000, what="jobs coming in")
        env = {"SCHEDULER_STATE_DIR": str(cluster.tmp / "state")}
        taken = scheduler(cluster, "backup", str(copy), **env)
        assert taken.returncode == 0, taken.stderr
        wait_until(lambda: len(submitted) >= 2_000, what="more jobs after the backup")
        again = scheduler(cluster, "backup", str(copy), **env)
        assert again.returncode == 2 and "exists; give --force" in again.stderr
        assert scheduler(cluster, "backup", str(copy), "--force", **env).returncode == 0
    finally:
        stop.set()
        submitter.join(timeout=60)
    copied = journal_ids(copy.parent, name=copy.name)
    # a snapshot: every job up to the newest it holds (ids are committed in order)
    assert copied == list(range(1, len(copied) + 1)) and len(copied) >= 2_000
    assert os.stat(copy).st_mode & 0o777 == 0o600

    restored = make_cluster("restored")
    restored.kill_master()
    (restored.tmp / "state" / "journal.sqlite3").unlink()
    for leftover in (restored.tmp / "state").glob("journal.sqlite3-*"):
        leftover.unlink()
    copy.rename(restored.tmp / "state" / "journal.sqlite3")
    restored.start_master()
    restored.start_slave("s1")  # the name the copy's running jobs were handed to
    with restored.client() as client:
        assert client.status()["total"] == len(copied)
        finished = client.wait(timeout=120)  # what was queued or running in the copy runs
        assert {j["state"] for j in finished} <= {"succeeded"}
        assert client.status()["counts"]["succeeded"] == len(copied)

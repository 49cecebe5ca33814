"""The terminal view (scheduler.top) against a real master and slave."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from scheduler import top

from .scheduler_procs import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def working(cluster):
    """One slave of 2 slots running two long named jobs, with more queued behind them."""
    cluster.start_slave("topper", concurrency=2)
    cluster.wait_slaves("topper")
    with cluster.client() as client:
        for i in range(3):
            client.submit_shell(["true"], name=f"quick-{i}")
        client.flush()
        wait_until(lambda: client.status()["counts"]["succeeded"] == 3, what="the quick jobs")
        for name in ("long-0", "long-1", "waits"):
            client.submit_shell(["sleep", "30"], name=name)
        client.flush()
        wait_until(lambda: len(client.status()["workers"][0]["running"]) == 2, what="2 running")
    return cluster


def test_one_frame_shows_counts_rate_eta_and_what_each_worker_runs(working):
    out = io.StringIO()
    with working.client() as client:
        assert top.run(client, interval=0.3, once=True, out=out) == 0
        counts = client.status()["counts"]
    frame = out.getvalue()
    for word in ("queued", "running", "succeeded", "rate", "jobs/s", "ETA", "topper"):
        assert word in frame, (word, frame)
    assert "long-0" in frame and "long-1" in frame  # what the worker runs, by name
    assert "quick-0" not in frame  # finished: counted, not listed
    states = ("queued", "running", "succeeded", "failed", "cancelled")
    numbers = [str(counts[s]) for s in states]
    assert any(line.split()[:5] == numbers for line in frame.splitlines()), frame


def test_the_live_view_redraws_until_ctrl_c(working, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from scheduler import Client, top
        with Client({working.address!r}, {working.authkey!r}) as client:
            sys.exit(top.run(client, interval=0.2))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(1.5)  # the client connects, then a few frames
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "topper" in out and "long-0" in out and "Traceback" not in err

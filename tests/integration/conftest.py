from __future__ import annotations

import pytest

from .scheduler_procs import Cluster


@pytest.fixture
def cluster(tmp_path):
    """A fresh master (no slaves yet); everything it starts is killed afterwards."""
    c = Cluster(tmp_path)
    c.start_master()
    yield c
    c.stop()


@pytest.fixture
def busy(cluster):
    """A master with one slave, s1, of 2 processes, registered."""
    cluster.start_slave("s1", concurrency=2)
    cluster.wait_slaves("s1")
    return cluster

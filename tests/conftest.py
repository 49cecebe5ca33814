"""Shared test set-up: a developer's shell must not change results."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SCHEDULER_", "DEPLOYCTL_")):
            monkeypatch.delenv(name)


# The test bed and the role images (tests/testbed/fixtures.py), session-scoped.
from tests.testbed.fixtures import (  # noqa: E402, F401  (fixtures are found by name)
    docker_engine,
    loopback_testbed,
    role_images,
    testbed,
    testbed_layout,
)

"""A test session in miniature, run as a child pytest by test_engine_ownership.py.

Not collected by the suite itself (its name does not start with ``test_``): it only takes the
``docker_engine`` fixture, which is what every session that needs the engine does.
"""

from __future__ import annotations

import docker


def test_the_engine_answers(docker_engine: docker.DockerClient) -> None:
    assert docker_engine.ping()

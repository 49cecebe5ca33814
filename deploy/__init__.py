"""deployctl: deploy the scheduler in containers across hosts (CLI in ``deploy.cli``)."""

from __future__ import annotations

from .errors import (
    ConfigError,
    DeployError,
    HostError,
    HostKeyError,
    JobsFailed,
    MasterError,
    PartialFailure,
)

__all__ = [
    "ConfigError", "DeployError", "HostError", "HostKeyError", "JobsFailed", "MasterError",
    "PartialFailure",
]  # fmt: skip

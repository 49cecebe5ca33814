"""A distributed job scheduler on ``multiprocessing.managers``: master, slaves, and a client
shaped like ``multiprocessing.Pool`` that spans machines."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import AsyncResult, Client  # noqa: E402
from .errors import (  # noqa: E402
    AuthError,
    ConfigError,
    ConnectError,
    Forbidden,
    JobFailed,
    SchedulerError,
    ShuttingDown,
    SubmitError,
    UnknownJob,
)
from .job import State  # noqa: E402

__all__ = [
    "AsyncResult", "AuthError", "Client", "ConfigError", "ConnectError", "Forbidden", "JobFailed",
    "SchedulerError", "ShuttingDown", "State", "SubmitError", "UnknownJob", "__version__",
]  # fmt: skip

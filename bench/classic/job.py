"""The tutorial's Job: an id, plus (for the benchmark) what to run and its result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Job:
    def __init__(self, job_id: int, func: Callable[..., Any] | None = None,
                 args: tuple = ()) -> None:  # fmt: skip
        self.job_id = job_id
        self.func = func
        self.args = args
        self.result: Any = None

    def run(self) -> None:
        """What the slave does with a job; the tutorial's slave only slept."""
        if self.func is not None:
            self.result = self.func(*self.args)

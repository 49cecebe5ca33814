"""The job record, its states, and the spec a client submits."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from .errors import SubmitError
from .protocol import JobSpec

__all__ = ["AFTER", "ARRAY", "Job", "JobSpec", "State", "parse_array", "parse_labels", "validate"]


class State(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})
KINDS = ("shell", "python")


MAX_TIMEOUT = 365 * 86400.0  # a year: beyond it a timeout is a mistake, not a plan
MAX_RETRIES = 1000
MAX_AFTER = 10_000  # jobs one job may come after
MAX_BACKOFF = 86400.0  # a day before the first retry; doubled each time, capped (board)
DEFAULT_BACKOFF = 10.0  # seconds before the first retry, unless the job or master says
MAX_ARRAY = 100_000  # tasks in one array (one submit call carries them all)
MAX_PRIORITY = 1_000_000  # priorities run from -MAX_PRIORITY to MAX_PRIORITY
MAX_LABELS = 64  # labels a slave carries, or a job requires
_LABEL = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


def parse_labels(text: str) -> dict[str, str]:
    """``"gpu=1,zone=a"`` as a dict (a slave's SCHEDULER_WORKER_LABELS, a job's --requires).

    Raises ValueError with a line a user can act on.
    """
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not _LABEL.fullmatch(key) or not _LABEL.fullmatch(value):
            raise ValueError(
                f"bad label {part!r}: write KEY=VALUE pairs separated by commas, e.g. "
                "gpu=1,zone=a (letters, digits and _.:/- only)"
            )
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    return labels


def parse_array(text: str) -> tuple[list[int], int | None]:
    """An array spec as Slurm writes it: ``1-1000%50``, ``0-9``, ``1,3,5-7``, ``0-99:2%4``.

    Returns (the task indices in order, the cap on tasks running at once or None).
    Raises ValueError with a line a user can act on.
    """
    ranges, pct, cap_text = text.strip().partition("%")
    cap = None
    if pct:
        if not cap_text.strip().isdigit() or int(cap_text) < 1:
            raise ValueError(f"bad array cap {cap_text!r} in {text!r}: after % give a whole "
                             "number >= 1 (at most that many tasks run at once)")  # fmt: skip
        cap = int(cap_text)
    indices: list[int] = []
    for part in (p.strip() for p in ranges.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])) or (m[3] and int(m[3]) < 1):
            raise ValueError(f"bad array range {part!r} in {text!r}: write e.g. 1-1000%50, "
                             "0-9, 1,3,5-7 or 0-99:2 (FIRST-LAST[:STEP], then %CAP)")  # fmt: skip
        first = int(m[1])
        last = first if m[2] is None else int(m[2])
        if (last - first) // int(m[3] or 1) + 1 + len(indices) > MAX_ARRAY:
            raise ValueError(f"array {text!r} has more than {MAX_ARRAY:,} tasks; "
                             "split it into several arrays")  # fmt: skip
        indices.extend(range(first, last + 1, int(m[3] or 1)))
    if len(set(indices)) != len(indices):
        raise ValueError(f"array {text!r} names an index twice; give each index once")
    return indices, cap


AFTER = JobSpec._fields.index("after")  # positions in a spec as validate() returns it
ARRAY = JobSpec._fields.index("array")


def validate(
    spec: Any, known: dict[str, bytes], sent: dict[str, bytes] | None = None
) -> tuple[Any, ...]:
    """Check a spec from the wire; raise SubmitError with a message a user can act on.

    Returns a JobSpec, or for the common plain Python call the very tuple that came (a
    JobSpec's fields in order): read what it returns by position (``spec[AFTER]``)."""
    if (  # the common case, a plain Python call (apply_async, map), checked in one go;
        # it stays the plain tuple it came as (read by position, see protocol)
        (type(spec) is tuple or type(spec) is JobSpec)
        and len(spec) == len(JobSpec._fields)
        and spec[0] == "python"
        and spec[3] is None
        and spec[4] is None
        and spec[5] is None
        and spec[6] is None
        and spec[7] is None
        and spec[8] is None
        and spec[9] is None
        and spec[10] is None
        and spec[11] is None
        and type(spec[2]) is str
        and type(payload := spec[1]) is tuple
        and len(payload) == 2
        and type(payload[1]) is bytes
        and (payload[0] in known or (sent is not None and payload[0] in sent))
    ):
        return spec
    if not isinstance(spec, tuple) or len(spec) not in (6, 8, len(JobSpec._fields)):
        raise SubmitError(
            f"malformed job spec {type(spec).__name__}; submit through scheduler.Client"
        )
    if type(spec) is not JobSpec:
        spec = JobSpec(*spec)
    if spec.kind not in KINDS:
        raise SubmitError(f"unknown job kind {spec.kind!r}; use one of {', '.join(KINDS)}")
    sizes = (2, 4) if spec.kind == "shell" else (2,)
    if not isinstance(spec.payload, tuple) or len(spec.payload) not in sizes:
        raise SubmitError(f"malformed {spec.kind} payload")
    if spec.kind == "shell":
        _validate_command(*spec.payload[:2])
        _validate_place(*spec.payload[2:])
    elif not (isinstance(spec.payload[0], str) and (spec.payload[0] in (sent or ())
                                                   or spec.payload[0] in known)):
        raise SubmitError("python job refers to a function that was not sent with it")
    elif not isinstance(spec.payload[1], bytes):
        raise SubmitError("python job arguments must be a pickled blob")
    if spec.timeout is not None and not (
        type(spec.timeout) in (int, float) and 0 < spec.timeout <= MAX_TIMEOUT
    ):
        raise SubmitError(
            f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:.0f} "
            f"(a year), got {spec.timeout!r}; leave it out for no limit"
        )
    if spec.max_attempts is not None and not (
        isinstance(spec.max_attempts, int) and spec.max_attempts >= 1
    ):
        raise SubmitError(f"max_attempts must be an integer >= 1, got {spec.max_attempts!r}")
    if spec.retries is not None and not (
        type(spec.retries) is int and 0 <= spec.retries <= MAX_RETRIES
    ):
        raise SubmitError(f"retries must be a whole number from 0 to {MAX_RETRIES}, "
                          f"got {spec.retries!r}")  # fmt: skip
    if spec.retry_backoff is not None and not (
        type(spec.retry_backoff) in (int, float) and 0 <= spec.retry_backoff <= MAX_BACKOFF
    ):
        raise SubmitError(f"retry_backoff must be a number of seconds from 0 to "
                          f"{MAX_BACKOFF:.0f} (a day), got {spec.retry_backoff!r}")  # fmt: skip
    if spec.after is not None:
        if not (
            isinstance(spec.after, (tuple, list))
            and 0 < len(spec.after) <= MAX_AFTER
            and all(type(i) is int and i > 0 for i in spec.after)
        ):
            raise SubmitError(f"after must list 1 to {MAX_AFTER} job ids (positive integers), "
                              f"got {spec.after!r}")  # fmt: skip
        spec = spec._replace(after=tuple(sorted(set(spec.after))))
    if spec.priority is not None and not (
        type(spec.priority) is int and -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY
    ):
        raise SubmitError(f"priority must be a whole number from -{MAX_PRIORITY} to "
                          f"{MAX_PRIORITY} (higher runs first), got {spec.priority!r}")  # fmt: skip
    if spec.requires is not None:
        if not (
            isinstance(spec.requires, dict)
            and len(spec.requires) <= MAX_LABELS
            and all(type(k) is str and type(v) is str and _LABEL.fullmatch(k)
                    and _LABEL.fullmatch(v) for k, v in spec.requires.items())
        ):  # fmt: skip
            raise SubmitError("requires must map labels to values (gpu=1,zone=a: letters, "
                              f"digits and _.:/- only), got {spec.requires!r}")  # fmt: skip
        spec = spec._replace(requires=dict(spec.requires) or None)
    if spec.array is not None and not (
        isinstance(spec.array, tuple)
        and len(spec.array) == 2
        and all(type(x) is int and x >= 0 for x in spec.array)
    ):
        raise SubmitError(f"array must be (index, cap), whole numbers >= 0, got "
                          f"{spec.array!r}; submit arrays with Client.submit_array or "
                          "map(max_running=)")  # fmt: skip
    if not isinstance(spec.name, str):
        raise SubmitError("job name must be a string")
    if spec.labels is not None and not (
        isinstance(spec.labels, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in spec.labels.items())
    ):
        raise SubmitError("job labels must map strings to strings")
    return spec


def _validate_place(cwd: Any = None, env: Any = None) -> None:
    if cwd is not None and not (isinstance(cwd, str) and cwd):
        raise SubmitError("cwd must be a directory path (a non-empty string)")
    if env is not None and not (
        isinstance(env, dict)
        and all(isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                for k, v in env.items())
    ):  # fmt: skip
        raise SubmitError("env must map variable names to strings (NAME=value)")


def _validate_command(command: Any, use_shell: Any) -> None:
    if use_shell:
        if not isinstance(command, str) or not command.strip():
            raise SubmitError("empty shell command; give a non-empty string")
        return
    if not isinstance(command, list) or not command:
        raise SubmitError("empty command; give at least the program to run")
    if not all(isinstance(a, str) for a in command) or not command[0]:
        raise SubmitError("command arguments must be non-empty strings (argv list)")


@dataclass(slots=True, eq=False)
class Job:
    """A job as the master keeps it. ``lease`` identifies the current hand-out."""

    id: int
    kind: str
    payload: tuple
    name: str = ""
    labels: dict[str, str] | None = None
    timeout: float | None = None
    max_attempts: int = 3
    state: State = State.QUEUED
    attempts: int = 0
    worker: str | None = None
    lease: int = 0
    submitted: float = 0.0
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    result: bytes | None = None
    error: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    retries: int = 0  # failed runs tried again, at most
    retry_backoff: float = DEFAULT_BACKOFF  # seconds before the first retry, then doubled
    failures: int = 0  # failed runs so far (each tried again)
    not_before: float | None = None  # backing off after a failure: not handed out before
    history: list[dict[str, Any]] | None = None  # the failed runs tried again, oldest first
    after: tuple[int, ...] | None = None  # jobs that must succeed before it runs
    priority: int = 0  # higher runs first
    requires: dict[str, str] | None = None  # labels a slave must carry to run it
    array: int | None = None  # the array it is a task of (the array's first job id)
    array_index: int | None = None  # its index in the array (SCHEDULER_ARRAY_INDEX)
    array_cap: int = 0  # at most this many of the array's tasks run at once (0: no cap)
    # the client(s) waiting for the outcome, usually one; not journaled
    session: str | tuple[str, ...] | None = None
    journaled: bool = False  # the journal has a row for it

    @property
    def label(self) -> str:
        """How log lines name the job."""
        return f"{self.id} ({self.name})" if self.name else str(self.id)

    def describe(self) -> str:
        """A short human description of what the job runs."""
        if self.kind == "shell":
            command, use_shell = self.payload[:2]
            return command if use_shell else " ".join(command)
        return "python callable"

    def info(self, with_result: bool = False) -> dict[str, Any]:
        """The public view of the job, safe to send to clients and print as JSON."""
        view = {
            "id": self.id,
            "name": self.name,
            "labels": dict(self.labels or {}),
            "kind": self.kind,
            "command": self.describe(),
            "state": str(self.state),
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "timeout": self.timeout,
            "worker": self.worker,
            "submitted": self.submitted,
            "started": self.started,
            "ended": self.ended,
            "exit_code": self.exit_code,
            "error": self.error,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "retries": self.retries,
            "failures": self.failures,
            "not_before": self.not_before,
            "history": list(self.history or ()),
            "after": list(self.after or ()),
            "priority": self.priority,
            "requires": dict(self.requires or {}),
            "array": self.array,
            "array_index": self.array_index,
            "max_running": self.array_cap or None,
        }
        if with_result:
            view["result"] = self.result
        return view

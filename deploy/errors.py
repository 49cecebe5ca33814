"""Errors raised by deployctl: one base class; every message names the subject and the next step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class DeployError(Exception):
    """Base class of every error deployctl raises on purpose.

    ``subject`` is what the problem is about (a host, a key path, the master),
    ``hint`` the next step for the user. ``exit_code`` is what the CLI exits with.
    """

    exit_code = 1

    def __init__(self, subject: str, detail: str, hint: str = "") -> None:
        self.subject = subject
        self.detail = detail
        self.hint = hint
        super().__init__(subject, detail, hint)

    def __str__(self) -> str:
        text = f"{self.subject}: {self.detail}" if self.subject else self.detail
        return f"{text}; {self.hint}" if self.hint else text


class ConfigError(DeployError):
    """The inventory or the command line is invalid; lists every problem with its key path."""

    exit_code = 2

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        detail = f"{len(self.problems)} problem(s):\n  " + "\n  ".join(self.problems)
        super().__init__(source, detail, "")


class HostError(DeployError):
    """One host could not be used: unreachable, refused login, no engine, a port in use."""

    exit_code = 3

    def __init__(self, host: str, address: str, detail: str, hint: str = "") -> None:
        self.host = host
        self.address = address
        subject = f"host {host} ({address})" if address and address != host else f"host {host}"
        super().__init__(subject, detail, hint)


class HostKeyError(HostError):
    """The host's key is unknown (refused until trusted) or has changed (always refused)."""

    def __init__(
        self, host: str, address: str, detail: str, hint: str, fingerprint: str, changed: bool
    ) -> None:
        self.fingerprint = fingerprint
        self.changed = changed
        super().__init__(host, address, detail, hint)


class MasterError(DeployError):
    """The master does not answer, refuses the key, or the cluster did not become ready."""

    exit_code = 4


class JobsFailed(DeployError):
    """Submitted jobs ended failed or cancelled."""

    exit_code = 5


class PartialFailure(DeployError):
    """Some hosts failed while the others went on; one line per failed host."""

    exit_code = 3

    def __init__(self, action: str, failures: Mapping[str, BaseException], total: int) -> None:
        self.failures = dict(failures)
        lines = "\n  ".join(f"{name}: {_short(err)}" for name, err in sorted(self.failures.items()))
        detail = f"failed on {len(self.failures)} of {total} host(s):\n  {lines}"
        super().__init__(action, detail, "fix the hosts above and run the command again")

    def __str__(self) -> str:
        return f"{self.subject}: {self.detail}\n{self.hint}"


def _short(err: BaseException) -> str:
    if isinstance(err, HostError):
        return f"{err.detail}; {err.hint}" if err.hint else err.detail
    return str(err) or type(err).__name__

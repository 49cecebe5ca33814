"""Settings read from the environment (``SCHEDULER_*``), with command-line overrides."""

from __future__ import annotations

import difflib
import logging
import math
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Generic, TypeVar

from .errors import ConfigError
from .job import parse_labels

log = logging.getLogger(__name__)

MIN_AUTHKEY = 16

# Defaults that deploy/ shares with the scheduler: defined once, here.
DEFAULT_PORT = 8888
DEFAULT_LEASE_SECONDS = 6.0  # silence after which a slave counts as dead and its jobs move
DEFAULT_GRACE_SECONDS = 60.0  # how long a draining slave lets running jobs finish
DEFAULT_RETAIN = 7 * 86400.0  # finished jobs leave the master's journal after a week
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


SecretValue = TypeVar("SecretValue", str, bytes)


class Secret(Generic[SecretValue]):
    """Holds a secret (the authkey); never shows it in repr, str, f-strings or logs.

    ``reveal()`` only at the boundary that needs the value. deployctl uses it too.
    """

    __slots__ = ("_value",)

    def __init__(self, value: SecretValue) -> None:
        self._value: SecretValue = value

    def reveal(self) -> SecretValue:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(Secret)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too); a ConfigError naming ``what`` otherwise."""
    if "://" in text:
        raise ConfigError(
            f"{what}: expected host:port without a scheme, got {text!r}; "
            f"write {text.split('://', 1)[1].split('/', 1)[0]!r}"
        )
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected host:port (e.g. 10.0.0.5:8888), got {text!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Settings:
    authkey: Secret[bytes] = field(repr=False)
    bind: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT)
    master: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT)
    state_dir: str = "./scheduler-state"
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    # the pid alone repeats across containers (always 1): a random tail keeps names apart
    worker_name: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
    )
    worker_labels: dict[str, str] = field(default_factory=dict)  # gpu=1,zone=a
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    heartbeat_seconds: float | None = None  # default: a third of lease_seconds
    max_attempts: int = 3
    retries: int = 0  # failed runs tried again, unless a job says otherwise
    retry_backoff: float = 10.0  # seconds before the first retry, doubled each time
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    output_limit: int = 64 * 1024
    progress_seconds: float = 5.0
    health_file: str = "/tmp/scheduler-slave.health"
    keep_finished: int = 100_000
    result_limit: int = 16 * 1024 * 1024
    http: tuple[str, int] | None = ("127.0.0.1", DEFAULT_PORT + 1)  # metrics and dashboard
    retain: float | None = DEFAULT_RETAIN  # seconds finished jobs stay in the journal (None: ever)
    retain_count: int | None = None  # finished jobs the journal keeps at most (None: no limit)


# variable -> (field, parser)
_VARS = {
    "SCHEDULER_BIND": ("bind", "address"),
    "SCHEDULER_MASTER": ("master", "address"),
    "SCHEDULER_STATE_DIR": ("state_dir", "str"),
    "SCHEDULER_CONCURRENCY": ("concurrency", "posint"),
    "SCHEDULER_WORKER_NAME": ("worker_name", "str"),
    "SCHEDULER_WORKER_LABELS": ("worker_labels", "labels"),
    "SCHEDULER_LEASE_SECONDS": ("lease_seconds", "posfloat"),
    "SCHEDULER_HEARTBEAT_SECONDS": ("heartbeat_seconds", "posfloat"),
    "SCHEDULER_MAX_ATTEMPTS": ("max_attempts", "posint"),
    "SCHEDULER_RETRIES": ("retries", "count"),
    "SCHEDULER_RETRY_BACKOFF": ("retry_backoff", "nonneg"),
    "SCHEDULER_GRACE_SECONDS": ("grace_seconds", "nonneg"),
    "SCHEDULER_OUTPUT_LIMIT": ("output_limit", "posint"),
    "SCHEDULER_PROGRESS_SECONDS": ("progress_seconds", "posfloat"),
    "SCHEDULER_HEALTH_FILE": ("health_file", "str"),
    "SCHEDULER_KEEP_FINISHED": ("keep_finished", "posint"),
    "SCHEDULER_RESULT_LIMIT": ("result_limit", "posint"),
    "SCHEDULER_HTTP": ("http", "optaddress"),
    "SCHEDULER_RETAIN": ("retain", "retain"),
    "SCHEDULER_RETAIN_COUNT": ("retain_count", "posint"),
}
VARIABLES = ("SCHEDULER_AUTHKEY", "SCHEDULER_AUTHKEY_FILE", *_VARS)
# Mutual TLS (scheduler.tls reads them where connections are made, scheduler.transport):
# the first three together turn it on, for every process of the cluster.
TLS_CA, TLS_CERT, TLS_KEY, TLS_CRL = (
    "SCHEDULER_TLS_CA", "SCHEDULER_TLS_CERT", "SCHEDULER_TLS_KEY", "SCHEDULER_TLS_CRL",
)  # fmt: skip
TLS_VARIABLES = {
    TLS_CA: "the cluster CA's certificate (ca.pem from 'scheduler certs init'); with the "
            "next two it turns mutual TLS on",
    TLS_CERT: "this node's certificate (NAME.pem from 'scheduler certs issue'): its name and role",
    TLS_KEY: "this node's private key (NAME.key), mode 0600",
    TLS_CRL: "master: the revocation list, re-read when it changes (default: crl.pem beside "
             "the CA, if there)",
}  # fmt: skip
# also read, but not settings of a process: what a slave tells its jobs
KNOWN = (*VARIABLES, *TLS_VARIABLES, "SCHEDULER_ARRAY_INDEX")


_EXPECTED = {
    "posint": "a positive integer",
    "count": "a whole number, 0 or more",
    "posfloat": "a positive number of seconds",
    "nonneg": "a number of seconds, 0 or more",
    "str": "a non-empty string",
}


def parse_duration(text: str, what: str, hint: str = "") -> float:
    """Seconds from ``90``, ``1.5``, ``30s``, ``30m``, ``12h``, ``7d`` or ``2w``; a
    ConfigError naming ``what`` (and ending with ``hint``) otherwise."""
    raw = text.strip().lower()
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in _UNITS else (raw, "s")
    try:
        seconds = float(number) * _UNITS[unit]
        if not math.isfinite(seconds) or seconds < 0 or number.strip() != number:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"{what}: expected a duration (seconds, or a number with s, m, h, d or w: "
            f"7d, 12h, 30m){hint}, got {text!r}"
        ) from None
    return seconds


def format_duration(seconds: float) -> str:
    """``604800`` -> ``7d``; ``90`` -> ``90s``: the largest unit that divides it."""
    for unit in "dhm":
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _convert(name: str, kind: str, raw: str) -> object:
    if kind == "retain":  # 0 or off: no age limit
        if raw.strip().lower() == "off":
            return None
        return parse_duration(raw, name, " or 0/off for no age limit") or None
    if kind == "address":
        return parse_address(raw, name)
    if kind == "labels":
        try:
            return parse_labels(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if kind == "optaddress":
        return parse_address(raw, name) if raw.strip() else None
    try:
        if kind == "str":
            if not raw.strip():
                raise ValueError
            return raw.strip()
        number = int(raw) if kind in ("posint", "count") else float(raw)
        zero_ok = kind in ("nonneg", "count")
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{name}: expected {_EXPECTED[kind]}, got {raw!r}") from None
    return number


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning line per ``SCHEDULER_*`` variable we do not read, with the closest name."""
    lines = []
    for name in sorted(n for n in environ if n.startswith("SCHEDULER_") and n not in KNOWN):
        close = difflib.get_close_matches(name, KNOWN, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else "; see the README's settings table"
        lines.append(f"{name} is not a setting and is ignored{hint}")
    return lines


def authkey_from(raw: str | bytes | None, source: str = "SCHEDULER_AUTHKEY") -> Secret[bytes]:
    if raw is None or raw == "" or raw == b"":
        raise ConfigError(
            f"{source} is not set; set it to the cluster's shared key "
            "(generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    key = raw.encode() if isinstance(raw, str) else raw
    if len(key) < MIN_AUTHKEY:
        raise ConfigError(f"{source} is too short; use at least {MIN_AUTHKEY} random characters")
    return Secret(key)


def authkey_from_environ(environ: Mapping[str, str]) -> Secret[bytes]:
    """``SCHEDULER_AUTHKEY``, else the first line of the file ``SCHEDULER_AUTHKEY_FILE``."""
    path = environ.get("SCHEDULER_AUTHKEY_FILE", "").strip()
    if environ.get("SCHEDULER_AUTHKEY") or not path:
        return authkey_from(environ.get("SCHEDULER_AUTHKEY"))
    try:
        with open(path, "rb") as fh:
            raw = fh.readline().strip()
    except OSError as exc:
        raise ConfigError(f"SCHEDULER_AUTHKEY_FILE: cannot read {path}: {exc.strerror}") from None
    return authkey_from(raw, f"the key in {path}")


def load(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build settings from ``environ`` (default ``os.environ``); None overrides are ignored."""
    environ = os.environ if environ is None else environ
    for line in unknown_variables(environ):
        log.warning("%s", line)
    values: dict[str, object] = {}
    for name, (attr, kind) in _VARS.items():
        if environ.get(name, "").strip() or (kind == "optaddress" and name in environ):
            values[attr] = _convert(name, kind, environ[name])
    known = {f.name for f in fields(Settings)}
    for attr, value in overrides.items():
        if attr not in known:
            raise TypeError(f"unknown setting {attr}")
        if value is not None:
            values[attr] = value
    if values.get("authkey") is None:
        values["authkey"] = authkey_from_environ(environ)
    elif not isinstance(values["authkey"], Secret):
        values["authkey"] = authkey_from(values["authkey"])  # type: ignore[arg-type]
    return Settings(**values)  # type: ignore[arg-type]

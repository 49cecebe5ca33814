"""The inventory: one frozen dataclass tree, loaded from TOML (or ``--hosts``) and validated whole.

Every problem in the file is collected with its key path before anything runs; SSH settings
come from the user's ``~/.ssh/config`` (through an injected reader); the inventory overrides.
A host's address, for everything the containers and tunnels use, is what ``ssh -G HOST`` would
connect to (its ``HostName``), unless the inventory sets ``address``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.job import parse_labels
from scheduler.settings import DEFAULT_GRACE_SECONDS, DEFAULT_PORT

from .errors import ConfigError

DEFAULT_INVENTORY = "cluster.toml"
LOCAL = "localhost"
LABELS_VAR = "SCHEDULER_WORKER_LABELS"  # a worker's labels (hosts[].labels), as gpu=1,zone=a
# Variables the kit sets itself on every container; [env] may not override them.
RESERVED_ENV = frozenset({
    "SCHEDULER_AUTHKEY", "SCHEDULER_MASTER", "SCHEDULER_BIND", "SCHEDULER_STATE_DIR",
    "SCHEDULER_WORKER_NAME", "SCHEDULER_CONCURRENCY", "SCHEDULER_GRACE_SECONDS",
    "SCHEDULER_TLS_CA", "SCHEDULER_TLS_CERT", "SCHEDULER_TLS_KEY", "SCHEDULER_TLS_CRL",
    "SCHEDULER_AUTHKEY_FILE", LABELS_VAR,
})  # fmt: skip
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,39}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_ENTRY = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>[^@:\s]+)(?::(?P<port>\d+))?$")

SSHLookup = Callable[[str], Mapping[str, Any]]
# Given the ssh_config path, returns lookups in it (deploy.ssh.config_lookup; fakes in tests).
SSHConfigReader = Callable[[str], SSHLookup]


@dataclass(frozen=True)
class SSHTarget:
    """How to reach a host over SSH, after ``~/.ssh/config`` and inventory overrides."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    known_hosts: str
    connect_timeout: float
    proxy_command: str | None = None

    @property
    def address(self) -> str:
        return f"{self.hostname}:{self.port}"


@dataclass(frozen=True)
class Host:
    """One machine with a Docker engine; ``ssh`` is None for this machine's own engine."""

    name: str
    address: str  # how the other hosts reach this one: hosts[].address, else ssh's HostName
    capacity: int | None  # max worker containers here; None = no limit; 0 = none
    ssh: SSHTarget | None
    docker_host: str | None  # engine socket: local URL, or remote socket path over SSH
    labels: tuple[tuple[str, str], ...] = ()  # its workers' labels, sorted; jobs require them

    @property
    def local(self) -> bool:
        return self.ssh is None

    @property
    def labels_text(self) -> str:
        return labels_text(dict(self.labels))


def labels_text(labels: Mapping[str, str] | None) -> str:
    """``gpu=1,zone=a``, as SCHEDULER_WORKER_LABELS and --requires write them ("" if none)."""
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


@dataclass(frozen=True)
class MasterSettings:
    host: str
    port: int
    advertise: str  # address:port the workers dial
    tunnel: str  # auto | always | never
    ready_timeout: float
    tls: bool  # mutual TLS, a certificate per container from the cluster's CA (certs_dir)


@dataclass(frozen=True)
class WorkerSettings:
    count: int
    concurrency: int
    grace_seconds: float


@dataclass(frozen=True)
class ImageSettings:
    master: str
    slave: str
    registry: str | None


@dataclass(frozen=True)
class Config:
    cluster: str
    hosts: tuple[Host, ...]
    master: MasterSettings
    workers: WorkerSettings
    images: ImageSettings
    env: tuple[tuple[str, str], ...]
    authkey_file: Path
    parallel: int
    source: str
    certs_dir: Path  # the cluster's CA and every certificate deployctl issued (0700)

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise ConfigError(self.source, [f"no host named {name!r} (known: {self.host_names()})"])

    def host_names(self) -> str:
        return ", ".join(h.name for h in self.hosts)

    @property
    def master_host(self) -> Host:
        return self.host(self.master.host)

    @property
    def worker_hosts(self) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.capacity != 0)


def load(
    path: Path | None,
    environ: Mapping[str, str],
    ssh_config: SSHConfigReader,
    hosts: str | None = None,
) -> Config:
    """Load ``path`` (None: ``cluster.toml`` if present), with ``hosts`` replacing its host list."""
    if path is None and Path(DEFAULT_INVENTORY).exists():
        path = Path(DEFAULT_INVENTORY)
    data: dict[str, Any] = {}
    source = str(path) if path else "--hosts"
    if path is not None:
        data = _read_toml(path)
    elif not hosts:
        raise ConfigError("inventory", [
            f"no {DEFAULT_INVENTORY} here and no --hosts; pass --hosts 'h1 h2' (or 'localhost'), "
            "or copy cluster.example.toml to cluster.toml"
        ])  # fmt: skip
    if hosts:
        data = hosts_override(data, hosts)
    base_dir = path.resolve().parent if path else Path.cwd()
    return from_mapping(data, environ, ssh_config, base_dir, source)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found; pass --inventory or --hosts"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from exc


def hosts_override(data: Mapping[str, Any], hosts: str) -> dict[str, Any]:
    """``--hosts "h1 user@h2:2222"``: these hosts replace the file's; the first runs the master."""
    entries: list[dict[str, Any]] = []
    for word in hosts.replace(",", " ").split():
        match = _HOST_ENTRY.match(word)
        if not match:
            entries.append({"name": word})  # validation reports it with its key path
            continue
        # the word is an ssh alias or a host name: ~/.ssh/config resolves it, as ssh would
        entry: dict[str, Any] = {
            "name": match["host"] + (f":{match['port']}" if match["port"] else "")
        }
        if match["user"]:
            entry["user"] = match["user"]
        if match["port"]:
            entry["port"] = int(match["port"])
        entries.append(entry)
    merged = dict(data)
    merged["hosts"] = entries
    master = dict(merged.get("master") or {})
    master["host"] = entries[0]["name"] if entries else ""
    master.pop("advertise", None)
    merged["master"] = master
    return merged


class _Reader:
    """Reads typed values out of nested mappings, collecting problems with their key paths."""

    def __init__(self, base_dir: Path) -> None:
        self.problems: list[str] = []
        self.base_dir = base_dir  # relative paths in the inventory are relative to its folder

    def table(self, data: Mapping[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problems.append(f"{key}: expected a table, got {_show(value)}")
            return {}
        self.unknown(value, key, allowed)
        return value

    def unknown(self, table: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                self.problems.append(
                    f"{path}.{key}: unknown key (known: {', '.join(sorted(allowed))})"
                )

    def get(self, table: Mapping[str, Any], path: str, key: str, kind: type, default: Any) -> Any:
        if key not in table:
            return default
        value = table[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            self.problems.append(f"{path}.{key}: expected {_KINDS[kind]}, got {_show(value)}")
            return default
        if kind is str and not value.strip():
            self.problems.append(f"{path}.{key}: must not be empty")
            return default
        return value

    def number(self, table: Mapping[str, Any], path: str, key: str, default: Any,
               low: float, high: float, kind: type = int) -> Any:  # fmt: skip
        value = self.get(table, path, key, kind, default)
        if value is not None and value is not default and not low <= value <= high:
            self.problems.append(f"{path}.{key}: expected {low:g} to {high:g}, got {value!r}")
            return default
        return value

    def choice(
        self, table: Mapping[str, Any], path: str, key: str, options: tuple[str, ...]
    ) -> str:
        value = self.get(table, path, key, str, options[0])
        if value not in options:
            self.problems.append(
                f"{path}.{key}: expected one of {', '.join(options)}, got {value!r}"
            )
            return options[0]
        return str(value)

    def files(self, table: Mapping[str, Any], path: str, key: str) -> tuple[str, ...] | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, str) and value.strip():
            return (value,)
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        self.problems.append(
            f"{path}.{key}: expected a path or a list of paths, got {_show(value)}"
        )
        return None


_KINDS = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
}


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict) else "a table"


_SSH_KEYS = {"user", "port", "identity_file", "known_hosts", "connect_timeout"}
_HOST_KEYS = _SSH_KEYS - {"connect_timeout"} | {"name", "address", "capacity", "docker_host",
                                                 "labels"}  # fmt: skip


def from_mapping(
    data: Mapping[str, Any],
    environ: Mapping[str, str],
    ssh_config: SSHConfigReader,
    base_dir: Path,
    source: str = "inventory",
) -> Config:
    """Validate a parsed inventory as a whole; raise one ConfigError listing every problem."""
    r = _Reader(base_dir)
    r.unknown(data, "", {"cluster", "master", "workers", "images", "ssh", "env", "hosts"})
    r.problems = [p.lstrip(".") for p in r.problems]
    cluster_t = r.table(data, "cluster", {"name", "authkey_file", "certs_dir", "parallel"})
    name = r.get(cluster_t, "cluster", "name", str, "scheduler")
    if not _NAME.match(name):
        r.problems.append(f"cluster.name: expected lowercase letters, digits, '-', '_' or '.' "
                          f"(at most 40), got {name!r}")  # fmt: skip
    authkey_file = r.get(cluster_t, "cluster", "authkey_file", str, f"{name}.authkey")
    certs_dir = r.get(cluster_t, "cluster", "certs_dir", str, f"{name}.certs")
    parallel = r.number(cluster_t, "cluster", "parallel", 8, 1, 64)
    ssh_t = r.table(data, "ssh", _SSH_KEYS | {"config_file"})
    home = environ.get("HOME", "/root")
    ssh_file = r.get(ssh_t, "ssh", "config_file", str, f"{home}/.ssh/config")
    hosts = _hosts(r, data, ssh_t, environ, ssh_config(str(_expand(ssh_file, environ, base_dir))))
    master = _master(r, data, hosts)
    workers_t = r.table(data, "workers", {"count", "concurrency", "grace_seconds"})
    default_count = max(2, sum(1 for h in hosts if h.capacity != 0))
    workers = WorkerSettings(
        count=r.number(workers_t, "workers", "count", default_count, 0, 1000),
        concurrency=r.number(workers_t, "workers", "concurrency", 2, 1, 1024),
        grace_seconds=r.number(workers_t, "workers", "grace_seconds", DEFAULT_GRACE_SECONDS, 0,
                               86400, float),  # fmt: skip
    )
    images_t = r.table(data, "images", {"master", "slave", "registry"})
    images = ImageSettings(
        master=r.get(images_t, "images", "master", str, "scheduler-master"),
        slave=r.get(images_t, "images", "slave", str, "scheduler-slave"),
        registry=r.get(images_t, "images", "registry", str, None),
    )
    env = _env(r, data)
    if hosts and all(h.capacity == 0 for h in hosts) and workers.count:
        r.problems.append("hosts: every host has capacity = 0, so no worker can run")
    if r.problems:
        raise ConfigError(source, r.problems)
    return Config(
        cluster=name, hosts=tuple(hosts), master=master, workers=workers, images=images,
        env=env, authkey_file=_expand(authkey_file, environ, base_dir), parallel=parallel,
        source=source, certs_dir=_expand(certs_dir, environ, base_dir),
    )  # fmt: skip


def _hosts(
    r: _Reader, data: Mapping[str, Any], ssh_t: Mapping[str, Any],
    environ: Mapping[str, str], ssh_lookup: SSHLookup,
) -> list[Host]:  # fmt: skip
    raw = data.get("hosts")
    if not isinstance(raw, list) or not raw:
        r.problems.append(f"hosts: expected a non-empty list of [[hosts]] tables, got {_show(raw)}")
        return []
    hosts: list[Host] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        path = f"hosts[{i}]"
        if not isinstance(entry, dict):
            r.problems.append(f"{path}: expected a table, got {_show(entry)}")
            continue
        r.unknown(entry, path, _HOST_KEYS)
        name = r.get(entry, path, "name", str, None)
        if name is None:
            if "name" not in entry:
                r.problems.append(f"{path}.name: missing")
            continue
        if name in seen:
            r.problems.append(f"{path}.name: {name!r} is listed twice")
        seen.add(name)
        host = _host(r, entry, path, name, ssh_t, environ, ssh_lookup)
        if host is not None:
            hosts.append(host)
    return hosts


def _host(
    r: _Reader, entry: Mapping[str, Any], path: str, name: str, ssh_t: Mapping[str, Any],
    environ: Mapping[str, str], ssh_lookup: SSHLookup,
) -> Host | None:  # fmt: skip
    if not _HOST_ENTRY.match(name) and name != LOCAL:
        r.problems.append(f"{path}.name: expected a host name, got {name!r}")
        return None
    capacity = r.number(entry, path, "capacity", None, 0, 1000)
    docker_host = r.get(entry, path, "docker_host", str, None)
    address = r.get(entry, path, "address", str, None)
    labels = _labels(r, entry, path, name)
    if name == LOCAL:
        if set(entry) & (_SSH_KEYS - {"connect_timeout"}):
            r.problems.append(f"{path}: localhost uses this machine's engine, not SSH; "
                              "drop user/port/identity_file/known_hosts")  # fmt: skip
        return Host(name, address or "127.0.0.1", capacity, None, docker_host, labels)
    target = _ssh_target(r, entry, path, address or name.split(":")[0], ssh_t, environ, ssh_lookup)
    return Host(name, address or target.hostname, capacity, target, docker_host, labels)


def _labels(r: _Reader, entry: Mapping[str, Any], path: str, name: str
            ) -> tuple[tuple[str, str], ...]:  # fmt: skip
    """``labels = "gpu=1,zone=a"`` or ``labels = { gpu = 1, zone = "a" }``, by the scheduler's
    own rule (``scheduler.job.parse_labels``, as the slave reads SCHEDULER_WORKER_LABELS)."""
    value = entry.get("labels")
    if value is None:
        return ()
    where = f"{path}.labels (host {name})"
    table = 'e.g. labels = { gpu = "1", zone = "a" }'
    if isinstance(value, dict):
        if any(not isinstance(v, str | int) or isinstance(v, bool) for v in value.values()):
            r.problems.append(f"{where}: expected strings or whole numbers, {table}")
            return ()
        given = {k: str(v) for k, v in value.items()}
        text = ",".join(f"{k}={v}" for k, v in given.items())
    elif isinstance(value, str):
        given, text = None, value
    else:
        r.problems.append(f'{where}: expected a table or a string like "gpu=1,zone=a", '
                          f"got {_show(value)}")  # fmt: skip
        return ()
    try:
        labels = parse_labels(text)
    except ValueError as exc:
        r.problems.append(f"{where}: {exc}")
        return ()
    if given is not None and labels != given:  # a ',' '=' or space in a key or value
        r.problems.append(f"{where}: keys and values take letters, digits and _.:/- only, "
                          f"{table}")  # fmt: skip
        return ()
    return tuple(sorted(labels.items()))


def _ssh_target(
    r: _Reader, entry: Mapping[str, Any], path: str, alias: str, ssh_t: Mapping[str, Any],
    environ: Mapping[str, str], ssh_lookup: SSHLookup,
) -> SSHTarget:  # fmt: skip
    seen = dict(ssh_lookup(alias))
    home = Path(environ.get("HOME", "/root"))

    def pick(key: str, kind: type, ssh_key: str, default: Any) -> Any:
        mine = r.get(entry, path, key, kind, None)
        if mine is not None:
            return mine
        shared = r.get(ssh_t, "ssh", key, kind, None)
        return shared if shared is not None else seen.get(ssh_key, default)

    port = pick("port", int, "port", 22)
    try:
        port = int(port)
    except ValueError:
        r.problems.append(f"{path}.port: ~/.ssh/config gives a port that is not a number: {port!r}")
        port = 22
    if not 1 <= port <= 65535:
        r.problems.append(f"{path}.port: expected 1 to 65535, got {port}")
    files = r.files(entry, path, "identity_file") or r.files(ssh_t, "ssh", "identity_file")
    identity = [_expand(f, environ, r.base_dir) for f in files or ()]
    identity = identity or [_expand(f, environ, home) for f in seen.get("identityfile", ())]
    known = pick("known_hosts", str, "userknownhostsfile", str(home / ".ssh" / "known_hosts"))
    timeout = r.number(ssh_t, "ssh", "connect_timeout", None, 0.1, 600, float)
    if timeout is None:
        timeout = float(seen.get("connecttimeout", 10))
    return SSHTarget(
        hostname=str(seen.get("hostname", alias)),
        port=port,
        user=str(
            pick("user", str, "user", environ.get("USER") or environ.get("LOGNAME") or "root")
        ),
        identity_files=tuple(str(f) for f in identity),
        known_hosts=str(_expand(str(known).split()[0], environ, home)),
        connect_timeout=timeout,
        proxy_command=seen.get("proxycommand"),
    )


def _master(r: _Reader, data: Mapping[str, Any], hosts: list[Host]) -> MasterSettings:
    table = r.table(data, "master",
                    {"host", "port", "advertise", "tunnel", "ready_timeout", "tls"})  # fmt: skip
    default = hosts[0].name if hosts else ""
    name = r.get(table, "master", "host", str, default)
    host = next((h for h in hosts if h.name == name), None)
    if host is None and hosts:
        r.problems.append(f"master.host: {name!r} is not one of the hosts "
                          f"({', '.join(h.name for h in hosts)})")  # fmt: skip
    port = r.number(table, "master", "port", DEFAULT_PORT, 1, 65535)
    advertise = r.get(table, "master", "advertise", str, None)
    if advertise is None:
        advertise = host.address if host else ""
    if (
        host is not None
        and host.local
        and any(not h.local for h in hosts)
        and advertise.startswith("127.")
    ):
        r.problems.append("master.advertise: the master runs on localhost but other hosts are "
                          "remote; set the address they can reach it at")  # fmt: skip
    return MasterSettings(
        host=name,
        port=port,
        advertise=f"{advertise}:{port}",
        tunnel=r.choice(table, "master", "tunnel", ("auto", "always", "never")),
        ready_timeout=r.number(table, "master", "ready_timeout", 60.0, 1, 3600, float),
        # the key alone is enough where nothing leaves this machine; across hosts, TLS
        tls=r.get(table, "master", "tls", bool, any(not h.local for h in hosts)),
    )


def _env(r: _Reader, data: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    table = data.get("env", {})
    if not isinstance(table, dict):
        r.problems.append(f"env: expected a table, got {_show(table)}")
        return ()
    pairs: list[tuple[str, str]] = []
    for key, value in table.items():
        if not _ENV_NAME.match(key):
            r.problems.append(f"env.{key}: not a valid variable name")
        elif key in RESERVED_ENV:
            own = "hosts[].labels" if key == LABELS_VAR else "the inventory's own keys"
            r.problems.append(f"env.{key}: set by deployctl itself; use {own}")
        elif not isinstance(value, str | int | float) or isinstance(value, bool):
            r.problems.append(f"env.{key}: expected a string or number, got {_show(value)}")
        else:
            pairs.append((key, str(value)))
    return tuple(sorted(pairs))


def _expand(value: str, environ: Mapping[str, str], base: Path) -> Path:
    if value == "~" or value.startswith("~/"):
        value = environ.get("HOME", "/root") + value[1:]
    path = Path(value)
    return path if path.is_absolute() else base / path

"""What deployctl runs, as data: container specs built by pure functions of the config.

The Docker executor turns a spec into SDK arguments; the dry-run printer shows it with the
authkey masked. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass

from .config import Config
from .keyfile import Secret

LABEL = "deployctl"
L_CLUSTER, L_ROLE, L_INDEX = f"{LABEL}.cluster", f"{LABEL}.role", f"{LABEL}.index"
L_VERSION, L_SPEC = f"{LABEL}.version", f"{LABEL}.spec"
MASTER, WORKER = "master", "worker"
STATE_DIR = "/var/lib/scheduler"
MASTER_STOP_TIMEOUT = 30
UNBUILT = "unbuilt"  # the image id of a role image not built on this machine yet
STOP_MARGIN = 15  # seconds beyond the drain grace before docker sends SIGKILL


@dataclass(frozen=True)
class ImageRef:
    """An image to run: the reference given to the engine and its content id."""

    ref: str
    id: str

    @property
    def version(self) -> str:
        return self.id.removeprefix("sha256:")[:12]


@dataclass(frozen=True)
class Images:
    master: ImageRef
    slave: ImageRef


@dataclass(frozen=True)
class ContainerSpec:
    """One container as it should exist on one host."""

    host: str
    name: str
    role: str
    index: int
    image: ImageRef
    env: tuple[tuple[str, str | Secret], ...]
    labels: tuple[tuple[str, str], ...]
    volumes: tuple[tuple[str, str], ...]  # (named volume, mount point)
    stop_timeout: int
    restart: str = "unless-stopped"
    network_mode: str = "host"

    @property
    def digest(self) -> str:
        return dict(self.labels)[L_SPEC]

    def masked_env(self) -> dict[str, str]:
        return {k: "********" if isinstance(v, Secret) else v for k, v in self.env}


def cluster_labels(cluster: str) -> dict[str, str]:
    return {L_CLUSTER: cluster}


def worker_name(cluster: str, index: int) -> str:
    return f"{cluster}-worker-{index}"


def volume_name(cluster: str) -> str:
    return f"{cluster}-state"


def master_spec(config: Config, images: Images, key: Secret) -> ContainerSpec:
    bind = "127.0.0.1" if all(h.local for h in config.hosts) else "0.0.0.0"
    env: dict[str, str | Secret] = {
        "SCHEDULER_AUTHKEY": key,
        "SCHEDULER_BIND": f"{bind}:{config.master.port}",
        "SCHEDULER_STATE_DIR": STATE_DIR,
        **dict(config.env),
    }
    return _spec(config, config.master.host, f"{config.cluster}-master", MASTER, 0,
                 images.master, env, ((volume_name(config.cluster), STATE_DIR),),
                 MASTER_STOP_TIMEOUT, key)  # fmt: skip


def worker_spec(
    config: Config, images: Images, key: Secret, host: str, index: int
) -> ContainerSpec:
    name = worker_name(config.cluster, index)
    env: dict[str, str | Secret] = {
        "SCHEDULER_AUTHKEY": key,
        "SCHEDULER_MASTER": config.master.advertise,
        "SCHEDULER_CONCURRENCY": str(config.workers.concurrency),
        "SCHEDULER_WORKER_NAME": name,
        "SCHEDULER_GRACE_SECONDS": f"{config.workers.grace_seconds:g}",
        **dict(config.env),
    }
    timeout = drain_timeout(config)
    return _spec(config, host, name, WORKER, index, images.slave, env, (), timeout, key)


def drain_timeout(config: Config) -> int:
    """Seconds the engine waits after SIGTERM before SIGKILL: the grace, and a margin."""
    return math.ceil(config.workers.grace_seconds) + STOP_MARGIN


def _spec(
    config: Config, host: str, name: str, role: str, index: int, image: ImageRef,
    env: dict[str, str | Secret], volumes: tuple[tuple[str, str], ...], timeout: int, key: Secret,
) -> ContainerSpec:  # fmt: skip
    pairs = tuple(sorted(env.items()))
    labels = {
        L_CLUSTER: config.cluster, L_ROLE: role, L_INDEX: str(index), L_VERSION: image.version,
        L_SPEC: _digest(name, image, pairs, volumes, timeout, key),
    }  # fmt: skip
    return ContainerSpec(host, name, role, index, image, pairs, tuple(sorted(labels.items())),
                         volumes, timeout)  # fmt: skip


def _digest(
    name: str, image: ImageRef, env: tuple[tuple[str, str | Secret], ...],
    volumes: tuple[tuple[str, str], ...], timeout: int, key: Secret,
) -> str:  # fmt: skip
    # A changed authkey must recreate containers, yet the label must not leak it: the
    # key enters the digest only through an HMAC of a constant, keyed by the key itself.
    sealed = hmac.new(key.reveal().encode(), b"deployctl-spec", hashlib.sha256).hexdigest()
    plain = [(k, sealed if isinstance(v, Secret) else v) for k, v in env]
    blob = json.dumps([name, image.id, plain, volumes, timeout], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def create_args(spec: ContainerSpec) -> dict[str, object]:
    """Keyword arguments for the SDK's low-level ``create_container`` (authkey still wrapped)."""
    return {
        "image": spec.image.ref,
        "name": spec.name,
        "environment": dict(spec.env),
        "labels": dict(spec.labels),
        "stop_timeout": spec.stop_timeout,
        "use_config_proxy": False,
        "host_config": {
            # an init (the engine's docker-init) as PID 1 reaps what jobs leave behind;
            # the scheduler itself would not, and zombies would pile up in a long-lived slave
            "init": True,
            "network_mode": spec.network_mode,
            "restart_policy": {"Name": spec.restart},
            "binds": {vol: {"bind": path, "mode": "rw"} for vol, path in spec.volumes},
        },
    }

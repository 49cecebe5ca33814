"""What deployctl runs, as data: container specs built by pure functions of the config.

The Docker executor turns a spec into SDK arguments; the dry-run printer shows it with the
authkey masked. Nothing here does I/O.

With TLS a container finds its certificate, key and the CA (the master also the revocation
list) as files in a named volume of its own, mounted read-only at ``TLS_DIR``; the spec
names the volume and the certificate's serial, never a key: the environment only points at
the files, and the serial in the digest makes a new certificate replace the container.
The authkey then travels the same way (``SCHEDULER_AUTHKEY_FILE``), not as a variable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass

from .config import LABELS_VAR, Config
from .keyfile import Secret

LABEL = "deployctl"
L_CLUSTER, L_ROLE, L_INDEX = f"{LABEL}.cluster", f"{LABEL}.role", f"{LABEL}.index"
L_VERSION, L_SPEC = f"{LABEL}.version", f"{LABEL}.spec"
L_TLS = f"{LABEL}.tls"  # on a TLS volume: the container whose files it holds
MASTER, WORKER = "master", "worker"
STATE_DIR = "/var/lib/scheduler"
MASTER_STOP_TIMEOUT = 30
UNBUILT = "unbuilt"  # the image id of a role image not built on this machine yet
STOP_MARGIN = 15  # seconds beyond the drain grace before docker sends SIGKILL
TLS_DIR = "/etc/scheduler/tls"  # where a container finds its TLS files (read-only)
TLS_ENV = ("SCHEDULER_TLS_CA", "SCHEDULER_TLS_CERT", "SCHEDULER_TLS_KEY", "SCHEDULER_TLS_CRL")
CA_FILE, CRL_FILE = "ca.pem", "crl.pem"  # the names `scheduler certs` gives them too
AUTHKEY_FILE = "authkey"  # with TLS the authkey is a file there too, not a variable


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
class TLSMount:
    """A container's TLS files: its volume and the certificate they hold (by serial)."""

    volume: str  # a named volume on the container's host, filled before the container starts
    name: str  # the certificate's name (= the container's, = SCHEDULER_WORKER_NAME)
    serial: str  # hex; a re-issued certificate has another, so the container is replaced
    crl: bool = False  # the master also gets the revocation list (updated in place)

    @property
    def files(self) -> tuple[str, ...]:
        """The file names in the volume: the CA, the certificate, its key (and the CRL)."""
        return (CA_FILE, f"{self.name}.pem", f"{self.name}.key") + ((CRL_FILE,) if self.crl
                                                                   else ())  # fmt: skip

    def env(self) -> dict[str, str]:
        """Paths inside the container: ``SCHEDULER_TLS_*`` point at the mounted files, and
        ``SCHEDULER_AUTHKEY_FILE`` at the authkey beside them."""
        paths = [f"{TLS_DIR}/{f}" for f in self.files]
        return {**dict(zip(TLS_ENV, paths, strict=False)),
                "SCHEDULER_AUTHKEY_FILE": f"{TLS_DIR}/{AUTHKEY_FILE}"}  # fmt: skip


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
    tls: TLSMount | None = None

    @property
    def digest(self) -> str:
        return dict(self.labels)[L_SPEC]

    def masked_env(self) -> dict[str, str]:
        return {k: "********" if isinstance(v, Secret) else v for k, v in self.env}


def cluster_labels(cluster: str) -> dict[str, str]:
    return {L_CLUSTER: cluster}


def master_name(cluster: str) -> str:
    return f"{cluster}-master"


def worker_name(cluster: str, index: int) -> str:
    return f"{cluster}-worker-{index}"


def client_name(cluster: str) -> str:
    """The certificate deployctl itself shows the master (role client)."""
    return f"{cluster}-deployctl"


def tls_volume(container: str) -> str:
    """The named volume that holds a container's TLS files."""
    return f"{container}-tls"


def volume_name(cluster: str) -> str:
    return f"{cluster}-state"


def master_spec(
    config: Config, images: Images, key: Secret, tls: TLSMount | None = None
) -> ContainerSpec:
    bind = "127.0.0.1" if all(h.local for h in config.hosts) else "0.0.0.0"
    env: dict[str, str | Secret] = {
        **({} if tls else {"SCHEDULER_AUTHKEY": key}),
        "SCHEDULER_BIND": f"{bind}:{config.master.port}",
        "SCHEDULER_STATE_DIR": STATE_DIR,
        **dict(config.env),
        **(tls.env() if tls else {}),
    }
    return _spec(config, config.master.host, master_name(config.cluster), MASTER, 0,
                 images.master, env, ((volume_name(config.cluster), STATE_DIR),),
                 MASTER_STOP_TIMEOUT, key, tls)  # fmt: skip


def worker_spec(
    config: Config, images: Images, key: Secret, host: str, index: int,
    tls: TLSMount | None = None,
) -> ContainerSpec:  # fmt: skip
    name = worker_name(config.cluster, index)
    # only where the host has labels: an unlabelled host's workers keep the digest they had
    labels = config.host(host).labels_text
    env: dict[str, str | Secret] = {
        **({} if tls else {"SCHEDULER_AUTHKEY": key}),
        "SCHEDULER_MASTER": config.master.advertise,
        "SCHEDULER_CONCURRENCY": str(config.workers.concurrency),
        "SCHEDULER_WORKER_NAME": name,
        "SCHEDULER_GRACE_SECONDS": f"{config.workers.grace_seconds:g}",
        **({LABELS_VAR: labels} if labels else {}),
        **dict(config.env),
        **(tls.env() if tls else {}),
    }
    timeout = drain_timeout(config)
    return _spec(config, host, name, WORKER, index, images.slave, env, (), timeout, key, tls)


def drain_timeout(config: Config) -> int:
    """Seconds the engine waits after SIGTERM before SIGKILL: the grace, and a margin."""
    return math.ceil(config.workers.grace_seconds) + STOP_MARGIN


def _spec(
    config: Config, host: str, name: str, role: str, index: int, image: ImageRef,
    env: dict[str, str | Secret], volumes: tuple[tuple[str, str], ...], timeout: int, key: Secret,
    tls: TLSMount | None = None,
) -> ContainerSpec:  # fmt: skip
    pairs = tuple(sorted(env.items()))
    labels = {
        L_CLUSTER: config.cluster, L_ROLE: role, L_INDEX: str(index), L_VERSION: image.version,
        L_SPEC: _digest(name, image, pairs, volumes, timeout, key, tls),
    }  # fmt: skip
    return ContainerSpec(host, name, role, index, image, pairs, tuple(sorted(labels.items())),
                         volumes, timeout, tls=tls)  # fmt: skip


def _digest(
    name: str, image: ImageRef, env: tuple[tuple[str, str | Secret], ...],
    volumes: tuple[tuple[str, str], ...], timeout: int, key: Secret, tls: TLSMount | None,
) -> str:  # fmt: skip
    # A changed authkey must recreate containers, yet the label must not leak it: the
    # key enters the digest only through an HMAC of a constant, keyed by the key itself.
    sealed = hmac.new(key.reveal().encode(), b"deployctl-spec", hashlib.sha256).hexdigest()
    plain = [(k, sealed if isinstance(v, Secret) else v) for k, v in env]
    parts: list[object] = [name, image.id, plain, volumes, timeout]
    if tls is not None:  # a certificate's serial is public; a new one replaces the container
        parts.append([tls.volume, tls.name, tls.serial, tls.crl, sealed])
    blob = json.dumps(parts, sort_keys=True)
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
            "binds": {vol: {"bind": path, "mode": "rw"} for vol, path in spec.volumes}
            | ({spec.tls.volume: {"bind": TLS_DIR, "mode": "ro"}} if spec.tls else {}),
        },
    }

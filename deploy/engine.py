"""Everything that talks to the Docker SDK: one client per host; containers, images, logs,
builds, save and load.

Docker, requests and socket errors become HostError here and nowhere else. A remote engine is
reached through a local unix socket that the caller provides (``Dial``; the SSH adapter's
forwarder in practice), so this module knows nothing of SSH.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, Protocol

import docker
import docker.errors
import requests
import urllib3.exceptions
from docker.transport import UnixHTTPAdapter

from .config import Host
from .errors import DeployError, HostError
from .imagekit import ImageError, follow_build
from .keyfile import Secret
from .observed import ContainerRow, Holdings, Observed, stamp_seconds
from .specs import (
    L_CLUSTER,
    L_INDEX,
    L_ROLE,
    L_SPEC,
    L_TLS,
    L_VERSION,
    ContainerSpec,
    create_args,
)  # fmt: skip

log = logging.getLogger(__name__)
API_TIMEOUT = 120
CHUNK = 2**20
POOL_SIZE = 32  # idle engine connections kept per host (log streams each hold one)
# This machine's engine (DOCKER_HOST or the default socket): where images are built.
LOCAL_HOST = Host("this machine", "127.0.0.1", 0, None, None)


class Link(Protocol):
    """A forwarded socket to a remote engine; ``last_error`` says why a connection broke."""

    last_error: str


# Given a remote host, a local unix socket path reaching its engine (logged in already).
Dial = Callable[[Host], tuple[str, Link]]


class Engines:
    """A Docker client per host, opened on first use: the local socket, or SSH-forwarded."""

    def __init__(self, dial: Dial | None = None) -> None:
        self.dial = dial
        self._clients: dict[str, docker.DockerClient] = {}
        self._forwarders: dict[str, Link] = {}
        self._lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self._closed = False

    def client(self, host: Host) -> docker.DockerClient:
        with self._lock:
            self._check_open(host)
            lock = self._host_locks.setdefault(host.name, threading.Lock())
        with lock:
            client = self._clients.get(host.name)
            if client is None:
                client = self._open(host)
                with self._lock:
                    if self._closed:
                        client.close()
                    self._check_open(host)
                    self._clients[host.name] = client
            return client

    def _check_open(self, host: Host) -> None:
        if self._closed:
            raise HostError(host.name, _where(host), "connections closed")

    def _open(self, host: Host) -> docker.DockerClient:
        with self.guard(host, "connect to the Docker engine"):
            if not host.local:
                if self.dial is None:
                    raise HostError(host.name, _where(host), "no way to reach a remote engine")
                path, self._forwarders[host.name] = self.dial(host)
                return _ForwardedClient(path, API_TIMEOUT)
            if host.docker_host:
                client = docker.DockerClient(base_url=host.docker_host, timeout=API_TIMEOUT)
            else:
                client = docker.from_env(timeout=API_TIMEOUT)
            client.ping()
        return client

    @contextlib.contextmanager
    def guard(self, host: Host, doing: str) -> Iterator[None]:
        """Translate SDK, HTTP and socket errors raised while ``doing`` into HostError."""
        try:
            yield
        except DeployError:
            raise
        except docker.errors.APIError as exc:
            detail = exc.explanation or str(exc)
            raise HostError(host.name, _where(host), f"cannot {doing}: {detail}",
                            "see the engine's message above") from exc  # fmt: skip
        except (docker.errors.DockerException, requests.RequestException, OSError,
                urllib3.exceptions.HTTPError) as exc:  # fmt: skip
            # urllib3's errors come straight through when a log stream breaks off mid-read
            far = self._forwarders.get(host.name)
            why = far.last_error if far and far.last_error else _reason(exc)
            hint = ("is dockerd running there, and is the docker CLI installed for "
                    "'docker system dial-stdio'? check hosts[].docker_host") if not host.local \
                else "is dockerd running? check DOCKER_HOST or hosts[].docker_host"  # fmt: skip
            raise HostError(host.name, _where(host), f"cannot {doing}: {why}", hint) from exc

    def close(self) -> None:
        """Close every client; threads still using them get HostError from now on."""
        with self._lock:
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()


class _OnePool(UnixHTTPAdapter):
    """One pool of connections per engine, where docker-py keeps one per request URL.

    docker-py keys its unix-socket pools by the whole URL, query included, so each new path
    opens a new connection. Locally that is free; through the SSH forwarder every connection
    is a new channel running ``docker system dial-stdio`` on the host (0.2-0.4 s), which made
    each distinct API call of ``up`` pay for one.
    """

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        return super().get_connection("engine", proxies)


class _ForwardedAPI(docker.APIClient):
    """The low-level client of an engine behind the SSH forwarder's socket at ``path``."""

    def __init__(self, path: str, timeout: int) -> None:
        # A version given up front skips the SDK's negotiation, which would go through the
        # adapter replaced below; it is negotiated on ours instead, and that one request also
        # tells that the engine answers.
        super().__init__(base_url=f"unix://{path}", timeout=timeout,
                         version=docker.constants.MINIMUM_DOCKER_API_VERSION)  # fmt: skip
        self._custom_adapter = _OnePool(f"http+unix://{path}", timeout, max_pool_size=POOL_SIZE)
        self.mount("http+docker://", self._custom_adapter)
        self._version = self._retrieve_server_version()


class _ForwardedClient(docker.DockerClient):
    def __init__(self, path: str, timeout: int) -> None:
        # DockerClient.__init__ only makes its APIClient; this one is ours
        self.api = _ForwardedAPI(path, timeout)


def _where(host: Host) -> str:
    return host.ssh.address if host.ssh else (host.docker_host or "local engine")


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


def observe(engines: Engines, host: Host, cluster: str) -> list[Observed]:
    """Containers of ``cluster`` on ``host``, read back by label (one request, no inspects)."""
    client = engines.client(host)
    query = {"all": True, "filters": {"label": f"{L_CLUSTER}={cluster}"}}
    try:  # a read: once more on a fresh connection if this one broke or stalled
        found = client.api.containers(**query)
    except (requests.RequestException, OSError, urllib3.exceptions.HTTPError) as exc:
        log.warning("%s: listing containers failed (%s); trying once more", host.name,
                    _reason(exc))  # fmt: skip
        with engines.guard(host, "list containers"):
            found = client.api.containers(**query)
    return [_observed(host.name, c) for c in found]


def _observed(host: str, found: Mapping[str, Any]) -> Observed:
    labels = found.get("Labels") or {}
    index = labels.get(L_INDEX, "")
    return Observed(
        host=host, id=found["Id"], name=found["Names"][0].lstrip("/"),
        role=labels.get(L_ROLE, "?"), index=int(index) if index.isdigit() else -1,
        version=labels.get(L_VERSION, ""), digest=labels.get(L_SPEC, ""),
        state=found.get("State", "?"), image_id=found.get("ImageID", ""),
        image=found.get("Image", ""),
    )  # fmt: skip


def create(engines: Engines, host: Host, spec: ContainerSpec) -> str:
    """Create and start ``spec``'s container (its named volumes labelled first); return its id."""
    client = engines.client(host)
    args = create_args(spec)
    host_config = args.pop("host_config")
    env = {k: v.reveal() if isinstance(v, Secret) else v for k, v in spec.env}
    with engines.guard(host, f"create container {spec.name}"):
        for volume, _ in spec.volumes:
            _ensure_volume(client, volume, {L_CLUSTER: dict(spec.labels)[L_CLUSTER]})
        args["host_config"] = client.api.create_host_config(**host_config)  # type: ignore[arg-type]
        args["environment"] = env
        try:
            cid = client.api.create_container(**args)["Id"]
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            _clear_name(host, client, spec)
            cid = client.api.create_container(**args)["Id"]
        client.api.start(cid)
    return str(cid)


def _clear_name(host: Host, client: docker.DockerClient, spec: ContainerSpec) -> None:
    """The name is taken: remove the container only if it is this cluster's (a half-made one
    of an interrupted run); anything else is not ours to remove."""
    cluster = dict(spec.labels)[L_CLUSTER]
    try:
        there = client.api.inspect_container(spec.name)
    except docker.errors.NotFound:
        return  # gone meanwhile
    labels = there["Config"].get("Labels") or {}
    if labels.get(L_CLUSTER) != cluster:
        owner = f"cluster {labels[L_CLUSTER]!r}" if L_CLUSTER in labels else "not deployctl"
        raise HostError(
            host.name, _where(host),
            f"container name {spec.name} is taken by a container that is not this cluster's "
            f"({owner}, id {there['Id'][:12]}, image {there['Config'].get('Image', '?')})",
            f"remove or rename it yourself if it is not needed ('docker rm -f {spec.name}' on "
            f"{host.name}), or choose another cluster.name",
        )  # fmt: skip
    client.api.remove_container(there["Id"], force=True)


def _ensure_volume(client: docker.DockerClient, name: str, labels: dict[str, str]) -> None:
    try:
        client.volumes.get(name)
    except docker.errors.NotFound:
        client.volumes.create(name=name, labels=labels)


STAGE_ROLE = "tls-stage"  # a helper that is never started; a leftover is removed by `up`
STAGE_DIR = "/stage"


def stage(engines: Engines, host: Host, image: str, volume: str, labels: Mapping[str, str],
          archive: bytes) -> None:  # fmt: skip
    """Unpack ``archive`` (TLS files, owners and modes in its headers) into the named volume.

    Through a helper container that mounts the volume read-write and is never started: the
    engine writes the files as root with the archive's owners, through the same connection
    as every other call (over SSH for a remote host), and nothing of them reaches a
    container's configuration. The containers themselves mount the volume read-only.
    """
    client = engines.client(host)
    name = f"{volume}-stage"
    cluster = labels[L_CLUSTER]
    with engines.guard(host, f"write the TLS files of {volume}"):
        _ensure_volume(client, volume, dict(labels))
        with contextlib.suppress(docker.errors.NotFound):
            there = client.api.inspect_container(name)  # an interrupted run's helper
            if (there["Config"].get("Labels") or {}).get(L_CLUSTER) != cluster:
                raise HostError(host.name, _where(host), f"container name {name} is taken by "
                                "a container that is not this cluster's",
                                f"remove it yourself if it is not needed ('docker rm -f "
                                f"{name}' on {host.name})")  # fmt: skip
            client.api.remove_container(there["Id"], force=True)
        config = client.api.create_host_config(
            binds={volume: {"bind": STAGE_DIR, "mode": "rw"}}, network_mode="none")
        cid = client.api.create_container(
            image=image, name=name, command=["true"], network_disabled=True,
            labels={L_CLUSTER: cluster, L_ROLE: STAGE_ROLE}, host_config=config,
        )["Id"]  # fmt: skip
        try:
            if not client.api.put_archive(cid, STAGE_DIR, archive):
                raise HostError(host.name, _where(host), f"the engine did not write the TLS "
                                f"files of {volume}", "see the engine's log")  # fmt: skip
        finally:
            client.api.remove_container(cid, force=True)


def tls_volumes(engines: Engines, host: Host, cluster: str) -> list[str]:
    """The cluster's TLS volumes on the host (each a container's certificate and key)."""
    with engines.guard(host, "list volumes"):
        found = engines.client(host).api.volumes(filters={"label": f"{L_CLUSTER}={cluster}"})
    return sorted(v["Name"] for v in found.get("Volumes") or ()
                  if L_TLS in (v.get("Labels") or {}))  # fmt: skip


def start(engines: Engines, host: Host, container: Observed) -> None:
    with engines.guard(host, f"start container {container.name}"):
        engines.client(host).api.start(container.id)


def kill(engines: Engines, host: Host, container: Observed) -> None:
    """SIGKILL the container, as a machine dying would. The engine counts a kill as a manual
    stop: the restart policy does not bring it back."""
    with engines.guard(host, f"kill container {container.name}"):
        engines.client(host).api.kill(container.id)


def remove(engines: Engines, host: Host, container: Observed, timeout: int) -> None:
    """SIGTERM, wait up to ``timeout`` s (a worker drains meanwhile), then remove."""
    api = engines.client(host).api
    with engines.guard(host, f"remove container {container.name}"):
        try:
            api.stop(container.id, timeout=timeout)
            api.remove_container(container.id, force=True)
        except docker.errors.NotFound:
            pass


def remove_volume(engines: Engines, host: Host, name: str) -> bool:
    with engines.guard(host, f"remove volume {name}"):
        try:
            engines.client(host).volumes.get(name).remove()
            return True
        except docker.errors.NotFound:
            return False


def image_id(engines: Engines, host: Host, ref: str) -> str | None:
    with engines.guard(host, f"inspect image {ref}"):
        try:
            return str(engines.client(host).images.get(ref).id)
        except docker.errors.ImageNotFound:
            return None


def tag(engines: Engines, host: Host, image: str, ref: str) -> None:
    """Name the image ``image`` (an id) ``ref`` on the host."""
    repo, _, version = ref.rpartition(":")
    with engines.guard(host, f"tag {ref}"):
        engines.client(host).api.tag(image, repo, version)


def save(engines: Engines, host: Host, refs: list[str], out: IO[bytes]) -> int:
    """``docker save REFS`` into ``out`` (shared layers once); return the byte count."""
    api = engines.client(host).api
    url = f"{api.base_url}/v{api.api_version}/images/get"
    total = 0
    with engines.guard(host, f"save images {' '.join(refs)}"):
        with api.get(url, params={"names": refs}, stream=True, timeout=API_TIMEOUT) as resp:
            resp.raise_for_status()
            for chunk in resp.iter_content(CHUNK):
                out.write(chunk)
                total += len(chunk)
    return total


def load(engines: Engines, host: Host, chunks: Iterable[bytes]) -> None:
    """``docker load`` from ``chunks`` (a tar archive, gzipped or not), streamed."""
    with engines.guard(host, "load images"):
        engines.client(host).images.load(chunks)


def push(engines: Engines, host: Host, ref: str, target: str) -> None:
    repo, _, version = target.rpartition(":")
    client = engines.client(host)
    with engines.guard(host, f"push {target}"):
        client.images.get(ref).tag(repo, version)
        for chunk in client.api.push(repo, version, stream=True, decode=True):
            if "error" in chunk:
                raise HostError(host.name, _where(host), f"cannot push {target}: {chunk['error']}",
                                "check images.registry and 'docker login'")  # fmt: skip


def pull(engines: Engines, host: Host, target: str, ref: str) -> None:
    """Pull ``target`` from the registry and tag it ``ref`` (the name the containers use)."""
    repo, _, version = target.rpartition(":")
    client = engines.client(host)
    with engines.guard(host, f"pull {target}"):
        image = client.images.pull(repo, tag=version)
        name, _, tag_ = ref.rpartition(":")
        image.tag(name, tag_)


def rows(engines: Engines, host: Host, cluster: str) -> list[ContainerRow]:
    client = engines.client(host)
    with engines.guard(host, "list containers"):
        found = client.api.containers(all=True, filters={"label": f"{L_CLUSTER}={cluster}"})
        details = [client.api.inspect_container(c["Id"]) for c in found]
    return [_row(host.name, d) for d in details]


def _row(host: str, info: dict[str, Any]) -> ContainerRow:
    labels = info["Config"].get("Labels") or {}
    state = info["State"]
    index = labels.get(L_INDEX, "")
    return ContainerRow(
        host=host, name=info["Name"].lstrip("/"), role=labels.get(L_ROLE, "?"),
        index=int(index) if index.isdigit() else -1, state=state.get("Status", "?"),
        health=(state.get("Health") or {}).get("Status", "-"),
        started_at=state.get("StartedAt", ""), image=info["Config"].get("Image", ""),
        version=labels.get(L_VERSION, ""),
    )  # fmt: skip


def logs(
    engines: Engines, host: Host, container: str, follow: bool, tail: int | None, since: str | None
) -> Iterator[tuple[str, str]]:
    """(timestamp, line) of a container's output (stdout and stderr), following when asked.

    The request is made here, so an unreachable host or a missing container raises at once;
    the lines come as they are read.
    """
    kwargs: dict[str, Any] = {"stream": True, "follow": follow, "timestamps": True,
                              "tail": "all" if tail is None else tail}  # fmt: skip
    if since:
        kwargs["since"] = _since(since)
    with engines.guard(host, f"read logs of {container}"):
        try:
            stream = engines.client(host).api.logs(container, **kwargs)
        except docker.errors.NotFound:
            return iter(())  # removed meanwhile: nothing (more) to read
    return _lines(engines, host, container, stream)


def _lines(
    engines: Engines, host: Host, container: str, stream: Iterator[bytes]
) -> Iterator[tuple[str, str]]:
    with engines.guard(host, f"read logs of {container}"):
        pending = b""
        for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield _stamped(line)
        if pending:
            yield _stamped(pending)


def state(engines: Engines, host: Host, container: str) -> str | None:
    """The container's state (running, exited, ...), or None when it no longer exists."""
    with engines.guard(host, f"inspect container {container}"):
        try:
            return str(engines.client(host).api.inspect_container(container)["State"]["Status"])
        except docker.errors.NotFound:
            return None


def _stamped(line: bytes) -> tuple[str, str]:
    stamp, _, text = line.decode(errors="replace").partition(" ")
    return stamp, text


def _since(text: str) -> Any:
    """``10m``, ``2h``, ``30s`` ago; a unix time; or an RFC 3339 time as the engine prints it."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1] in units:
        now = datetime.datetime.now(datetime.UTC)
        return now - datetime.timedelta(seconds=int(text[:-1]) * units[text[-1]])
    with contextlib.suppress(ValueError):
        return float(text)
    with contextlib.suppress(ValueError):
        return stamp_seconds(text)
    raise DeployError("--since", f"cannot read {text!r}", "use e.g. 30s, 10m, 2h or a unix time")


# ---- images -----------------------------------------------------------------------------------


def holdings(engines: Engines, host: Host) -> Holdings:
    """The host's images: every reference with its id, and every image's layer chain."""
    api = engines.client(host).api
    with engines.guard(host, "list images"):
        found = api.images()
        chains = {tuple(api.inspect_image(i["Id"])["RootFS"].get("Layers") or ())
                  for i in found}  # fmt: skip
    ids = {ref: i["Id"] for i in found for ref in i.get("RepoTags") or () if ref != "<none>:<none>"}
    return Holdings(ids, tuple(sorted(chains)))


def chain(engines: Engines, host: Host, ref: str) -> tuple[str, ...]:
    """The image's layers (diff ids), bottom first; empty when the image is absent."""
    with engines.guard(host, f"inspect image {ref}"):
        try:
            info = engines.client(host).api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            return ()
    return tuple(info["RootFS"].get("Layers") or ())


def image_info(engines: Engines, host: Host, ref: str) -> tuple[str, tuple[str, ...], int] | None:
    """(id, references, size) of an image, or None when the host lacks it."""
    with engines.guard(host, f"inspect image {ref}"):
        try:
            info = engines.client(host).api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            return None
    return str(info["Id"]), tuple(info.get("RepoTags") or ()), int(info.get("Size", 0))


def pull_quietly(engines: Engines, host: Host, ref: str) -> str | None:
    """Pull ``ref``; the engine's reason when it cannot (no registry, unknown image)."""
    repo, _, version = ref.rpartition(":")
    with engines.guard(host, f"pull {ref}"):
        try:
            engines.client(host).images.pull(repo or ref, tag=version or "latest")
            return None
        except docker.errors.APIError as exc:
            return str(exc.explanation or exc)


def build(engines: Engines, host: Host, context: bytes, repository: str,
          buildargs: Mapping[str, str], labels: Mapping[str, str], out: IO[str],
          no_cache: bool = False) -> str:  # fmt: skip
    """Build an image from a context archive, with no network inside; return its id."""
    api = engines.client(host).api
    with engines.guard(host, f"build {repository}"):
        try:
            chunks = api.build(
                fileobj=io.BytesIO(context), custom_context=True, buildargs=dict(buildargs),
                labels=dict(labels), decode=True, rm=True, forcerm=True, nocache=no_cache,
                network_mode="none", pull=False)  # fmt: skip
            return follow_build(chunks, repository, out)
        except docker.errors.APIError as exc:
            raise ImageError(f"image {repository}", f"build refused ({exc.explanation})",
                             "check the engine's log") from exc  # fmt: skip


def untag(engines: Engines, host: Host, repository: str, keep: str, prefix: str) -> None:
    """Drop ``repository``'s tags starting with ``prefix`` except ``keep``; an image that a
    container still uses stays."""
    client = engines.client(host)
    with engines.guard(host, f"untag older {repository}"):
        for image in client.images.list(name=repository):
            for ref in image.tags:
                if ref.startswith(f"{repository}:{prefix}") and ref != keep:
                    with contextlib.suppress(docker.errors.APIError):
                        client.images.remove(ref)


def import_image(engines: Engines, host: Host, stream: IO[bytes], ref: str,
                 changes: Iterable[str]) -> str | None:  # fmt: skip
    """``docker import`` a root file system archive as ``ref``; return the new image's id."""
    repository, _, version = ref.partition(":")
    with engines.guard(host, f"import {ref}"):
        engines.client(host).api.import_image_from_stream(
            stream, repository=repository, tag=version or "latest", changes=list(changes))
    found = image_info(engines, host, ref)
    return found[0] if found else None

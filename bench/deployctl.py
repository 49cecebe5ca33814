"""deployctl timings on the 3-host test bed, with deployctl installed from the kit's wheel in a
fresh virtualenv, as users install it. Prints a table; needs a checkout (uses tests.testbed).

    python -m bench.deployctl         (`make bench` runs it after bench.run)

Rows: up on 3 empty hosts from the wheel install; ship, and up, after a one-line change to the
scheduler (megabytes sent per host: only the layers a host lacks); ship to 3 empty hosts; up of
master + 5 workers with the images present; up again with nothing to do; scale 5 -> 10; down.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import docker.errors

CLUSTER = "bench"
PORT = 18891
# Images of their own name, so the bench's builds leave the checkout's images alone.
INVENTORY = f"""[images]
master = "{CLUSTER}-master"
slave = "{CLUSTER}-slave"
[cluster]
name = "{CLUSTER}"
[master]
port = {PORT}
[workers]
count = 5
grace_seconds = 5
[[hosts]]
name = "tb1"
[[hosts]]
name = "tb2"
[[hosts]]
name = "tb3"
"""
Row = tuple[str, float, str, str]  # what, seconds, MB per host, command


class Deployctl:
    """The wheel-installed deployctl, run in ``workdir`` with HOME at the bed's client home."""

    def __init__(self, path: Path, home: Path, workdir: Path) -> None:
        self.path, self.home, self.workdir = path, home, workdir

    def __call__(self, *args: str) -> tuple[float, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SCHEDULER_", "DEPLOYCTL_"))}  # fmt: skip
        env["HOME"] = str(self.home)
        started = time.monotonic()
        proc = subprocess.run([str(self.path), *args], cwd=self.workdir, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        took = time.monotonic() - started
        if proc.returncode:
            raise SystemExit(f"deployctl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return took, proc.stderr


def _per_host(stderr: str) -> str:
    """The most any host was sent, from the 'images loaded in ... (N MB sent)' lines."""
    sent = [float(m) for m in re.findall(r"\(([\d.]+) MB sent\)", stderr)]
    return f"{max(sent):.1f}" if sent else "0"


def _empty_engines(urls: list[str]) -> None:
    """Remove our cluster and our images from the host engines, so shipping starts from zero."""
    for url in urls:
        client = docker.DockerClient(base_url=url, timeout=120)
        try:
            for c in client.containers.list(
                all=True, filters={"label": f"deployctl.cluster={CLUSTER}"}
            ):
                c.remove(force=True)
            _drop_images(client, (f"{CLUSTER}-master:", f"{CLUSTER}-slave:", "scheduler-base:"))
        finally:
            client.close()


def _drop_images(client: docker.DockerClient, prefixes: tuple[str, ...]) -> None:
    """Remove the images with a tag starting with one of ``prefixes``."""
    for image in client.images.list():
        if any(t.startswith(prefixes) for t in image.tags):
            try:
                client.images.remove(image.id, force=True)
            except docker.errors.APIError:
                pass  # in use by a container of someone else's: it stays


def _remove_local_images(repositories: tuple[str, ...]) -> None:
    """The bench's own images on this machine's engine (the checkout's stay)."""
    client = docker.from_env(timeout=120)
    try:
        _drop_images(client, tuple(f"{r}:" for r in repositories))
    finally:
        client.close()


def measure(run: Deployctl, venv: object, urls: list[str]) -> list[Row]:
    from tests.testbed import wheelenv

    rows: list[Row] = []
    _empty_engines(urls)
    took, err = run("up")
    rows.append(("up on 3 empty hosts, from a wheel install", took, _per_host(err),
                 "deployctl up (build, ship, master + 5 workers)"))  # fmt: skip
    wheelenv.one_line_change(venv, f"bench change {time.time_ns()}")  # type: ignore[arg-type]
    took, err = run("ship")
    rows.append(("ship after a one-line change (3 hosts)", took, _per_host(err),
                 "deployctl ship (build included)"))  # fmt: skip
    wheelenv.one_line_change(venv, f"bench change {time.time_ns()}")  # type: ignore[arg-type]
    took, err = run("up")
    rows.append(("up after a one-line change (3 hosts)", took, _per_host(err),
                 "deployctl up (build, ship, replace 6 containers)"))  # fmt: skip
    run("down", "--volumes")
    _empty_engines(urls)
    took, err = run("ship")
    rows.append(("ship images to 3 empty hosts", took, _per_host(err), "deployctl ship"))
    took, _ = run("up", "--no-build")
    rows.append(("up: master + 5 workers, images present", took, "-",
                 "deployctl up --no-build (goal < 15 s)"))  # fmt: skip
    took, _ = run("up", "--no-build")
    rows.append(("up again, nothing to do", took, "-", "deployctl up --no-build"))
    took, _ = run("scale", "workers", "10")
    rows.append(("scale workers 5 -> 10", took, "-", "deployctl scale workers 10"))
    took, _ = run("down", "--volumes")
    rows.append(("down (10 workers drain, master)", took, "-", "deployctl down --volumes"))
    return rows


def main() -> int:
    from tests.testbed import bed, wheelenv  # the test bed of a checkout (namespaces, sshd)

    testbed = bed.up(3)
    try:
        with tempfile.TemporaryDirectory(prefix="deployctl-bench-") as tmp:
            work = Path(tmp)
            venv = wheelenv.install(wheelenv.build_wheel(work / "wheel"), work / "venv")
            (work / "cluster").mkdir()
            (work / "cluster" / "cluster.toml").write_text(INVENTORY)
            run = Deployctl(venv.bin / "deployctl", testbed.hosts[0].home, work / "cluster")
            rows = measure(run, venv, [h.docker_url for h in testbed.hosts])
    finally:
        if testbed.started:
            bed.down()
        _remove_local_images((f"{CLUSTER}-master", f"{CLUSTER}-slave"))
    width = max(len(r[0]) for r in rows)
    print(f"{'deployctl on the 3-host test bed'.ljust(width)}  seconds  MB/host  command")
    for what, seconds, per_host, command in rows:
        print(f"{what.ljust(width)}  {seconds:7.1f}  {per_host:>7}  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

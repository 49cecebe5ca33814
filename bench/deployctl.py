"""deployctl timings on the 3-host test bed: ship to empty hosts, up of master + 5 workers
with images present, scale 5 -> 10. Prints a table; needs a checkout (uses tests.testbed).

    python -m bench.deployctl         (`make bench` runs it after bench.run)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import docker.errors

CLUSTER = "bench"
PORT = 18891
DEPLOYCTL = Path(sys.executable).with_name("deployctl")
INVENTORY = f"""[cluster]
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


def _deployctl(home: Path, workdir: Path, *args: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDULER_", "DEPLOYCTL_"))}
    env["HOME"] = str(home)
    started = time.monotonic()
    proc = subprocess.run([str(DEPLOYCTL), *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    took = time.monotonic() - started
    if proc.returncode:
        raise SystemExit(f"deployctl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return took


def _empty_engines(urls: list[str]) -> None:
    """Remove our cluster and our images from the host engines, so shipping starts from zero."""
    for url in urls:
        client = docker.DockerClient(base_url=url, timeout=120)
        try:
            for c in client.containers.list(
                all=True, filters={"label": f"deployctl.cluster={CLUSTER}"}
            ):
                c.remove(force=True)
            for image in client.images.list():
                if any(t.startswith(("scheduler-master:", "scheduler-slave:")) for t in image.tags):
                    try:
                        client.images.remove(image.id, force=True)
                    except docker.errors.APIError:
                        pass
        finally:
            client.close()


def main() -> int:
    from tests.testbed import bed  # the test bed of a checkout (network namespaces, sshd)

    testbed = bed.up(3)
    home = testbed.hosts[0].home
    rows: list[tuple[str, float, str]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="deployctl-bench-") as tmp:
            work = Path(tmp)
            (work / "cluster.toml").write_text(INVENTORY)
            _deployctl(home, work, "build")
            _empty_engines([h.docker_url for h in testbed.hosts])
            rows.append(("ship images to 3 empty hosts", _deployctl(home, work, "ship"),
                         "deployctl ship"))  # fmt: skip
            # --no-build: the lead edits scheduler/ while this runs; a rebuild would be timed too
            up = _deployctl(home, work, "up", "--no-build")
            rows.append(("up: master + 5 workers, images present", up,
                         "deployctl up --no-build (goal < 15 s)"))  # fmt: skip
            again = _deployctl(home, work, "up", "--no-build")
            rows.append(("up again, nothing to do", again, "deployctl up --no-build"))
            rows.append(("scale workers 5 -> 10", _deployctl(home, work, "scale", "workers", "10"),
                         "deployctl scale workers 10"))  # fmt: skip
            down = _deployctl(home, work, "down", "--volumes")
            rows.append(("down (10 workers drain, master)", down, "deployctl down --volumes"))
    finally:
        if testbed.started:
            bed.down()
    width = max(len(r[0]) for r in rows)
    print(f"{'deployctl on the 3-host test bed'.ljust(width)}  seconds  command")
    for what, seconds, command in rows:
        print(f"{what.ljust(width)}  {seconds:7.1f}  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

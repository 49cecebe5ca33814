"""``deployctl verify``: the scheduler's chaos run (``scheduler.verify``) on a deployed cluster.

Observe (the cluster's running containers), then run the marked batch through the master link:
a worker container that runs some of it is killed with the engine (SIGKILL, as a machine dying
would) and, when asked, so is the master's container, which is started again at once (it comes
back on its journal). The report accounts for every job; then the killed worker is started
again, so the cluster is left as it was found. (The engine counts a kill as a manual stop:
the restart policy does not bring the container back by itself.)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from . import engine
from .cluster import observe
from .context import Context
from .errors import DeployError
from .observed import Observed
from .specs import MASTER, WORKER


def verify(ctx: Context, restart_master: bool, jobs: int | None,
           seconds: float | None) -> dict[str, Any]:  # fmt: skip
    """Run the chaos batch; return the report as data (``ok`` says whether all is well)."""
    seen = observe(ctx).containers
    workers = {o.name: o for o in seen if o.role == WORKER and o.running}
    master = next((o for o in seen if o.role == MASTER and o.running), None)
    if master is None:
        raise DeployError("verify", "no running master", "run 'deployctl up' first")

    killed: list[Observed] = []

    def kill_slave(worker: dict[str, Any]) -> None:
        found = workers.get(str(worker["name"]))
        if found is None:
            raise DeployError("verify", f"worker {worker['name']} is not a container of this "
                              "cluster", "run verify on a cluster deployctl made")  # fmt: skip
        _kill(ctx, found)
        killed.append(found)

    def crash_master() -> None:
        assert master is not None
        _kill(ctx, master)
        _start(ctx, master)

    try:
        report = ctx.master.verify(ctx.key(create=False), kill_slave,
                                   crash_master if restart_master else None, jobs, seconds,
                                   ctx.echo)  # fmt: skip
    finally:
        for container in killed:
            _start(ctx, container)
    return {**asdict(report), "ok": report.ok, "rows": report.rows()}


def _kill(ctx: Context, container: Observed) -> None:
    engine.kill(ctx.engines, ctx.config.host(container.host), container)
    ctx.echo(f"{container.host}: killed {container.name} (SIGKILL)")


def _start(ctx: Context, container: Observed) -> None:
    engine.start(ctx.engines, ctx.config.host(container.host), container)
    ctx.echo(f"{container.host}: started {container.name} again")

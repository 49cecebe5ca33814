"""Each container's identity under TLS: the CA, a certificate per container, handing them over,
rotating them, and ``deployctl revoke``.

``up`` makes the CA if there is none (``init`` does it alone), issues what the plan needs (a
certificate per container, named as the container; re-issued when missing, revoked or expiring
within 30 days), and plans again with the serials, so exactly the containers whose certificate
changed are replaced. Before a container starts, its files go into a named volume of its own
on its host (``engine.stage``, through the engine's connection, over SSH for a remote host),
which the container mounts read-only: nothing of them is in its environment or labels.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import engine, pki, tlsplan
from .config import Config, Host
from .context import Context, client_tls
from .errors import DeployError
from .observed import Observed
from .parallel import Failures, across, echo_errors
from .planner import Action, Create, Mounts, Remove
from .specs import (
    AUTHKEY_FILE,
    L_CLUSTER,
    L_TLS,
    MASTER,
    WORKER,
    ContainerSpec,
    master_name,
    tls_volume,
)  # fmt: skip
from .tlsplan import Issue

Plan = Callable[[Mounts | None], list[Action]]


def ensure_ca(ctx: Context, dry_run: bool) -> bool:
    """Make the CA unless it exists (a dry run only says it would); True if it was absent."""
    where = ctx.config.certs_dir
    if pki.has_ca(where):
        return False
    if dry_run:
        ctx.echo(f"dry run: would create the cluster CA in {where}")
    else:
        pki.init(where)
        ctx.echo(f"created the cluster CA in {where}")
    return True


def init(config: Config) -> str:
    """``deployctl init``'s part: the CA when TLS is on; an existing one is kept."""
    if not config.master.tls:
        return "CA: none made, this cluster runs without TLS (master.tls = false)"
    if pki.has_ca(config.certs_dir):
        return f"CA already there (kept): {config.certs_dir}"
    pki.init(config.certs_dir)
    return f"CA created: {config.certs_dir}"


def _wanted(ctx: Context, draft: Sequence[Action],
            seen: Sequence[Observed]) -> list[tlsplan.Wanted]:  # fmt: skip
    """The certificates the plan's containers need: the new ones and those kept."""
    replaced = {a.spec.name for a in draft if isinstance(a, Create)}
    removed = {a.container.name for a in draft if isinstance(a, Remove)} - replaced
    pairs = [(a.spec.name, a.spec.role) for a in draft if isinstance(a, Create)]
    pairs += [(o.name, o.role) for o in seen if o.role in (MASTER, WORKER)
              and o.name not in removed]  # fmt: skip
    return [tlsplan.wanted_for(ctx.config, name, role) for name, role in pairs]


def plan(ctx: Context, make: Plan, seen: Sequence[Observed], dry_run: bool,
         renew_within: dt.timedelta) -> tuple[list[Action], list[Issue]]:  # fmt: skip
    """Plan with certificates: plan with those held, issue what that plan needs (not in a dry
    run), then plan again with the new serials."""
    where = ctx.config.certs_dir
    held = pki.held(where) if pki.has_ca(where) else {}

    def mounts(name: str, role: str) -> tlsplan.TLSMount:
        return tlsplan.mount(name, role, held)

    draft = make(mounts)
    issues = tlsplan.to_issue(_wanted(ctx, draft, seen), held, pki.now(), renew_within)
    if dry_run or not issues:
        return draft, issues
    held = pki.issue(where, issues)
    for item in issues:
        ctx.echo(f"issued {item.describe()}")
    return make(mounts), issues


def stage(ctx: Context, host: Host, spec: ContainerSpec) -> None:
    """Put the container's TLS files, and the authkey, into its volume on its host (before it
    starts)."""
    if spec.tls is None:
        return
    files = pki.files(ctx.config.certs_dir, spec.tls)
    files.append(tlsplan.TLSFile(AUTHKEY_FILE, ctx.key(create=False).reveal().encode() + b"\n",
                                 pki.KEY_MODE))  # fmt: skip
    archive = tlsplan.archive(files, pki.now().timestamp())
    labels = {L_CLUSTER: ctx.config.cluster, L_TLS: spec.name}
    engine.stage(ctx.engines, host, spec.image.ref, spec.tls.volume, labels, archive)


def _ship_crl(ctx: Context, master: Observed) -> None:
    """The CA's current revocation list into the running master's TLS volume: the master
    sees the file change (the volume is mounted as a directory) and reloads it."""
    archive = tlsplan.archive([pki.crl(ctx.config.certs_dir)], pki.now().timestamp())
    labels = {L_CLUSTER: ctx.config.cluster, L_TLS: master.name}
    engine.stage(ctx.engines, ctx.config.host(master.host), master.image_id or master.image,
                 tls_volume(master.name), labels, archive)  # fmt: skip


@dataclass
class Revoked:
    """What ``revoke`` did."""

    name: str
    serials: list[int]
    crl_on: list[str] = field(default_factory=list)  # hosts whose master got the new list
    removed: list[str] = field(default_factory=list)  # host/container
    failures: Failures = field(default_factory=Failures)


def worker_certificate(ctx: Context, target: str) -> str:
    """``worker-3`` or ``CLUSTER-worker-3``: the worker's (= its certificate's) name."""
    cluster = ctx.config.cluster
    name = target if target.startswith(f"{cluster}-") else f"{cluster}-{target}"
    suffix = name.removeprefix(f"{cluster}-worker-")
    if suffix == name or not suffix.isdigit():
        raise DeployError(f"revoke {target}", "not a worker of this cluster",
                          f"name a worker, e.g. worker-3 or {cluster}-worker-3 "
                          "(see 'deployctl status')")  # fmt: skip
    return name


def revoke(ctx: Context, target: str, observed: Sequence[Observed],
           reachable: set[str]) -> Revoked:  # fmt: skip
    """Revoke the worker's certificate, ship the new revocation list to the master (which
    cuts the worker within seconds), then remove the worker's container and its TLS files."""
    if not ctx.config.master.tls:
        raise DeployError(f"revoke {target}", "this cluster runs without TLS (master.tls = "
                          "false): there is no certificate to revoke",
                          "set master.tls = true and run 'deployctl up'")  # fmt: skip
    name = worker_certificate(ctx, target)
    pki.require_ca(ctx.config.certs_dir)
    done = Revoked(name, pki.revoke(ctx.config.certs_dir, name))
    masters = [o for o in observed if o.role == MASTER and o.name == master_name(
        ctx.config.cluster)]  # fmt: skip
    out = across([ctx.config.host(o.host) for o in masters],
                 lambda h: _ship_crl(ctx, next(o for o in masters if o.host == h.name)),
                 ctx.config.parallel, echo_errors(ctx.echo))  # fmt: skip
    done.failures.add(out)
    done.crl_on = sorted(out.ok)
    if ctx.config.master.host not in reachable:
        done.failures.add({ctx.config.master.host: DeployError(
            f"host {ctx.config.master.host}", "unreachable: its master did not get the new "
            "revocation list", f"run 'deployctl revoke {target}' again once it is back")})
    for o in (o for o in observed if o.name == name and o.role == WORKER):
        host = ctx.config.host(o.host)
        try:  # no drain: the master already refuses it
            engine.remove(ctx.engines, host, o, 0)
            engine.remove_volume(ctx.engines, host, tls_volume(o.name))
            done.removed.append(f"{o.host}/{o.name}")
        except DeployError as exc:
            ctx.echo(f"error: {exc}")
            done.failures.add({o.host: exc})
    return done


def client_files(ctx: Context, renew_within: dt.timedelta) -> tuple[Path, Path, Path] | None:
    """deployctl's own certificate, rotated like the containers' on ``up``."""
    return client_tls(ctx.config, ctx.echo, renew_within)


__all__ = ["Revoked", "client_files", "ensure_ca", "init", "plan", "revoke", "stage",
           "worker_certificate"]  # fmt: skip

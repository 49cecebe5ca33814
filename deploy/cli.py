"""deployctl: bring up, scale, watch and tear down a scheduler cluster on listed hosts.

Parses, loads the config, calls one function, prints its result; errors are mapped to exit
codes in one place (``_errors``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from . import cluster, config, jobs, keyfile, render, ship, ssh, watch
from .errors import DeployError

app = typer.Typer(
    help="Bring up, scale, watch and tear down a scheduler cluster on listed hosts.",
    no_args_is_help=True, add_completion=False,
    pretty_exceptions_show_locals=False, rich_markup_mode=None,
)  # fmt: skip
hosts_app = typer.Typer(help="Inspect and trust hosts' SSH keys.", no_args_is_help=True)
app.add_typer(hosts_app, name="hosts")
log = logging.getLogger("deploy")


@dataclass
class Options:
    inventory: Path | None = None
    hosts: str | None = None
    accept_new: bool = False
    verbose: bool = False


OPTS = Options()


_WRITING = threading.Lock()  # hosts report from threads: one whole line at a time


def _echo(text: str) -> None:
    with _WRITING:
        print(text, file=sys.stderr, flush=True)


def _out(text: str) -> None:
    with _WRITING:
        print(text, flush=True)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """The one error handler: ``error: ...`` on stderr and a meaningful exit code."""
    try:
        yield
    except DeployError as exc:
        if OPTS.verbose:
            traceback.print_exc()
        _echo(f"error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _echo("interrupted: what was made is labelled; run the same command again to finish, "
              "or 'deployctl down' to remove it")  # fmt: skip
        raise typer.Exit(130) from None


def _config() -> config.Config:
    return config.load(OPTS.inventory, os.environ, ssh.config_lookup, OPTS.hosts)


@contextlib.contextmanager
def _session() -> Iterator[cluster.Context]:
    with _errors(), cluster.session(_config(), os.environ, _echo, OPTS.accept_new) as ctx:
        yield ctx


@app.callback()
def main(
    inventory: Annotated[Path | None, typer.Option(
        "--inventory", "-i", envvar="DEPLOYCTL_INVENTORY",
        help="inventory file (default: cluster.toml if present)")] = None,
    hosts: Annotated[str | None, typer.Option(
        envvar="DEPLOYCTL_HOSTS",
        help="hosts, e.g. 'h1 h2 user@h3:2222'; the first runs the master ('localhost': "
             "this machine's engine)")] = None,
    accept_new_host_keys: Annotated[bool, typer.Option(
        "--accept-new-host-keys", envvar="DEPLOYCTL_ACCEPT_NEW_HOST_KEYS",
        help="trust hosts never seen before (like StrictHostKeyChecking=accept-new); "
             "a changed key is still refused")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="tracebacks, debug logs")
    ] = False,
) -> None:  # fmt: skip
    """Deploy the scheduler in containers across hosts."""
    OPTS.inventory, OPTS.hosts, OPTS.accept_new, OPTS.verbose = (
        inventory, hosts, accept_new_host_keys, verbose)  # fmt: skip
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("paramiko").setLevel(logging.INFO if verbose else logging.CRITICAL)


@app.command()
def init() -> None:
    """Create the cluster's authkey (0600, beside the inventory) unless it exists."""
    with _errors():
        cfg = _config()
        existed = cfg.authkey_file.exists() or bool(os.environ.get(keyfile.ENV_VAR))
        keyfile.resolve(cfg.authkey_file, os.environ, create=True)
        where = keyfile.ENV_VAR if os.environ.get(keyfile.ENV_VAR) else cfg.authkey_file
        _out(f"authkey {'already set' if existed else 'created'}: {where}")


@app.command()
def build() -> None:
    """Build the master and slave images here (skipped when their inputs are unchanged)."""
    with _session() as ctx:
        images = ship.build_here(ctx)
        _out(render.table(["ROLE", "IMAGE", "ID"],
                          [["master", images.master.ref, images.master.version],
                           ["slave", images.slave.ref, images.slave.version]]))  # fmt: skip


@app.command(name="ship")
def ship_cmd() -> None:
    """Make the images present on every host (registry, or docker save/load over SSH)."""
    with _session() as ctx:
        images = ship.build_here(ctx)
        both = (images.master, images.slave)
        ship.ensure_images(ctx, {h.name: both for h in ctx.config.hosts})
        ctx.raise_failures("ship")
        _out("images present on every host")


@app.command()
def up(
    workers: Annotated[int | None, typer.Option(
        min=0, help="worker count (default: workers.count)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
    no_build: Annotated[bool, typer.Option(
        "--no-build", help="use the images last built here (deployctl build)")] = False,
) -> None:  # fmt: skip
    """Build, ship, start master and workers; wait until the workers have registered."""
    with _session() as ctx:
        result = cluster.up(ctx, workers, dry_run, build=not no_build)
        _finish(ctx, result, dry_run, "up")


@app.command()
def scale(
    what: Annotated[str, typer.Argument(help="'workers'")],
    count: Annotated[int, typer.Argument(min=0, help="how many worker containers")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
) -> None:  # fmt: skip
    """Reach COUNT workers: spread by capacity; idle workers go first, busy ones drain."""
    with _session() as ctx:
        if what not in ("workers", "worker"):
            raise DeployError(f"scale {what}", "only workers can be scaled", "use: scale workers N")
        _finish(ctx, cluster.scale(ctx, count, dry_run), dry_run, "scale")


@app.command()
def down(
    volumes: Annotated[
        bool, typer.Option("--volumes", help="also remove the journal volume")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
) -> None:  # fmt: skip
    """Remove every container of the cluster (by label); the journal only with --volumes."""
    with _session() as ctx:
        _finish(ctx, cluster.down(ctx, volumes, dry_run), dry_run, "down")


def _finish(ctx: cluster.Context, result: cluster.Result, dry_run: bool, name: str) -> None:
    if dry_run:
        _out(render.plan(result.actions, result.shipments))
    elif result.status is not None or name != "down":
        _out(render.status_text(watch.status(ctx), time.time()))
    elif not result.actions:
        _out("nothing to remove")
    ctx.raise_failures(name)


@app.command()
def status(json_: Annotated[bool, typer.Option("--json", help="machine-readable")] = False) -> None:
    """Containers per host, and jobs and workers as the master sees them."""
    with _session() as ctx:
        view = watch.status(ctx)
        now = time.time()
        _out(json.dumps(render.status_json(view, now), indent=2) if json_ else
             render.status_text(view, now))  # fmt: skip
        if not view.healthy:
            raise typer.Exit(3)


@app.command()
def logs(
    target: Annotated[str | None, typer.Argument(
        help="a container name, 'master', 'worker', or 'all' (default)")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    tail: Annotated[int | None, typer.Option(min=0, help="lines per container")] = None,
    since: Annotated[str | None, typer.Option(help="e.g. 10m, 2h, or a unix time")] = None,
) -> None:  # fmt: skip
    """Container output with a host/container prefix; -f follows every host at once."""
    with _session() as ctx:
        try:
            watch.logs(ctx, target, follow, tail, since, _out)
        except KeyboardInterrupt:
            if not follow:
                raise
            raise typer.Exit(130) from None  # how following ends: nothing was being made


@app.command()
def submit(
    command: Annotated[list[str] | None, typer.Argument(help="after --: the command")] = None,
    file: Annotated[Path | None, typer.Option(help="one command a line")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="follow to the end; fail if any fails")
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="with --wait: give up after")] = None,
) -> None:  # fmt: skip
    """Submit a shell job (submit -- CMD ARGS) or one per line of --file."""
    with _session() as ctx:
        if bool(command) == bool(file):
            raise DeployError("submit", "give a command after -- or --file, not both or neither",
                              "e.g. deployctl submit --wait -- echo hello")  # fmt: skip
        commands = jobs.read_commands(file) if file else [list(command or [])]
        with _progress(wait) as progress:
            done = jobs.submit(ctx, commands, wait, progress, timeout)
        _out(render.jobs_text(done) if wait else " ".join(str(j["id"]) for j in done))


@contextlib.contextmanager
def _progress(show: bool) -> Iterator[jobs.Progress | None]:
    if not show:
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True, console=_stderr_console()) as bar:
        task = bar.add_task("jobs", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _stderr_console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


@app.command(name="jobs")
def jobs_cmd(
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, ...")] = None,
    json_: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:  # fmt: skip
    """The master's jobs."""
    with _session() as ctx:
        found = jobs.jobs(ctx, state)
        _out(json.dumps(found, indent=2, default=str) if json_ else render.jobs_text(found))


@hosts_app.command("trust")
def hosts_trust(
    host: Annotated[str, typer.Argument(help="a host name from the inventory")],
    fingerprint: Annotated[str | None, typer.Option(
        help="the SHA256:... fingerprint you checked; required without a terminal")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="trust without asking")] = False,
) -> None:  # fmt: skip
    """Add a host's key to known_hosts after you checked its fingerprint."""
    with _errors():
        target = _config().host(host)

        def confirm(question: str) -> bool:
            if yes:
                return True
            if not sys.stdin.isatty():
                raise DeployError(f"host {host}", "cannot ask without a terminal",
                                  "pass --fingerprint SHA256:... (checked) or --yes")  # fmt: skip
            return typer.confirm(f"{question}\ntrust it?", default=False, err=True)

        _out(ssh.trust(target, fingerprint, confirm))


@hosts_app.command("list")
def hosts_list() -> None:
    """The hosts as resolved from the inventory and ~/.ssh/config."""
    with _errors():
        cfg = _config()
        rows = [[h.name, "local engine" if h.local else f"ssh {h.ssh.user}@{h.ssh.address}",  # type: ignore[union-attr]
                 "-" if h.capacity is None else h.capacity,
                 "master" if h.name == cfg.master.host else "", h.docker_host or "-"]
                for h in cfg.hosts]  # fmt: skip
        _out(render.table(["HOST", "REACHED BY", "CAPACITY", "ROLE", "DOCKER"], rows))

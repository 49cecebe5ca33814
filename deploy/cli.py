"""deployctl: bring up, scale, watch and tear down a scheduler cluster on listed hosts.

Parses, loads the config, calls one function, prints its result; errors are mapped to exit
codes in one place (``_errors``). The global options work before or after the command.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import logging
import os
import sys
import threading
import time
import traceback
import webbrowser
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from scheduler.job import MAX_PRIORITY

from . import build as builder
from . import chaos, cluster, config, identity, jobs, keyfile, render, shipping, ssh, watch
from .context import Context, session
from .engine import Engines
from .errors import DeployError
from .imagekit import OFFLINE_BASE, project_version
from .parallel import Failures

app = typer.Typer(
    help="Bring up, scale, watch and tear down a scheduler cluster on listed hosts.",
    no_args_is_help=True, add_completion=False,
    pretty_exceptions_show_locals=False, rich_markup_mode=None,
)  # fmt: skip
hosts_app = typer.Typer(help="Inspect and trust hosts' SSH keys.", no_args_is_help=True)
app.add_typer(hosts_app, name="hosts")
log = logging.getLogger("deploy")
_WRITING = threading.Lock()  # hosts report from threads: one whole line at a time


@dataclass(frozen=True)
class Options:
    """The global options, wherever they were given."""

    inventory: Path | None = None
    hosts: str | None = None
    accept_new: bool = False
    verbose: bool = False


# The global options: the app's callback takes them before the command (with their
# environment variables); every command takes them after it too (command line only), and a
# value given after the command wins over one given before it or in the environment.
_INVENTORY_HELP = "inventory file (default: cluster.toml if present)"
_HOSTS_HELP = ("hosts, e.g. 'h1 h2 user@h3:2222' (ssh aliases or names; the first runs the "
               "master; 'localhost': this machine's engine)")
_ACCEPT_HELP = ("trust hosts never seen before (like StrictHostKeyChecking=accept-new); a "
                "changed key is still refused")
_VERBOSE_HELP = "tracebacks, debug logs"
_GLOBALS: dict[str, Any] = {
    "inventory": Annotated[Path | None, typer.Option(
        "--inventory", "-i", help=f"{_INVENTORY_HELP} [env: DEPLOYCTL_INVENTORY]",
        show_default=False)],
    "hosts": Annotated[str | None, typer.Option(
        "--hosts", help=f"{_HOSTS_HELP} [env: DEPLOYCTL_HOSTS]", show_default=False)],
    "accept_new_host_keys": Annotated[bool, typer.Option(
        "--accept-new-host-keys", help=f"{_ACCEPT_HELP} [env: DEPLOYCTL_ACCEPT_NEW_HOST_KEYS]")],
    "verbose": Annotated[bool, typer.Option("--verbose", "-v", help=_VERBOSE_HELP)],
}  # fmt: skip
_DEFAULTS: dict[str, Any] = {"inventory": None, "hosts": None, "accept_new_host_keys": False,
                             "verbose": False}  # fmt: skip


_CURRENT: contextvars.ContextVar[Options | None] = contextvars.ContextVar("options", default=None)


def _options() -> Options:
    return _CURRENT.get() or Options()


def _set_options(ctx: typer.Context, given: dict[str, Any]) -> None:
    """Merge options given after the command over those given before it (or in the
    environment), which the app's callback left on the root context."""
    root = ctx.find_root().obj
    before = root if isinstance(root, Options) else Options()
    merged = replace(
        before,
        inventory=given["inventory"] or before.inventory,
        hosts=given["hosts"] or before.hosts,
        accept_new=given["accept_new_host_keys"] or before.accept_new,
        verbose=given["verbose"] or before.verbose,
    )  # fmt: skip
    _CURRENT.set(merged)
    _logging(merged.verbose)


def command(typer_app: typer.Typer, name: str | None = None) -> Callable[[Callable[..., Any]],
                                                                         Callable[..., Any]]:
    """``typer_app.command`` whose command also takes the global options after its name."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(fn, eval_str=True)
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=_DEFAULTS[n],
                                   annotation=kind) for n, kind in _GLOBALS.items()]  # fmt: skip
        extra.append(inspect.Parameter("typer_context", inspect.Parameter.KEYWORD_ONLY,
                                       annotation=typer.Context))  # fmt: skip

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _set_options(kwargs.pop("typer_context"), {n: kwargs.pop(n) for n in _GLOBALS})
            return fn(*args, **kwargs)

        wrapper.__signature__ = own.replace(  # type: ignore[attr-defined]
            parameters=[*own.parameters.values(), *extra])
        wrapper.__annotations__ = {p.name: p.annotation for p in
                                   wrapper.__signature__.parameters.values()}  # type: ignore[attr-defined]  # fmt: skip
        return typer_app.command(name)(wrapper)

    return decorate


def _echo(text: str) -> None:
    with _WRITING:
        print(text, file=sys.stderr, flush=True)


def _out(text: str) -> None:
    with _WRITING:
        print(text, flush=True)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s", force=True)  # fmt: skip
    logging.getLogger("paramiko").setLevel(logging.INFO if verbose else logging.CRITICAL)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """The one error handler: ``error: ...`` on stderr and a meaningful exit code."""
    try:
        yield
    except DeployError as exc:
        if _options().verbose:
            traceback.print_exc()
        _echo(f"error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _echo("interrupted: what was made is labelled; run the same command again to finish, "
              "or 'deployctl down' to remove it")  # fmt: skip
        raise typer.Exit(130) from None


def _config() -> config.Config:
    opts = _options()
    return config.load(opts.inventory, os.environ, ssh.config_lookup, opts.hosts)


@contextlib.contextmanager
def _session() -> Iterator[Context]:
    with _errors(), session(_config(), os.environ, _echo, _options().accept_new) as ctx:
        yield ctx


def _version(show: bool) -> None:
    if show:
        _out(f"deployctl {project_version()}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    inventory: Annotated[Path | None, typer.Option(
        "--inventory", "-i", envvar="DEPLOYCTL_INVENTORY", help=_INVENTORY_HELP)] = None,
    hosts: Annotated[str | None, typer.Option(envvar="DEPLOYCTL_HOSTS", help=_HOSTS_HELP)] = None,
    accept_new_host_keys: Annotated[bool, typer.Option(
        "--accept-new-host-keys", envvar="DEPLOYCTL_ACCEPT_NEW_HOST_KEYS", help=_ACCEPT_HELP)
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=_VERBOSE_HELP)] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit")] = False,
) -> None:  # fmt: skip
    """Deploy the scheduler in containers across hosts. Global options go before or after
    the command."""
    ctx.obj = Options(inventory, hosts, accept_new_host_keys, verbose)
    _CURRENT.set(ctx.obj)
    _logging(verbose)


@command(app)
def init() -> None:
    """Create the cluster's authkey (0600) and, with TLS, its CA (certs_dir, 0700), beside the
    inventory, unless they exist; an existing CA is never overwritten."""
    with _errors():
        cfg = _config()
        existed = cfg.authkey_file.exists() or bool(os.environ.get(keyfile.ENV_VAR))
        keyfile.resolve(cfg.authkey_file, os.environ, create=True)
        where = keyfile.ENV_VAR if os.environ.get(keyfile.ENV_VAR) else cfg.authkey_file
        _out(f"authkey {'already set' if existed else 'created'}: {where}")
        _out(identity.init(cfg))


@contextlib.contextmanager
def _local_engine() -> Iterator[Engines]:
    engines = Engines()
    try:
        yield engines
    finally:
        engines.close()


def _image_names() -> dict[str, str]:
    """The inventory's image names when there is an inventory; the defaults otherwise."""
    opts = _options()
    if not (opts.inventory or opts.hosts or Path(config.DEFAULT_INVENTORY).exists()):
        return {}
    images = _config().images
    return {"master": images.master, "slave": images.slave}


@command(app)
def build(
    base: Annotated[str | None, typer.Option(
        help="base image (default python:3.11-slim, else the offline base)")] = None,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="rebuild even if up to date")] = False,
) -> None:  # fmt: skip
    """Build the master and slave images here (skipped when their inputs are unchanged)."""
    with _errors(), _local_engine() as engines:
        built = builder.build_images(engines, sys.stderr, _image_names(), base, no_cache)
        _out(render.table(["ROLE", "IMAGE", "ID", "SIZE", ""],
                          [[b.role, f"{b.repository}:{b.tags[1]}", b.image_id[7:19],
                            f"{b.size / 1e6:.0f} MB", "up to date" if b.skipped else "built"]
                           for b in built]))  # fmt: skip


@command(app, name="base-image")
def base_image(
    force: Annotated[bool, typer.Option("--force", help="rebuild even if it exists")] = False,
    if_needed: Annotated[bool, typer.Option(
        "--if-needed", help="only when the default base cannot be pulled")] = False,
    mirror: Annotated[str | None, typer.Option(help="Debian mirror (default: debootstrap's)")
                      ] = None,
    tag: Annotated[str, typer.Option(help="the image's name")] = OFFLINE_BASE,
) -> None:  # fmt: skip
    """Make the offline base image (Debian minbase + python3, by debootstrap) unless it exists."""
    with _errors(), _local_engine() as engines:
        if if_needed:
            _out(builder.ensure_base(engines, None, sys.stderr))
        elif force or not builder.has_image(engines, tag):
            _out(builder.base_image(engines, sys.stderr, tag, mirror=mirror))
        else:
            _echo(f"{tag} exists; --force rebuilds it")
            _out(tag)


@command(app, name="ship")
def ship_cmd() -> None:
    """Make the images present on every host, sending each only the layers it lacks."""
    with _session() as ctx:
        images = cluster.images_for(ctx, build_first=True)
        both = (images.master, images.slave)
        started = time.monotonic()
        _, sent, failures = shipping.ensure(ctx, {h.name: both for h in ctx.config.hosts})
        failures.check("ship", len(ctx.config.hosts))
        _out(render.table(["HOST", "SENT", "SECONDS"],
                          [[s.host, f"{s.wire_bytes / 1e6:.1f} MB", f"{s.seconds:.1f}"]
                           for s in sent]) if sent else "")  # fmt: skip
        _out(f"images present on every host ({time.monotonic() - started:.1f}s)")


@command(app)
def up(
    workers: Annotated[int | None, typer.Option(
        min=0, help="worker count (default: workers.count)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
    no_build: Annotated[bool, typer.Option(
        "--no-build", help="use the images last built here (deployctl build)")] = False,
) -> None:  # fmt: skip
    """Build, ship, start master and workers; wait until the workers have registered."""
    with _session() as ctx:
        result = cluster.up(ctx, workers, dry_run, build_first=not no_build)
        _finish(ctx, result, dry_run, "up")


@command(app)
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


@command(app)
def down(
    volumes: Annotated[
        bool, typer.Option("--volumes", help="also remove the journal volume")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
) -> None:  # fmt: skip
    """Remove every container of the cluster (by label); the journal only with --volumes."""
    with _session() as ctx:
        _finish(ctx, cluster.down(ctx, volumes, dry_run), dry_run, "down")


@command(app)
def revoke(
    worker: Annotated[str, typer.Argument(help="the worker, e.g. worker-3 or CLUSTER-worker-3")],
) -> None:  # fmt: skip
    """Revoke a worker's certificate: the master gets the new revocation list (and cuts the
    worker within seconds), then the worker's container and its TLS files are removed at
    once, without draining. A later 'up' starts a replacement with a new certificate."""
    with _session() as ctx:
        seen = cluster.observe(ctx)
        done = identity.revoke(ctx, worker, seen.containers, set(seen.reachable))
        newly = f"{len(done.serials)} certificate(s)" if done.serials else "already revoked"
        _out(f"revoked {done.name}: {newly}; revocation list sent to the master on "
             f"{', '.join(done.crl_on) or 'no host (no master running)'}; removed "
             f"{', '.join(done.removed) or 'no container (none found)'}")  # fmt: skip
        failures = Failures()
        failures.add(seen.failures)
        failures.add(done.failures)
        failures.check("revoke", len(ctx.config.hosts))


def _finish(ctx: Context, result: cluster.Result, dry_run: bool, name: str) -> None:
    if dry_run:
        _out(render.plan(result.actions, result.shipments, result.certificates))
    elif result.status is not None or name != "down":
        _out(render.status_text(watch.status(ctx), time.time()))
    elif not result.actions:
        _out("nothing to remove")
    result.failures.check(name, len(ctx.config.hosts))


@command(app)
def status(json_: Annotated[bool, typer.Option("--json", help="machine-readable")] = False) -> None:
    """Containers per host, and jobs and workers as the master sees them."""
    with _session() as ctx:
        view = watch.status(ctx)
        now = time.time()
        _out(json.dumps(render.status_json(view, now), indent=2) if json_ else
             render.status_text(view, now))  # fmt: skip
        if not view.healthy:
            raise typer.Exit(3)


@command(app)
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


@command(app)
def submit(
    command: Annotated[list[str] | None, typer.Argument(help="after --: the command")] = None,
    file: Annotated[Path | None, typer.Option(
        help="one command a line, each run whole by /bin/sh")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="follow to the end; fail if any fails")
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="with --wait: give up after")] = None,
    retries: Annotated[int | None, typer.Option(
        help="run a failed job again, up to N times (default: the master's)")] = None,
    retry_backoff: Annotated[float | None, typer.Option(
        help="seconds before the first retry, doubled each time")] = None,
    after: Annotated[str | None, typer.Option(
        help="job ids (12,13) that must succeed first; cancelled if one fails")] = None,
    priority: Annotated[int | None, typer.Option(
        min=-MAX_PRIORITY, max=MAX_PRIORITY, help="higher runs first (default 0)")] = None,
    requires: Annotated[str | None, typer.Option(
        help="labels a worker must carry, e.g. gpu=1,zone=a (hosts[].labels)")] = None,
    array: Annotated[str | None, typer.Option(
        help="one job per index, e.g. 1-1000%50 (at most 50 at once), 0-99:2, 1,3,5-7; "
             "{} in the command is the index, also in $SCHEDULER_ARRAY_INDEX")] = None,
) -> None:  # fmt: skip
    """Submit a shell job (submit -- CMD ARGS), one per line of --file, or an array of one
    command (submit --array 1-10 -- CMD {})."""
    with _session() as ctx:
        if bool(command) == bool(file):
            raise DeployError("submit", "give a command after -- or --file, not both or neither",
                              "e.g. deployctl submit --wait -- echo hello")  # fmt: skip
        if array is not None and file:
            raise DeployError("submit", "--array runs one command, not a --file",
                              "e.g. deployctl submit --array 1-10 -- echo {}")  # fmt: skip
        tasks = jobs.Array.parse(array) if array is not None else None
        options = jobs.JobOptions(
            retries=retries, retry_backoff=retry_backoff,
            after=jobs.parse_ids(after) if after else None, priority=priority,
            requires=jobs.parse_requires(requires) if requires is not None else None,
        )  # fmt: skip
        commands: list[jobs.Command] = (
            list(jobs.read_commands(file)) if file else [list(command or [])])  # fmt: skip
        with _progress(wait) as progress:
            done = jobs.submit(ctx, commands, wait, progress, timeout, options, tasks)
        _out(render.jobs_text(done) if wait else " ".join(str(j["id"]) for j in done))


@contextlib.contextmanager
def _progress(show: bool) -> Iterator[jobs.Progress | None]:
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(*render.progress_columns(), transient=True,
                  console=Console(stderr=True)) as bar:  # fmt: skip
        task = bar.add_task("jobs", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@command(app, name="jobs")
def jobs_cmd(
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, ...")] = None,
    array: Annotated[int | None, typer.Option(
        metavar="ID", help="that array's tasks (listed otherwise as one line)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:  # fmt: skip
    """The master's jobs, newest first; an array as one line."""
    with _session() as ctx:
        found = jobs.jobs(ctx, state, array)
        _out(json.dumps(found, indent=2, default=str) if json_ else render.jobs_text(found))


@command(app)
def job(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="the job's id")],
    json_: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:  # fmt: skip
    """One job: state, attempts, worker, times, exit code, error, stdout and stderr tails."""
    with _session() as ctx:
        info = jobs.job(ctx, job_id)
        _out(json.dumps(info, indent=2, default=str) if json_
             else render.job_text(info, time.time()))  # fmt: skip


@command(app)
def metrics() -> None:
    """The master's Prometheus metrics (/metrics), fetched through SSH from its host."""
    with _session() as ctx:
        _out(watch.metrics(ctx).rstrip("\n"))


@command(app)
def dashboard(
    port: Annotated[int, typer.Option(
        min=0, max=65535, help="local port on 127.0.0.1 (default: any free one)")] = 0,
    no_browser: Annotated[bool, typer.Option(
        "--no-browser", help="only print the URL, even with a display")] = False,
) -> None:  # fmt: skip
    """Tunnel to the master's dashboard: print the local URL (open it in a browser when
    there is a display) and keep the tunnel until Ctrl-C."""
    with _session() as ctx:
        url = watch.dashboard_url(ctx, port)
        _out(url)
        _echo(f"dashboard of {ctx.master.subject} at {url}; Ctrl-C closes the tunnel")
        if not no_browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            webbrowser.open(url)
        try:
            while not ctx.stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            _echo("tunnel closed")


@command(app)
def top(
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between redraws")] = 1.0,
    once: Annotated[bool, typer.Option(
        "--once", help="print one frame (rate measured over --interval) and exit")] = False,
) -> None:  # fmt: skip
    """Live terminal view of the master: counts, rate, ETA, workers and what they run,
    redrawn until Ctrl-C."""
    with _session() as ctx:
        code = ctx.master.top(ctx.key(create=False), interval, once)
        if code:
            raise typer.Exit(code)


@command(app)
def verify(
    restart_master: Annotated[bool, typer.Option(
        "--restart-master", help="also kill the master's container mid-batch")] = False,
    jobs_: Annotated[int | None, typer.Option(
        "--jobs", min=1, help="how many jobs (default: twice the slots, at least 8)")] = None,
    seconds: Annotated[float | None, typer.Option(
        min=0.1, help="how long each job runs (default: twice the lease)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:  # fmt: skip
    """Chaos check of the deployed cluster: kill a worker container (and with
    --restart-master the master's) mid-batch, then account for every job; exit 5 if any
    was lost or ran twice on a healthy worker."""
    with _session() as ctx:
        report = chaos.verify(ctx, restart_master, jobs_, seconds)
        _out(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2) if json_
             else render.verify_text(report))  # fmt: skip
        if not report["ok"]:
            raise typer.Exit(5)


@command(hosts_app, "trust")
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


@command(hosts_app, "list")
def hosts_list() -> None:
    """The hosts as resolved from the inventory and ~/.ssh/config."""
    with _errors():
        cfg = _config()
        rows = [[h.name, h.address,
                 "local engine" if h.ssh is None else f"ssh {h.ssh.user}@{h.ssh.address}",
                 "-" if h.capacity is None else h.capacity,
                 "master" if h.name == cfg.master.host else "", h.docker_host or "-",
                 h.labels_text or "-"]
                for h in cfg.hosts]  # fmt: skip
        _out(render.table(["HOST", "ADDRESS", "REACHED BY", "CAPACITY", "ROLE", "DOCKER",
                           "LABELS"], rows))  # fmt: skip

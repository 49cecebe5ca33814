"""What every command works with: the config, the adapters, and where progress goes.

A leaf below the commands: it wires the adapters together (the engines and the master link
reach remote hosts through the SSH pool) and closes them at the end of a command.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import keyfile, pki, tlsplan
from .config import Config
from .engine import Engines
from .keyfile import Secret
from .link import MasterLink
from .ssh import SSHPool

Echo = Callable[[str], None]


def client_tls(config: Config, echo: Echo, renew_within: dt.timedelta = dt.timedelta(0)
               ) -> tuple[Path, Path, Path] | None:  # fmt: skip
    """deployctl's own certificate (role client) for talking to the master: (CA, certificate,
    key) files, issued first when missing, revoked, expired or expiring within
    ``renew_within``; None when the cluster runs without TLS."""
    if not config.master.tls:
        return None
    pki.require_ca(config.certs_dir)
    wanted = tlsplan.wanted_client(config)
    issues = tlsplan.to_issue([wanted], pki.held(config.certs_dir), pki.now(), renew_within)
    if issues:
        pki.issue(config.certs_dir, issues)
        echo(f"issued {issues[0].describe()}")
    return pki.client_paths(config.certs_dir, wanted.name)


@dataclass
class Context:
    """The config, one connection pool per adapter, and the command's Ctrl-C flag."""

    config: Config
    environ: Mapping[str, str]
    echo: Echo
    pool: SSHPool
    engines: Engines
    master: MasterLink
    stop: threading.Event = field(default_factory=threading.Event)  # set by Ctrl-C

    def key(self, create: bool) -> Secret:
        return keyfile.resolve(self.config.authkey_file, self.environ, create)


@contextlib.contextmanager
def session(config: Config, environ: Mapping[str, str], echo: Echo,
            accept_new: bool = False) -> Iterator[Context]:  # fmt: skip
    """A Context whose connections are opened on first use and closed at the end."""
    pool = SSHPool(accept_new)
    engines = Engines(dial=pool.docker_socket)
    link = MasterLink(config, pool.tunnel, tls=functools.partial(client_tls, config, echo))
    ctx = Context(config, environ, echo, pool, engines, link)
    try:
        yield ctx
    finally:
        ctx.master.close()
        engines.close()
        pool.close()

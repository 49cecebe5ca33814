"""What every command works with: the config, the adapters, and where progress goes.

A leaf below the commands: it wires the adapters together (the engines and the master link
reach remote hosts through the SSH pool) and closes them at the end of a command.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from . import keyfile
from .config import Config
from .engine import Engines
from .keyfile import Secret
from .link import MasterLink
from .ssh import SSHPool

Echo = Callable[[str], None]


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
    ctx = Context(config, environ, echo, pool, engines, MasterLink(config, pool.tunnel))
    try:
        yield ctx
    finally:
        ctx.master.close()
        engines.close()
        pool.close()

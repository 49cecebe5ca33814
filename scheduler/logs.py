"""Log set-up for the entrypoints: timestamped, one event per line, on stderr."""

from __future__ import annotations

import logging
import sys


def configure(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )

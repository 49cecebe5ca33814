"""The ``deployctl`` console script: says in one line when the ``deploy`` extra is missing.

Imports nothing outside the standard library until it knows the extra is there.
"""

from __future__ import annotations

import importlib.util
import sys

EXTRA = ("typer", "docker", "paramiko")


def main() -> None:
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        print(f"deployctl: {', '.join(missing)} not installed; install the deploy extra: "
              "pip install 'scheduler-kit[deploy]'", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    from .cli import app

    app()

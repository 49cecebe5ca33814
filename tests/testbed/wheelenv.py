"""A wheel of this checkout installed in a fresh virtualenv, as a user would install the kit.

``build_wheel`` builds from a copy of the tree (no build/ or egg-info left in the checkout);
``install`` makes a virtualenv and pip-installs the wheel, with or without the ``deploy`` extra
(its dependencies come from PyPI, or pip's cache); ``one_line_change`` edits the installed
scheduler package, which is what the images built by that deployctl carry.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_TREE = ("pyproject.toml", "README.md", "scheduler", "deploy")


@dataclass(frozen=True)
class Venv:
    path: Path

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    def site_packages(self) -> Path:
        found = sorted(self.path.glob("lib/python3*/site-packages"))
        assert found, f"no site-packages in {self.path}"
        return found[0]


def build_wheel(workdir: Path) -> Path:
    """The kit's wheel, built from a copy of the working tree into ``workdir``."""
    source = workdir / "source"
    source.mkdir(parents=True)
    for name in _TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, source / name)
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(workdir), str(source)])
    (wheel,) = workdir.glob("scheduler_kit-*.whl")
    return wheel


def install(wheel: Path, where: Path, extra: str | None = "deploy") -> Venv:
    """A fresh virtualenv at ``where`` with the wheel (and ``extra``) installed by pip."""
    _run([sys.executable, "-m", "venv", str(where)])
    venv = Venv(where)
    target = f"{wheel}[{extra}]" if extra else str(wheel)
    _run([str(venv.bin / "pip"), "install", "-q", "--disable-pip-version-check", target])
    return venv


def one_line_change(venv: Venv, text: str) -> Path:
    """Append one line to the installed scheduler package (a new build input for the images)."""
    path = venv.site_packages() / "scheduler" / "jobsfile.py"
    with path.open("a") as handle:
        handle.write(f"# {text}\n")
    return path


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")  # fmt: skip

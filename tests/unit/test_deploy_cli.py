"""The command line without hosts: global options before or after the command, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy.cli import app


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        "Host h1\n  HostName 10.9.0.1\nHost h2\n  HostName 10.9.0.2\n  Port 2202\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def hosts_shown(*args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return [line.split()[:2] for line in result.stdout.splitlines()[1:]]


def test_global_options_work_before_and_after_the_command(home: Path) -> None:
    before = hosts_shown("--hosts", "h1 h2", "hosts", "list")
    after = hosts_shown("hosts", "list", "--hosts", "h1 h2")
    assert before == after == [["h1", "10.9.0.1"], ["h2", "10.9.0.2"]]


def test_after_the_command_wins_then_before_then_the_environment(home: Path) -> None:
    env = {"DEPLOYCTL_HOSTS": "h2"}
    assert hosts_shown("hosts", "list", env=env) == [["h2", "10.9.0.2"]]
    assert hosts_shown("--hosts", "h1", "hosts", "list", env=env) == [["h1", "10.9.0.1"]]
    assert hosts_shown("--hosts", "h2", "hosts", "list", "--hosts", "h1", env=env) == [
        ["h1", "10.9.0.1"]]  # fmt: skip


def test_every_command_lists_the_global_options(home: Path) -> None:
    for command in (["up"], ["status"], ["scale"], ["submit"], ["build"], ["hosts", "trust"]):
        text = CliRunner().invoke(app, [*command, "--help"]).stdout
        for option in ("--hosts", "--inventory", "--accept-new-host-keys", "--verbose"):
            assert option in text, (command, option)


def test_an_invalid_inventory_is_one_error_line_and_exit_2(home: Path) -> None:
    (home / "bad.toml").write_text("[cluster]\nname = 'x'\n[[hosts]]\nport = 'x'\n")
    result = CliRunner().invoke(app, ["status", "-i", str(home / "bad.toml")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {home / 'bad.toml'}: ")
    assert "Traceback" not in result.output


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("deployctl ")


@pytest.mark.parametrize(("args", "line"), [
    (["--array", "1-x", "--", "echo", "{}"],
     "error: submit: --array: bad array range '1-x' in '1-x': write e.g. 1-1000%50, 0-9, "
     "1,3,5-7 or 0-99:2 (FIRST-LAST[:STEP], then %CAP); e.g. --array 1-100%10"),
    (["--array", "1-4%0", "--", "echo", "{}"],
     "error: submit: --array: bad array cap '0' in '1-4%0': after % give a whole number >= 1 "
     "(at most that many tasks run at once); e.g. --array 1-100%10"),
    (["--array", "1-4", "--file", "jobs.txt"],
     "error: submit: --array runs one command, not a --file; e.g. deployctl submit --array "
     "1-10 -- echo {}"),
    (["--requires", "gpu", "--", "true"],
     "error: submit: --requires: bad label 'gpu': write KEY=VALUE pairs separated by commas, "
     "e.g. gpu=1,zone=a (letters, digits and _.:/- only); e.g. --requires gpu=1"),
    (["--requires", " , ", "--", "true"],
     "error: submit: --requires names no label: ' , '; e.g. --requires gpu=1,zone=a"),
])  # fmt: skip
def test_a_bad_array_or_requires_is_one_line_before_anything_connects(
    home: Path, args: list[str], line: str
) -> None:  # fmt: skip
    (home / "jobs.txt").write_text("true\n")
    # h1 resolves to an address nothing listens on: reaching it would fail differently
    result = CliRunner().invoke(app, ["submit", "--hosts", "h1", *args])
    assert (result.exit_code, result.stdout) == (1, ""), result.output
    assert result.stderr.splitlines() == [line]


def test_a_priority_out_of_range_is_a_usage_error(home: Path) -> None:
    result = CliRunner().invoke(app, ["submit", "--hosts", "h1", "--priority", "1000001", "--",
                                      "true"])  # fmt: skip
    assert result.exit_code == 2 and "--priority" in result.stderr
    assert "Traceback" not in result.output


def test_hosts_list_shows_each_hosts_labels(home: Path) -> None:
    (home / "cluster.toml").write_text('[[hosts]]\nname = "h1"\nlabels = "zone=a,gpu=1"\n'
                                       '[[hosts]]\nname = "h2"\n')  # fmt: skip
    result = CliRunner().invoke(app, ["hosts", "list"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0][-1] == "LABELS" and rows[1][-1] == "gpu=1,zone=a" and rows[2][-1] == "-"

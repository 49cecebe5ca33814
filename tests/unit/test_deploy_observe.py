"""The pure parts of deployctl's job, metrics, dashboard and top commands, and the progress bar."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from deploy import config, render, watch
from deploy.cli import app
from deploy.errors import DeployError, HostError
from deploy.ssh import http_request, parse_http_response

NOW = 1_800_000_000.0


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SCHEDULER_", "DEPLOYCTL_")):
            monkeypatch.delenv(name)


def make_config(**sections: object) -> config.Config:
    data = config.hosts_override({"cluster": {"name": "demo"}, **sections}, "h1 h2")
    return config.from_mapping(data, {"HOME": "/h"}, lambda p: lambda a: {}, Path("/inv"))


def a_job(**fields: object) -> dict[str, object]:
    job: dict[str, object] = {
        "id": 42, "name": "", "state": "failed", "command": "make all", "attempts": 2,
        "max_attempts": 3, "worker": "demo-worker-1", "submitted": NOW - 30,
        "started": NOW - 20, "ended": NOW - 5, "exit_code": 2, "error": "exited with 2\n",
        "stdout": "", "stderr": "".join(f"line {i}\n" for i in range(100)),
    }  # fmt: skip
    job.update(fields)
    return job


def test_job_text_shows_the_fields_then_the_output_tails() -> None:
    text = render.job_text(a_job(stdout="built\n"), NOW)
    lines = text.splitlines()
    fields = {line[:12].strip(): line[13:] for line in lines[:11]}
    assert fields["job"] == "42" and fields["state"] == "failed"
    assert fields["attempts"] == "2 of 3" and fields["worker"] == "demo-worker-1"
    assert fields["took"] == "15.0s" and fields["exit code"] == "2"
    assert fields["error"] == "exited with 2"
    assert lines[11:13] == ["stdout:", "  built"]
    assert lines[13] == "stderr:" and lines[14:] == [f"  line {i}" for i in range(60, 100)]


def test_job_text_of_a_queued_and_a_running_job() -> None:
    queued = render.job_text(a_job(name="train", state="queued", worker=None, started=None,
                                   ended=None, exit_code=None, error=None, stderr=""), NOW)
    assert queued.splitlines()[0].split(None, 1) == ["job", "42 (train)"]
    assert "running for  -" in queued and "exit code    -" in queued
    assert "stdout:" not in queued and "stderr:" not in queued
    running = render.job_text(a_job(state="running", ended=None, started=NOW - 300), NOW)
    assert "running for  5.0m" in running


def test_job_text_says_why_a_job_waits_and_where_it_may_run() -> None:
    text = render.job_text(a_job(state="queued", reason="no connected slave has gpu=2",
                                 priority=5, requires={"zone": "a", "gpu": "2"}, array=40,
                                 array_index=3, max_running=2), NOW)  # fmt: skip
    assert text.splitlines()[1:7] == [
        "state        queued", "waiting      no connected slave has gpu=2",
        "command      make all", "priority     5", "requires     gpu=2,zone=a",
        "array        40, index 3, at most 2 at once"]  # fmt: skip
    plain = render.job_text(a_job(priority=0, requires={}, array=None, array_index=None), NOW)
    assert not {"waiting", "priority", "requires", "array"} & {
        line.split()[0] for line in plain.splitlines()}  # fmt: skip


def test_jobs_text_shows_an_array_as_one_line_of_counts() -> None:
    array = a_job(id=40, state="running", tasks=6, max_running=2, array=40,
                  counts={"succeeded": 3, "running": 2, "queued": 1})  # fmt: skip
    rows = render.jobs_text([array, a_job()]).splitlines()
    assert rows[1].split(None, 5) == ["40", "running", "-", "-", "-",
                                      "array of 6: 1 queued, 2 running, 3 succeeded, at most 2 "
                                      "at once (--array 40)"]  # fmt: skip
    assert rows[2].split()[:2] == ["42", "failed"]


def test_the_progress_bar_shows_done_of_total_rate_and_eta() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    clock = iter(range(100)).__next__
    with Progress(*render.progress_columns(), console=console, auto_refresh=False,
                  get_time=lambda: float(clock())) as bar:  # fmt: skip
        task = bar.add_task("jobs", total=None)
        assert "-- jobs/s" in _shown(console, bar)
        for done in (1, 2, 3, 4):
            bar.update(task, completed=done, total=10)
        line = _shown(console, bar)
    assert re.search(r"jobs +4/10 .* 40% ", line), line
    assert "1.0 jobs/s" in line and "ETA 0:00:06" in line


def _shown(console: Console, bar: Progress) -> str:
    with console.capture() as captured:
        console.print(bar.get_renderable())
    return captured.get()


def test_the_http_request_names_a_loopback_host() -> None:
    request = http_request("/metrics", 8889).decode()
    assert request.startswith("GET /metrics HTTP/1.0\r\n")
    assert "\r\nHost: 127.0.0.1:8889\r\n" in request and request.endswith("\r\n\r\n")


def test_an_http_answer_is_parsed_and_garbage_is_one_error() -> None:
    host = make_config().hosts[0]
    raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n# HELP x\r\n\r\nx 1\n"
    assert parse_http_response(raw, host, "127.0.0.1:8889") == (200, b"# HELP x\r\n\r\nx 1\n")
    assert parse_http_response(b"HTTP/1.1 403 Forbidden\r\n\r\n", host, "a:1")[0] == 403
    with pytest.raises(HostError, match=r"no HTTP answer from 127.0.0.1:8889 there: the "
                                        r"answer is not HTTP; is the master running"):
        parse_http_response(b"SSH-2.0-OpenSSH\r\n", host, "127.0.0.1:8889")


def test_the_masters_http_address_comes_from_env_else_the_schedulers_default() -> None:
    assert watch.http_endpoint(make_config()) == ("127.0.0.1", 8889)
    wide = make_config(env={"SCHEDULER_HTTP": "0.0.0.0:9100"})
    assert watch.http_endpoint(wide) == ("127.0.0.1", 9100)  # reached on its host's loopback
    named = make_config(env={"SCHEDULER_HTTP": "10.0.0.5:9100"})
    assert watch.http_endpoint(named) == ("10.0.0.5", 9100)
    with pytest.raises(DeployError, match="the master serves no HTTP; set SCHEDULER_HTTP"):
        watch.http_endpoint(make_config(env={"SCHEDULER_HTTP": ""}))
    with pytest.raises(DeployError, match="expected host:port"):
        watch.http_endpoint(make_config(env={"SCHEDULER_HTTP": "9100x"}))


def test_the_new_commands_have_help_and_take_the_global_options() -> None:
    for command in ("job", "metrics", "dashboard", "top"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        for option in ("--hosts", "--inventory", "--verbose"):
            assert option in result.stdout, (command, option)
    assert "--port" in CliRunner().invoke(app, ["dashboard", "--help"]).stdout
    assert "--once" in CliRunner().invoke(app, ["top", "--help"]).stdout


def test_bad_arguments_exit_2() -> None:
    assert CliRunner().invoke(app, ["job", "seven"]).exit_code == 2
    assert CliRunner().invoke(app, ["dashboard", "--port", "70000"]).exit_code == 2
    assert CliRunner().invoke(app, ["top", "--interval", "0"]).exit_code == 2


def test_status_shows_each_workers_labels_and_each_hosts_in_json() -> None:
    from deploy.observed import HostStatus, Status

    cfg = config.from_mapping({"cluster": {"name": "demo"}, "hosts": [
        {"name": "h1"}, {"name": "h2", "labels": {"gpu": "1"}}]}, {"HOME": "/h"},
        lambda p: lambda a: {}, Path("/inv"))  # fmt: skip
    workers = [{"name": "demo-worker-1", "concurrency": 2, "running": [7]},
               {"name": "demo-worker-2", "concurrency": 2, "labels": {"zone": "a", "gpu": "1"}}]
    view = Status("demo", tuple(HostStatus(h, (), None) for h in cfg.hosts),
                  {"counts": {}, "workers": workers}, None)  # fmt: skip
    rows = [line.split() for line in render.status_text(view, NOW).splitlines()[-3:]]
    assert rows == [["WORKER", "SLOTS", "STATE", "LABELS", "RUNNING", "JOBS"],
                    ["demo-worker-1", "2", "ready", "-", "7"],
                    ["demo-worker-2", "2", "ready", "gpu=1,zone=a", "-"]]  # fmt: skip
    shown = render.status_json(view, NOW)
    assert [h["labels"] for h in shown["hosts"]] == [{}, {"gpu": "1"}]

"""Commands as data: container specs, SDK arguments, dry-run lines; the authkey never shows."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import stat
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import config, keyfile, render, specs
from deploy.errors import DeployError, HostError, PartialFailure
from deploy.keyfile import Secret
from deploy.observed import Observed
from deploy.planner import Remove, Start, plan_up
from deploy.shipplan import Ship
from deploy.ssh import dial_command, known_hosts_entry

KEY = Secret("super-secret-key-" + "x" * 20)
IMAGES = specs.Images(specs.ImageRef("scheduler-master:hash-a", "sha256:" + "a" * 64),
                      specs.ImageRef("scheduler-slave:hash-b", "sha256:" + "b" * 64))  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SCHEDULER_", "DEPLOYCTL_")):
            monkeypatch.delenv(name)


def make_config(hosts: str = "h1 h2", **sections: object) -> config.Config:
    data = config.hosts_override({"cluster": {"name": "demo"}, **sections}, hosts)
    return config.from_mapping(data, {"HOME": "/h"}, lambda p: lambda a: {}, Path("/inv"))


def test_worker_spec_is_exact_data() -> None:
    cfg = make_config(workers={"concurrency": 3, "grace_seconds": 20}, env={"TZ": "UTC"})
    spec = specs.worker_spec(cfg, IMAGES, KEY, "h2", 7)
    args = specs.create_args(spec)
    assert args["environment"] == {
        "SCHEDULER_AUTHKEY": KEY, "SCHEDULER_CONCURRENCY": "3", "SCHEDULER_GRACE_SECONDS": "20",
        "SCHEDULER_MASTER": "h1:8888", "SCHEDULER_WORKER_NAME": "demo-worker-7", "TZ": "UTC",
    }  # fmt: skip
    assert {k: v for k, v in args.items() if k not in ("environment", "labels")} == {
        "image": "scheduler-slave:hash-b", "name": "demo-worker-7", "stop_timeout": 35,
        "use_config_proxy": False,
        "host_config": {"init": True, "network_mode": "host",
                        "restart_policy": {"Name": "unless-stopped"}, "binds": {}},
    }  # fmt: skip
    labels = args["labels"]
    assert isinstance(labels, dict)
    assert {k: labels[k] for k in ("deployctl.cluster", "deployctl.role", "deployctl.index",
                                   "deployctl.version")} == {
        "deployctl.cluster": "demo", "deployctl.role": "worker", "deployctl.index": "7",
        "deployctl.version": "bbbbbbbbbbbb"}  # fmt: skip


def test_a_hosts_labels_reach_its_workers_environment_and_the_plan() -> None:
    def cfg(labels: object) -> config.Config:
        hosts = [{"name": "h1"}, {"name": "h2", **({"labels": labels} if labels else {})}]
        return config.from_mapping({"cluster": {"name": "demo"}, "hosts": hosts}, {"HOME": "/h"},
                                   lambda p: lambda a: {}, Path("/inv"))  # fmt: skip

    labelled, plain = cfg({"zone": "a", "gpu": 1}), cfg(None)
    on_h2 = dict(specs.worker_spec(labelled, IMAGES, KEY, "h2", 2).env)
    assert on_h2["SCHEDULER_WORKER_LABELS"] == "gpu=1,zone=a"
    on_h1 = specs.worker_spec(labelled, IMAGES, KEY, "h1", 1)
    assert "SCHEDULER_WORKER_LABELS" not in dict(on_h1.env)
    # a host without labels: its workers are what they were before labels existed
    assert on_h1.digest == specs.worker_spec(plain, IMAGES, KEY, "h1", 1).digest
    assert "SCHEDULER_WORKER_LABELS" not in dict(specs.master_spec(labelled, IMAGES, KEY).env)
    lines = render.plan(plan_up(labelled, IMAGES, KEY, [], 2, {})).splitlines()
    assert [line.startswith("h2: ") for line in lines if "SCHEDULER_WORKER_LABELS" in line] == [
        True]  # fmt: skip
    assert " SCHEDULER_WORKER_LABELS=gpu=1,zone=a " in lines[-1]


def test_master_spec_has_its_volume_and_binds_wide_only_for_remote_hosts() -> None:
    spec = specs.master_spec(make_config(), IMAGES, KEY)
    assert spec.volumes == (("demo-state", "/var/lib/scheduler"),)
    assert dict(spec.env)["SCHEDULER_BIND"] == "0.0.0.0:8888"
    assert specs.create_args(spec)["host_config"]["binds"] == {  # type: ignore[index]
        "demo-state": {"bind": "/var/lib/scheduler", "mode": "rw"}}  # fmt: skip
    local = specs.master_spec(make_config("localhost"), IMAGES, KEY)
    assert dict(local.env)["SCHEDULER_BIND"] == "127.0.0.1:8888"


def test_the_spec_digest_changes_with_the_key_but_does_not_contain_it() -> None:
    cfg = make_config()
    one = specs.worker_spec(cfg, IMAGES, KEY, "h1", 1)
    two = specs.worker_spec(cfg, IMAGES, Secret("another-key-" + "y" * 20), "h1", 1)
    assert one.digest != two.digest
    assert one.digest == specs.worker_spec(cfg, IMAGES, KEY, "h1", 1).digest
    assert KEY.reveal() not in repr(one) and KEY.reveal() not in json.dumps(dict(one.labels))


def test_dry_run_plan_masks_the_key() -> None:
    cfg = make_config()
    actions = plan_up(cfg, IMAGES, KEY, [], 2, {})
    text = render.plan(actions)
    assert KEY.reveal() not in text
    assert "SCHEDULER_AUTHKEY=********" in text
    assert text.splitlines()[0].startswith("h1: create demo-master (master, image scheduler-master")
    assert render.plan([]) == "nothing to do: the cluster already matches the inventory"


def test_dry_run_says_which_hosts_receive_which_images() -> None:
    other, unbuilt = "sha256:" + "c" * 64, specs.ImageRef("scheduler-slave:latest", specs.UNBUILT)
    ships = [Ship("h1", (IMAGES.master, IMAGES.slave), (None, other), (), (0, 2), (3, 3)),
             Ship("h2", (unbuilt,), (None,)), Ship("h3", (), (), (IMAGES.slave,))]  # fmt: skip
    lines = render.plan(plan_up(make_config(), IMAGES, KEY, [], 2, {}), ships).splitlines()
    assert lines[:3] == [
        "h1: ship scheduler-master:hash-a aaaaaaaaaaaa (absent there; 0 of 3 layers there), "
        "scheduler-slave:hash-b bbbbbbbbbbbb (there: cccccccccccc; 2 of 3 layers there)",
        "h2: ship scheduler-slave:latest not built here yet (absent there)",
        "h3: name scheduler-slave:hash-b bbbbbbbbbbbb (there under another name)",
    ]  # fmt: skip
    assert lines[3].startswith("h1: create demo-master")


def test_describe_removals_and_starts() -> None:
    o = Observed("h2", "id1", "demo-worker-3", "worker", 3, "v", "d", "exited")
    assert render.describe(Remove(o, 75, "scale down, idle")) == (
        "h2: drain and remove demo-worker-3 (scale down, idle; up to 75s)")  # fmt: skip
    assert render.describe(Start(o)) == "h2: start demo-worker-3 (exists, exited)"


def test_secret_never_shows() -> None:
    assert str(KEY) == repr(KEY) == f"{KEY}" == "Secret('********')"
    assert "super-secret" not in f"{[KEY]} { ({'k': KEY}) }"
    with pytest.raises(TypeError):
        pickle.dumps(KEY)


def test_authkey_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "c.authkey"
    first = keyfile.resolve(path, {}, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keyfile.resolve(path, {}, create=False) == first
    assert len(first.reveal()) >= 40


def test_authkey_environment_wins_and_short_or_open_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.authkey"
    assert keyfile.resolve(path, {"SCHEDULER_AUTHKEY": "e" * 20}, create=True).reveal() == "e" * 20
    assert not path.exists()
    with pytest.raises(DeployError, match="too short; use at least 16") as caught:
        keyfile.resolve(path, {"SCHEDULER_AUTHKEY": "tiny-key"}, create=True)
    assert "tiny-key" not in str(caught.value)
    path.write_text("k" * 30)
    path.chmod(0o644)
    with pytest.raises(DeployError, match="chmod 600"):
        keyfile.resolve(path, {}, create=False)
    with pytest.raises(DeployError, match="deployctl init"):
        keyfile.resolve(tmp_path / "none", {}, create=False)


def test_dial_command_is_quoted_data() -> None:
    assert dial_command(None) == "docker system dial-stdio"
    assert dial_command("/run/my engine.sock") == (
        "docker -H 'unix:///run/my engine.sock' system dial-stdio")  # fmt: skip
    assert (
        dial_command("tcp://127.0.0.1:2375") == "docker -H tcp://127.0.0.1:2375 system dial-stdio"
    )


def test_known_hosts_entry_uses_brackets_for_other_ports() -> None:
    cfg = make_config("a user@b:2222")
    assert known_hosts_entry(cfg.host("a").ssh) == "a"  # type: ignore[arg-type]
    assert known_hosts_entry(cfg.host("b:2222").ssh) == "[b]:2222"  # type: ignore[arg-type]


def test_error_messages_name_the_subject_and_the_next_step() -> None:
    err = HostError("w3", "10.0.0.7:22", "cannot connect over SSH: timed out", "is the host up?")
    assert str(err) == "host w3 (10.0.0.7:22): cannot connect over SSH: timed out; is the host up?"
    summary = PartialFailure("up", {"w3": err, "w1": DeployError("x", "y")}, 3)
    assert str(summary).splitlines() == [
        "up: failed on 2 of 3 host(s):", "  w1: x: y",
        "  w3: cannot connect over SSH: timed out; is the host up?",
        "fix the hosts above and run the command again",
    ]  # fmt: skip
    assert summary.exit_code == 3


def test_verify_report_text_ends_with_the_verdict() -> None:
    rows = [("jobs submitted", "10 x 3 s"), ("lost", "0")]
    text = render.verify_text({"rows": rows, "ok": True}).splitlines()
    assert text == ["jobs submitted  10 x 3 s", "lost            0",
                    "verdict: nothing lost, nothing run twice on a healthy worker"]  # fmt: skip
    assert render.verify_text({"rows": rows, "ok": False}).endswith("run twice on a healthy worker")


class _Handle:
    def __init__(self, job_id: int) -> None:
        self.id = job_id


class _Client:
    """The scheduler client as jobs.submit uses it: records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, dict[str, object]]] = []

    def submit_shell(self, command: object, **kwargs: object) -> _Handle:
        self.calls.append(("shell", command, kwargs))
        return _Handle(len(self.calls))

    def submit_array(self, command: object, indices: list[int], **kwargs: object
                     ) -> list[_Handle]:  # fmt: skip
        self.calls.append(("array", command, {"indices": indices, **kwargs}))
        return [_Handle(100 + i) for i in range(len(indices))]

    def flush(self) -> None:
        pass


class _Link:
    def __init__(self, client: _Client) -> None:
        self.client = client

    @contextlib.contextmanager
    def use(self, key: object) -> Iterator[_Client]:
        yield self.client


def test_submit_hands_priority_requires_and_the_array_to_the_client() -> None:
    from deploy import jobs

    client = _Client()
    ctx = types.SimpleNamespace(master=_Link(client), key=lambda create: KEY)
    options = jobs.JobOptions(priority=5, requires=jobs.parse_requires("gpu=1"), after=[3])
    done = jobs.submit(ctx, [["echo", "{}"]], False, options=options,  # type: ignore[arg-type]
                       array=jobs.Array.parse("1-3%2"))  # fmt: skip
    assert [j["id"] for j in done] == [100, 101, 102]
    jobs.submit(ctx, ["echo a | wc -c"], False, options=options)  # type: ignore[arg-type]
    shared = {"retries": None, "retry_backoff": None, "after": [3], "priority": 5,
              "requires": {"gpu": "1"}}  # fmt: skip
    assert client.calls == [
        ("array", ["echo", "{}"], {"indices": [1, 2, 3], "max_running": 2, "shell": False,
                                   **shared}),
        ("shell", "echo a | wc -c", {"shell": True, **shared}),
    ]  # fmt: skip

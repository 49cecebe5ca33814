"""Placement and arrays through deployctl on the 3-host test bed (issue #12, items 3-5): hosts
labelled in the inventory, `submit --requires`, `--array`, `--priority`; the real CLI,
engines and sshd, as in test_deployctl.py (whose Bed runs the CLI with the bed's HOME).

tb1 runs the master and one worker, tb2 (labelled gpu=1) two workers, tb3 one.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_deployctl import Bed, remove_everywhere
from tests.testbed import Testbed

pytestmark = pytest.mark.integration

CLUSTER = "iplace"
PORT = 18930  # not test_deployctl.py's 18890..18897 nor test_deployctl_tls.py's 18920
LABEL = f"deployctl.cluster={CLUSTER}"


def inventory(tb3_labels: str = "") -> str:
    return (f'[cluster]\nname = "{CLUSTER}"\n[master]\nport = {PORT}\nready_timeout = 90\n'
            "[workers]\ncount = 4\nconcurrency = 2\ngrace_seconds = 5\n"
            '[[hosts]]\nname = "tb1"\ncapacity = 1\n'
            '[[hosts]]\nname = "tb2"\nlabels = { gpu = "1" }\n'
            f'[[hosts]]\nname = "tb3"\ncapacity = 1\n{tb3_labels}')  # fmt: skip


def containers(bed: Bed) -> dict[str, dict[str, str]]:
    """host -> {name: id} of this cluster's workers, from each engine directly."""
    out = {}
    for host in bed.testbed.hosts:
        with bed.engine(host.name) as client:
            found = client.containers.list(all=True, filters={"label": LABEL})
            out[host.name] = {c.name: c.id for c in found if "-worker-" in c.name}
    return out


@pytest.fixture(scope="module")
def bed(testbed: Testbed, role_images: dict[str, str], tmp_path_factory) -> Iterator[Bed]:
    workdir = tmp_path_factory.mktemp("deployctl-placement")
    (workdir / "cluster.toml").write_text(inventory())
    remove_everywhere(testbed, LABEL)  # a crashed run's
    yield Bed(testbed, testbed.hosts[0].home, workdir)
    remove_everywhere(testbed, LABEL)


@pytest.fixture(scope="module")
def up(bed: Bed) -> subprocess.CompletedProcess[str]:
    return bed.run("up")


def submitted(proc: subprocess.CompletedProcess[str]) -> list[int]:
    """The ids in the table `submit --wait` prints."""
    return [int(line.split()[0]) for line in proc.stdout.splitlines()[1:]]


def jobs(bed: Bed, ids: list[int], *args: str) -> list[dict[str, Any]]:
    """Those jobs as `deployctl jobs --json ARGS` shows them (stdout included), in id order."""
    found = {j["id"]: j for j in json.loads(bed.run("jobs", "--json", *args).stdout)}
    return [found[i] for i in ids]


def test_jobs_that_require_a_label_run_only_on_the_labelled_hosts_workers(
    bed: Bed, up
) -> None:  # fmt: skip
    on_tb2 = set(containers(bed)["tb2"])
    assert len(on_tb2) == 2 and sum(map(len, containers(bed).values())) == 4
    batch = bed.workdir / "gpu.jobs"
    batch.write_text("sleep 0.3; echo $SCHEDULER_WORKER_NAME\n" * 12)
    done = bed.run("submit", "--wait", "--timeout", "180", "--requires", "gpu=1", "--file",
                   str(batch))  # fmt: skip
    ran = jobs(bed, submitted(done))
    assert len(ran) == 12 and {j["state"] for j in ran} == {"succeeded"}
    assert {j["worker"] for j in ran} <= on_tb2, [j["worker"] for j in ran]
    assert all(j["stdout"].strip() == j["worker"] for j in ran)  # the worker's own word
    assert {j["requires"]["gpu"] for j in ran} == {"1"}
    # the master knows each worker's labels: only tb2's carry gpu=1
    view = json.loads(bed.run("status", "--json").stdout)
    labelled = {w["name"] for w in view["master"]["workers"] if w.get("labels") == {"gpu": "1"}}
    assert labelled == on_tb2
    assert [h["labels"] for h in view["hosts"]] == [{}, {"gpu": "1"}, {}]


def test_an_array_runs_one_task_per_index_at_most_its_cap_at_once(bed: Bed, up) -> None:
    done = bed.run("submit", "--wait", "--timeout", "180", "--array", "1-6%2", "--", "sh", "-c",
                   "sleep 0.5; echo {} $SCHEDULER_ARRAY_INDEX")  # fmt: skip
    ids = submitted(done)
    ran = jobs(bed, ids, "--array", str(ids[0]))
    assert [j["stdout"].split() for j in ran] == [[str(i), str(i)] for i in range(1, 7)]
    assert {(j["array"], j["max_running"]) for j in ran} == {(ids[0], 2)}
    assert [j["array_index"] for j in ran] == list(range(1, 7))
    # from the times the jobs record: never more than 2 of them running at once
    edges = sorted([(j["ended"], -1) for j in ran] + [(j["started"], 1) for j in ran])
    running = [sum(step for _, step in edges[: n + 1]) for n in range(len(edges))]
    assert max(running) <= 2, edges
    (line,) = [r for r in bed.run("jobs").stdout.splitlines() if r.split()[:1] == [str(ids[0])]]
    assert f"array of 6: 6 succeeded, at most 2 at once (--array {ids[0]})" in line


def test_a_priority_is_recorded_and_a_bad_spec_is_one_line(bed: Bed, up) -> None:
    done = bed.run("submit", "--wait", "--priority", "7", "--", "true")
    assert [j["priority"] for j in jobs(bed, submitted(done))] == [7]
    for args, words in ((["--array", "1-x"], "--array: bad array range '1-x'"),
                        (["--requires", "gpu"], "--requires: bad label 'gpu'")):  # fmt: skip
        bad = bed.run("submit", *args, "--", "echo", "{}", check=False)
        assert (bad.returncode, bad.stdout) == (1, ""), bad.stderr
        assert bad.stderr.startswith("error: submit: ") and words in bad.stderr
        assert len(bad.stderr.splitlines()) == 1


def test_changed_labels_replace_only_that_hosts_workers(bed: Bed, up) -> None:
    before = containers(bed)
    (bed.workdir / "cluster.toml").write_text(inventory('labels = "zone=b"\n'))
    plan = bed.run("up", "--dry-run").stdout
    (name,) = before["tb3"]
    assert f"tb3: drain and remove {name} (outdated, replaced" in plan, plan
    assert "SCHEDULER_WORKER_LABELS=zone=b" in plan and "tb1: " not in plan
    bed.run("up", "--no-build")
    after = containers(bed)
    assert {h: after[h] == before[h] for h in after} == {"tb1": True, "tb2": True, "tb3": False}
    with bed.engine("tb3") as client:
        (worker,) = client.containers.list(filters={"label": LABEL})
        env = dict(e.split("=", 1) for e in worker.attrs["Config"]["Env"])
    assert env["SCHEDULER_WORKER_LABELS"] == "zone=b"
    text = bed.run("status").stdout
    assert any(line.split()[:1] == [worker.name] and "zone=b" in line.split()
               for line in text.splitlines()), text
    assert bed.run("up", "--dry-run").stdout.startswith("nothing to do")

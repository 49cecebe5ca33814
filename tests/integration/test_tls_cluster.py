"""Mutual TLS and certificate roles on real master, slave and CLI processes (issue #13).

One CA for the module, with a certificate per node; every process gets its files through
SCHEDULER_TLS_*, this one (the test's client) as client 'c1'. Refusals are checked on the
master's state, not only on what the refused side prints.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import sys
from collections import Counter
from multiprocessing import managers
from pathlib import Path

import cloudpickle
import pytest

from scheduler import certs, transport, verify
from scheduler.errors import Forbidden

from . import jobs
from .scheduler_procs import Cluster, wait_until

cloudpickle.register_pickle_by_value(jobs)
pytestmark = pytest.mark.integration

NODES = (("master", "master"), ("w1", "worker"), ("w2", "worker"), ("victim", "worker"),
         ("c1", "client"), ("gone", "worker"))  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    certs.init(root)
    for name, role in NODES:
        certs.issue(root, name, role, addresses=["127.0.0.1"])
    certs.revoke(root, "gone")
    ten_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    certs.issue(root, "old", "worker", days=1, not_before=ten_days_ago)  # expired 9 days ago
    return root


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("foreign")
    certs.init(root)
    certs.issue(root, "w1", "worker")
    return root


def tls_env(root: Path, name: str, ca: Path | None = None) -> dict[str, str]:
    return {"SCHEDULER_TLS_CA": str(ca or root / "ca.pem"),
            "SCHEDULER_TLS_CERT": str(root / f"{name}.pem"),
            "SCHEDULER_TLS_KEY": str(root / f"{name}.key")}  # fmt: skip


@pytest.fixture
def tls_cluster(tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch):
    """A TLS master (slaves declared dead after 1 s of silence); this process is client c1."""
    for name, value in tls_env(pki, "c1").items():
        monkeypatch.setenv(name, value)
    c = Cluster(tmp_path, lease=1.0)
    c.start_master(**tls_env(pki, "master"))
    yield c
    c.stop()


def cli(cluster: Cluster, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`scheduler --master ADDRESS ARGV...` in its own process, with ``env`` added."""
    argv = (sys.executable, "-m", "scheduler", "--master", cluster.address, *argv)
    return subprocess.run(argv, env=cluster.env(**env), capture_output=True, text=True, timeout=60)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:") or " ERROR " in line]


def refused_counts(master_log: str) -> Counter[str]:
    """Connections refused by reason, summed over the master's aggregated lines."""
    counts: Counter[str] = Counter()
    for inner in re.findall(r"refused \d+ connection\(s\) \(([^)]*)\)", master_log):
        for part in inner.split(", "):
            n, reason = part.split(" ", 1)
            counts[reason] += int(n)
    return counts


def test_jobs_run_end_to_end_under_tls(tls_cluster: Cluster, pki: Path) -> None:
    for name in ("w1", "w2"):
        tls_cluster.start_slave(name, **tls_env(pki, name))
    tls_cluster.wait_slaves("w1", "w2")
    with tls_cluster.client() as client:
        assert client.map(jobs.square, range(20), chunksize=1) == [x * x for x in range(20)]
        where = {client.apply_async(jobs.whoami).get(timeout=30) for _ in range(4)}
        shell = client.submit_shell("echo over tls", shell=True)
        assert shell.get(timeout=30) == "over tls\n"
        with pytest.raises(ValueError, match="kaput"):  # the job's own exception, as without TLS
            client.apply_async(jobs.boom, ("kaput",)).get(timeout=30)
        # a verify job marks itself from the slave, with the slave's certificate and name
        probe = client.apply_async(verify.probe, ("run-1", 7, 0.0))
        assert probe.get(timeout=30) == 7
        [(item, marker, _)] = client._link.call("marks", "run-1")
        assert (item, marker) == (7, client.job(probe.id)["worker"])
        status = client.status()
    assert where <= {"w1", "w2"}
    assert {w["name"] for w in status["workers"]} == {"w1", "w2"}
    assert status["counts"]["succeeded"] == 20 + 4 + 1 + 1 and status["counts"]["failed"] == 1

    listed = cli(tls_cluster, "jobs", "--json", "--all", **tls_env(pki, "c1"))
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 27
    assert any(job["worker"] in ("w1", "w2") for job in json.loads(listed.stdout))

    log = tls_cluster.master.log()
    assert re.search(r"TLS on: .* CA .*ca\.pem; revocation list .*crl\.pem", log)
    assert "refused" not in log
    secrets = [(pki / f"{n}.key").read_text().splitlines()[1] for n in ("master", "w1", "c1")]
    for text in [log, *(p.log() for p in tls_cluster.slaves.values())]:
        assert tls_cluster.authkey not in text
        assert not any(secret in text for secret in secrets)


def test_peers_without_a_valid_certificate_never_get_in(
    tls_cluster: Cluster, pki: Path, foreign: Path
) -> None:
    tls_cluster.start_slave("w1", **tls_env(pki, "w1"))
    tls_cluster.wait_slaves("w1")
    with tls_cluster.client() as client:
        before = client.status()
    stranger = tls_env(foreign, "w1", ca=pki / "ca.pem")  # trusts our master; another CA's cert
    bad = {  # what each refused peer must say about itself, in one line
        "plain": ({}, "takes only TLS connections"),
        "foreign": (stranger, r"refused our certificate \(from another CA\)"),
        "old": (tls_env(pki, "old"), r"refused our certificate \(expired\)"),
        "gone": (tls_env(pki, "gone"), r"refused our certificate \(revoked\)"),
    }
    # each tries both as a slave (register) and through the CLI (submit), all at once
    slaves = {name: tls_cluster.start_slave(name, **env) for name, (env, _) in bad.items()}
    submits = {name: subprocess.Popen(
        [sys.executable, "-m", "scheduler", "--master", tls_cluster.address, "submit", "--",
         "touch", str(tls_cluster.tmp / f"ran-{name}")],
        env=tls_cluster.env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for name, (env, _) in bad.items()}  # fmt: skip
    for name, (_, said) in bad.items():
        assert slaves[name].wait(30) == 3, slaves[name].log()
        lines = error_lines(slaves[name].log())
        assert len(lines) == 1 and re.search(said, lines[0]), slaves[name].log()
        out, err = submits[name].communicate(timeout=30)
        assert submits[name].returncode != 0 and out == ""
        assert len(error_lines(err)) == 1 and re.search(said, err), err

    with tls_cluster.client() as client:
        after = client.status()
    assert after["counts"] == before["counts"] and after["total"] == before["total"] == 0
    assert [w["name"] for w in after["workers"]] == ["w1"]
    assert not list(tls_cluster.tmp.glob("ran-*"))

    tls_cluster.master.signal(signal.SIGTERM)  # its last line counts what the minute held
    assert tls_cluster.master.wait(30) == 0
    counts = refused_counts(tls_cluster.master.log())
    assert counts == {"no TLS handshake in time": 2, "certificate from another CA": 2,
                      "expired certificate": 2, "revoked certificate": 2}  # fmt: skip


def test_each_certificate_makes_only_its_roles_calls(tls_cluster: Cluster, pki: Path) -> None:
    tls_cluster.start_slave("w1", **tls_env(pki, "w1"))
    tls_cluster.wait_slaves("w1")
    with tls_cluster.client() as client:
        w1 = {w["name"]: w for w in client.status()["workers"]}["w1"]

    submit = cli(tls_cluster, "submit", "--", "true", **tls_env(pki, "w1"))
    assert submit.returncode == 2
    assert error_lines(submit.stderr) == [
        "error: submit needs a client certificate; this connection holds worker 'w1'"
    ]
    hijack = tls_cluster.start_slave("w1", key="w1-again", **tls_env(pki, "w2"))
    impostor = tls_cluster.start_slave("c1", **tls_env(pki, "c1"))
    assert hijack.wait(30) == 2 and impostor.wait(30) == 2
    assert error_lines(hijack.log()) == ["error: register for worker 'w1' needs that worker's "
                                         "certificate; this connection holds worker 'w2'"]
    assert error_lines(impostor.log()) == [
        "error: register needs a worker certificate; this connection holds client 'c1'"
    ]

    with tls_cluster.client() as client:
        status = client.status()
        # the stdlib server's own requests: a proxy's are open, the master's are not
        address, key = (tls_cluster.host, tls_cluster.port), tls_cluster.authkey.encode()
        open_conn = managers.listener_client[transport.serializer()[0]][1]  # type: ignore[attr-defined]
        for request in ("shutdown", "debug_info", "number_of_objects"):
            with open_conn(address, key) as conn:
                with pytest.raises(Forbidden, match=f"^{request} needs the master's certificate; "
                                                    "this connection holds client 'c1'$"):
                    managers.dispatch(conn, None, request)  # type: ignore[attr-defined]
        with open_conn(address, key) as conn:
            assert managers.dispatch(conn, None, "dummy") is None  # type: ignore[attr-defined]
        link = transport.Link(address, key)
        with pytest.raises(Forbidden, match="^heartbeat needs a worker certificate"):
            link.call("heartbeat", "w1", ())
        assert client.status()["workers"] == status["workers"]  # still up, nothing changed
    assert [w["name"] for w in status["workers"]] == ["w1"]
    assert (status["workers"][0]["pid"], status["workers"][0]["host"]) == (w1["pid"], w1["host"])
    assert status["total"] == 0
    assert "refused 1 call(s) (1 submit by worker 'w1')" in tls_cluster.master.log()


def test_a_revoked_worker_is_cut_off_and_its_job_runs_elsewhere(
    tls_cluster: Cluster, pki: Path
) -> None:
    marks = tls_cluster.tmp / "marks"
    marks.mkdir()
    victim = tls_cluster.start_slave("victim", **tls_env(pki, "victim"))
    tls_cluster.wait_slaves("victim")
    with tls_cluster.client() as client:
        # 6 s: six times the lease, so only a cut (not the job ending) can move it
        handle = client.submit_shell(f"touch {marks}/run.$$; sleep 6", shell=True)
        wait_until(lambda: list(marks.iterdir()), what="the job to start on the victim")
        assert client.job(handle.id)["worker"] == "victim"
        tls_cluster.start_slave("w2", **tls_env(pki, "w2"))
        tls_cluster.wait_slaves("w2")

        def heard() -> float:
            return {w["name"]: w for w in client.status()["workers"]}["victim"]["last_heartbeat"]

        # its heartbeat thread has its connection (the slot runs the job; nothing else calls):
        # what stops it now is the master cutting it, not a refused new connection
        seen = heard()
        wait_until(lambda: heard() != seen, what="a heartbeat from the victim")
        certs.revoke(pki, "victim")

        assert victim.wait(30) == 3  # it stopped by itself, its job with it
        tls_cluster.master.wait_log(r"cut \d+ connection\(s\) of revoked certificate\(s\): "
                                    r"worker 'victim' \(\d+\)")  # fmt: skip
        assert handle.get(timeout=60) == ""
        info = client.job(handle.id)
        workers = {w["name"] for w in client.status()["workers"] if w["connected"]}
    assert (info["worker"], info["attempts"], info["state"]) == ("w2", 2, "succeeded")
    assert len(list(marks.iterdir())) == 2  # once on the victim (killed), once on w2
    assert workers == {"w2"}
    lines = error_lines(victim.log())
    assert len(lines) == 1 and re.search(r"slave victim stops: .*refused our certificate "
                                         r"\(revoked\)", lines[0]), victim.log()  # fmt: skip

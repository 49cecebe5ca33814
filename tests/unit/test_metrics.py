"""Metrics, the throughput ring and the HTTP views, against a real service and journal
(no sockets, no sleeping: the clock is injected)."""

from __future__ import annotations

import io
import json
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler import top
from scheduler.board import Board
from scheduler.job import State
from scheduler.journal import Journal
from scheduler.metrics import REQUEUE_REASONS, Metrics, NoMetrics, Throughput
from scheduler.progress import Progress
from scheduler.protocol import VERSION, Holding, Lease, Outcome
from scheduler.service import Service
from scheduler.web import Api
from tests.unit.test_board import Clock, shell


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def world(tmp_path, clock):
    """A service with metrics watching it, as the master wires them."""
    journal = Journal(tmp_path)
    metrics = Metrics(clock=clock)
    board = Board(clock=clock, lease_seconds=6.0)
    service = Service(board, journal, {}, Progress(clock), clock=clock, metrics=metrics)
    metrics.watch(service.snapshot)
    journal.on_commit = metrics.journal_committed
    yield service, metrics
    journal.close()


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


def join(service: Service, name: str, host: str = "", concurrency: int = 1) -> None:
    service.register(name, host=host, concurrency=concurrency, version=VERSION)


def leased(service: Service, worker: str, n: int) -> list[Lease]:
    """What a slave makes of a lease reply: named leases."""
    return [Lease._make(t) for t in service.lease(worker, n).leases]


def run_jobs(service: Service, clock: Clock, worker: str, n: int) -> list:
    leases = leased(service, worker, n)
    clock.now += 1
    return leases


def test_throughput_counts_per_second_by_state_and_forgets_old_seconds():
    clock = Clock()
    clock.now = 100.0
    ring = Throughput(seconds=5, clock=clock)
    ring.add(State.SUCCEEDED, 3)
    ring.add(State.FAILED)
    clock.now = 101.5
    ring.add(State.SUCCEEDED)
    ring.add(State.CANCELLED, 2)  # the current second is not in the series yet
    assert ring.series(3) == {"start": 98, "step": 1, "succeeded": [0, 0, 3],
                              "failed": [0, 0, 1], "cancelled": [0, 0, 0]}  # fmt: skip
    clock.now = 105.2  # second 100's slot is reused for 105: the old counts are gone
    ring.add(State.FAILED)
    clock.now = 106.0
    series = ring.series()
    assert series["start"] == 102 and len(series["succeeded"]) == 4
    assert series["failed"] == [0, 0, 0, 1]
    assert sum(series["succeeded"]) == 0


def test_hooks_count_submissions_outcomes_run_time_and_rejections(world, clock):
    service, metrics = world
    join(service, "w1", host="h1", concurrency=2)
    service.submit([shell("true"), shell("false"), shell("true")])
    leases = run_jobs(service, clock, "w1", 3)
    a, b, c = leases
    service.report("w1", [Outcome(a.job_id, a.lease, True, duration=0.02),
                          Outcome(b.job_id, b.lease, False, error="exit 1", exit_code=1,
                                  stderr="x" * 900, duration=2.0)])  # fmt: skip
    service.report("w1", [Outcome(c.job_id, c.lease + 99, True)])  # not its lease
    assert value(metrics, "scheduler_jobs_submitted_total") == 3
    assert value(metrics, "scheduler_jobs_finished_total", state="succeeded") == 1
    assert value(metrics, "scheduler_jobs_finished_total", state="failed") == 1
    assert value(metrics, "scheduler_outcomes_rejected_total") == 1
    assert value(metrics, "scheduler_job_run_seconds_count") == 2
    assert value(metrics, "scheduler_job_run_seconds_bucket", le="0.05") == 1
    assert value(metrics, "scheduler_job_run_seconds_sum") == pytest.approx(2.02)
    (failure,) = metrics.failures()
    assert (failure["id"], failure["exit_code"], failure["error"]) == (b.job_id, 1, "exit 1")
    assert failure["stderr"] == "x" * 500  # its end, bounded
    service.cancel(c.job_id)
    assert value(metrics, "scheduler_jobs_finished_total", state="cancelled") == 1
    assert value(metrics, "scheduler_job_run_seconds_count") == 2  # a cancel is no run
    service._journal.wait(service._journal.append([]))  # noqa: SLF001
    assert value(metrics, "scheduler_journal_commit_seconds_count") >= 1


def test_requeues_are_counted_by_reason(world, clock):
    service, metrics = world
    for name in ("w1", "w2", "w3"):
        join(service, name, concurrency=1)
    service.submit([shell("sleep", "1")] * 8)
    mine = {name: leased(service, name, 2) for name in ("w1", "w2", "w3")}
    # w1 hands back a prefetched job while ready (work stealing), then drains
    service.release("w1", [(mine["w1"][0].job_id, mine["w1"][0].lease)])
    service.heartbeat("w1", Holding(((mine["w1"][1].job_id, mine["w1"][1].lease),),
                                    draining=True))  # fmt: skip
    service.release("w1", [(mine["w1"][1].job_id, mine["w1"][1].lease)])
    service.goodbye("w2")  # leaves with two jobs
    # w3 says it got its lease reply but holds only one of the two jobs: one was lost
    held = mine["w3"][0]
    service.heartbeat("w3", Holding(((held.job_id, held.lease),), fetched=0))
    clock.now += 7  # w3 is silent past the lease: its job goes back
    service.tick()
    counts = {why: value(metrics, "scheduler_requeues_total", reason=why)
              for why in REQUEUE_REASONS}  # fmt: skip
    assert counts == {"handed_back": 1, "drain": 1, "slave_left": 2, "lost_in_transit": 1,
                      "slave_death": 1, "retry": 0}  # fmt: skip


def test_gauges_are_read_from_the_board_at_scrape_time(world, clock):
    service, metrics = world
    join(service, "w1", host="h1", concurrency=3)
    join(service, "w2", concurrency=2)
    service.submit([shell("true")] * 10)
    got = leased(service, "w1", 4)
    service.heartbeat("w1", Holding(tuple((x.job_id, x.lease) for x in got),
                                    waiting=(got[3].job_id,)))  # fmt: skip
    service.heartbeat("w2", Holding(draining=True))
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    jobs = {s.labels["state"]: s.value for s in families["scheduler_jobs"].samples}
    assert jobs == {"queued": 6, "running": 4, "succeeded": 0, "failed": 0, "cancelled": 0}
    single = {name: families[name].samples[0].value for name in (
        "scheduler_queue_depth", "scheduler_workers_connected", "scheduler_workers_draining",
        "scheduler_slots", "scheduler_slots_busy", "scheduler_jobs_held",
        "scheduler_jobs_in_memory", "scheduler_journal_failing")}  # fmt: skip
    assert single == {"scheduler_queue_depth": 6, "scheduler_workers_connected": 2,
                      "scheduler_workers_draining": 1, "scheduler_slots": 5,
                      "scheduler_slots_busy": 3, "scheduler_jobs_held": 4,
                      "scheduler_jobs_in_memory": 10, "scheduler_journal_failing": 0}  # fmt: skip
    # bounded labels: states and reasons only, never ids or text
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) <= {"state", "reason", "le"}


def test_a_service_without_metrics_counts_nothing_and_works(tmp_path, clock):
    journal = Journal(tmp_path)
    service = Service(Board(clock=clock), journal, {}, Progress(clock), clock=clock)
    assert isinstance(service._metrics, NoMetrics)  # noqa: SLF001
    service.submit([shell("true")])
    assert service.snapshot()["queued"] == 1
    journal.close()


# -- the HTTP views ------------------------------------------------------------------------


@pytest.fixture
def api(world, clock):
    service, metrics = world
    return Api(service, metrics, clock=clock)


def test_page_and_assets_come_from_the_package_with_a_strict_policy(api):
    page = api.get("/", "127.0.0.1:8889")
    assert page.status == 200 and page.content_type.startswith("text/html")
    assert b'src="/app.js"' in page.body and b"http" not in page.body.replace(b"http-", b"")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for asset in ("/app.js", "/app.css", "/favicon.svg"):
        assert api.get(asset).status == 200 and api.get(asset).body
    assert api.get("/nope").status == 404


@pytest.mark.parametrize("host", ["127.0.0.1:8889", "localhost:8889", "[::1]:8889", "localhost"])
def test_loopback_names_are_served(api, host):
    assert api.get("/api/status", host).status == 200


@pytest.mark.parametrize("host", ["evil.example:8889", "10.0.0.5:8889", ""])
def test_other_host_names_are_refused_on_a_loopback_port(api, host):
    """A page whose DNS name was rebound to 127.0.0.1 must not read the dashboard."""
    assert api.get("/api/status", host).status == 403


def test_a_port_bound_elsewhere_serves_any_host_name(world, clock):
    service, metrics = world
    assert Api(service, metrics, loopback=False).get("/api/status", "master:8889").status == 200


def test_status_view_has_counts_workers_throughput_and_failures(world, api, clock):
    service, metrics = world
    join(service, "w1", host="h1", concurrency=1)
    service.submit([shell("false")])
    (lease,) = leased(service, "w1", 1)
    service.report("w1", [Outcome(lease.job_id, lease.lease, False, error="bad", exit_code=3)])
    clock.now += 1
    status = json.loads(api.get("/api/status").body)
    assert status["counts"]["failed"] == 1
    assert [w["name"] for w in status["workers"]] == ["w1"]
    assert status["throughput"]["failed"][-1] == 1
    assert status["failures"][0]["exit_code"] == 3
    assert status["rate"] == pytest.approx(0.1)


def test_job_views_list_without_output_and_show_one_with_its_tails(world, api):
    service, _ = world
    join(service, "w1", concurrency=1)
    service.submit([shell("echo", "hi")] * 3)
    (lease,) = leased(service, "w1", 1)
    service.report("w1", [Outcome(lease.job_id, lease.lease, True, stdout="hi\n" * 5,
                                  stderr="warn\n")])  # fmt: skip
    listed = json.loads(api.get("/api/jobs?limit=2").body)
    assert [j["id"] for j in listed] == [3, 2] and "stdout" not in listed[0]
    done = json.loads(api.get("/api/jobs?state=succeeded").body)
    assert [j["id"] for j in done] == [1]
    one = json.loads(api.get("/api/jobs/1").body)
    assert one["stdout"] == "hi\n" * 5 and one["stderr"] == "warn\n" and "result" not in one
    assert api.get("/api/jobs/99").status == 404
    assert api.get("/api/jobs/x").status == 400
    assert api.get("/api/jobs?state=bogus").status == 400
    assert api.get("/api/jobs?limit=-1").status == 400


# -- the terminal view (rendering; the live loop is tested against a real master) -------------


class FakeMaster:
    """Answers like a master whose jobs finish at 5 a second."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.start = clock.now

    def status(self) -> dict:
        done = int((self.clock.now - self.start) * 5)
        return {
            "counts": {"queued": 100 - done, "running": 1, "succeeded": done, "failed": 0,
                       "cancelled": 0},
            "total": 101, "version": "0.1.0", "uptime": 75.0, "journal_error": None,
            "workers": [{"name": "w[red]1", "host": "h1", "concurrency": 2, "running": [7],
                         "waiting": [], "connected": True, "draining": False,
                         "last_heartbeat": 0.0}],
        }  # fmt: skip

    def job(self, job_id: int) -> dict:
        return {"id": job_id, "name": "", "command": "python3 train.py --seed 7"}


def test_top_frame_shows_counts_rate_eta_and_what_workers_run(clock):
    from rich.console import Console

    view = top.View(FakeMaster(clock), clock=clock)
    view.sample()
    clock.now += 2
    out = io.StringIO()
    Console(file=out, width=120).print(view.frame())
    text = out.getvalue()
    assert "rate 5.0 jobs/s" in text and "ETA 18s" in text  # 90 left at 5/s
    assert "w[red]1" in text  # a name is shown as it is, never read as markup
    assert "7 python3 train.py --seed 7" in text
    assert "succeeded" in text and "10" in text


def test_top_without_rich_says_how_to_install_it(monkeypatch, capsys, clock):
    monkeypatch.setitem(sys.modules, "rich.console", None)
    assert top.run(FakeMaster(clock), once=True) == 2
    assert capsys.readouterr().err.strip() == top.INSTALL_HINT


def test_the_master_counts_only_when_http_is_on_and_prometheus_client_is_there(monkeypatch, caplog):
    from scheduler import master, settings

    on = settings.load({}, authkey="k" * 16)
    assert isinstance(master._metrics(on), Metrics)  # noqa: SLF001
    off = settings.load({"SCHEDULER_HTTP": ""}, authkey="k" * 16)
    assert type(master._metrics(off)) is NoMetrics  # noqa: SLF001
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    assert type(master._metrics(on)) is NoMetrics  # noqa: SLF001
    assert "pip install prometheus_client" in caplog.text


def test_missing_page_files_turn_http_off_not_the_master(world, monkeypatch, caplog):
    from scheduler import master
    from scheduler.web import api

    service, metrics = world

    def missing() -> dict:
        raise FileNotFoundError("static/index.html")

    monkeypatch.setattr(api, "load_assets", missing)
    journal = service._journal  # noqa: SLF001
    assert master._serve_http(("127.0.0.1", 0), service, journal, metrics) is None  # noqa: SLF001
    assert "cannot read the dashboard's files" in caplog.text

"""The master's dashboard in headless Chromium (Debian's chromium + chromium-driver, driven by
selenium), its JSON and /metrics, against a real master and slaves running a batch with
failures. The screenshot is saved under build/test-artifacts/ and its path printed."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path
from urllib.error import HTTPError

import cloudpickle
import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from scheduler import web
from scheduler.web import Response

from . import jobs
from .scheduler_procs import Cluster, dashboard_url, wait_until

cloudpickle.register_pickle_by_value(jobs)
pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
GOOD, BAD_SHELL, BAD_PYTHON = 24, 3, 2
# no traffic beyond loopback: a dead proxy for every other address, no background services
BROWSER_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--window-size=1280,1600", "--proxy-server=127.0.0.1:9", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
)  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A master with its dashboard on a free loopback port, and two slaves of 2 slots."""
    cluster = Cluster(tmp_path_factory.mktemp("dashboard"))
    master = cluster.start_master(SCHEDULER_HTTP="127.0.0.1:0")
    url = dashboard_url(master)
    for name in ("web-a", "web-b"):
        cluster.start_slave(name, concurrency=2)
    cluster.wait_slaves("web-a", "web-b")
    yield cluster, url
    cluster.stop()


@pytest.fixture(scope="module")
def browser():
    # no skip when they are missing: scripts/bootstrap.sh installs them for `make test`
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), (
        "apt-get install chromium chromium-driver (make test's scripts/bootstrap.sh does)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    yield driver
    driver.quit()


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read()
    except HTTPError as exc:
        return exc.code, exc.read()


def page_counts(driver) -> dict[str, int]:
    cells = driver.find_elements(By.CSS_SELECTOR, "[data-count]")
    return {c.get_attribute("data-count"): int(c.text.replace(",", "") or 0) for c in cells
            if c.text.replace(",", "").isdigit()}  # fmt: skip


def submit_batch(client) -> list:
    handles = [client.submit_shell(f"echo out-{i}; sleep 0.4", shell=True, name=f"ok-{i}")
               for i in range(GOOD)]  # fmt: skip
    handles += [client.submit_shell(f"echo bad-{i} >&2; exit 3", shell=True, name=f"bad-{i}")
                for i in range(BAD_SHELL)]  # fmt: skip
    handles += [client.apply_async(jobs.boom, (f"kaput-{i}",)) for i in range(BAD_PYTHON)]
    client.flush()
    return handles


def test_the_page_follows_a_batch_with_failures(site, browser, capsys):
    cluster, url = site
    wait = WebDriverWait(browser, 20, poll_frequency=0.1)
    browser.get(url)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#workers tr[data-worker]")) == 2)
    with cluster.client() as client:
        handles = submit_batch(client)
        seen = set()  # what the page said about succeeded jobs while they finished
        while not all(h.ready() for h in handles):
            seen.add(page_counts(browser).get("succeeded", 0))
            time.sleep(0.2)
        status = client.status()
        ok_info = client.job(handles[5].id)
        failed_info = client.job(handles[-1].id)
    assert len({v for v in seen if 0 < v < GOOD}) >= 2, f"the page did not move: {seen}"
    wait.until(lambda d: page_counts(d) == status["counts"])  # the next poll catches up
    assert status["counts"]["failed"] == BAD_SHELL + BAD_PYTHON

    rows = browser.find_elements(By.CSS_SELECTOR, "#workers tr[data-worker]")
    assert {r.get_attribute("data-worker") for r in rows} == {"web-a", "web-b"}
    assert all(r.find_elements(By.TAG_NAME, "td")[2].text == "2" for r in rows)

    chart = browser.find_element(By.ID, "chart")
    wait.until(lambda d: int(chart.get_attribute("data-finished")) == GOOD + BAD_SHELL + BAD_PYTHON)
    assert int(chart.get_attribute("data-points")) >= 1
    assert len(chart.find_elements(By.TAG_NAME, "polyline")) == 3

    failures = browser.find_element(By.ID, "failures").text
    assert "exited with 3" in failures and "ValueError: kaput-" in failures
    assert "stderr: bad-" in failures
    assert failed_info["error"].strip().splitlines()[-1] in failures

    box = browser.find_element(By.ID, "job-id")
    box.send_keys(str(ok_info["id"]))
    box.submit()
    wait.until(
        lambda d: d.find_element(By.ID, "job").get_attribute("data-job") == str(ok_info["id"])
    )
    assert browser.find_element(By.ID, "job-stdout").text.strip() == "out-5"
    assert "succeeded" in browser.find_element(By.ID, "job-fields").text

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    browser.save_screenshot(str(shot))
    with capsys.disabled():  # shown in every run, not only when the test fails
        print(f"\ndashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert cluster.authkey not in browser.page_source


def test_the_page_keeps_updating_on_its_own(site, browser):
    browser.get(site[1])
    body = browser.find_element(By.TAG_NAME, "body")
    first = WebDriverWait(browser, 10).until(lambda d: int(body.get_attribute("data-updates") or 0))
    time.sleep(2.2)
    assert int(body.get_attribute("data-updates")) >= first + 1  # polls at most every 2 s


def test_metrics_parse_and_match_status(site):
    cluster, url = site
    with cluster.client() as client:
        client.map(jobs.square, range(5), chunksize=1)
        wait_until(lambda: client.status()["counts"]["running"] == 0, what="an idle master")
        status = client.status()
    code, body = fetch(url + "metrics")
    assert code == 200
    samples = [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]

    def one(name: str, **labels: str) -> float:
        return next(
            s.value
            for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    for state, count in status["counts"].items():
        assert one("scheduler_jobs", state=state) == count
    for state in ("succeeded", "failed", "cancelled"):  # a fresh master: all finished here
        assert one("scheduler_jobs_finished_total", state=state) == status["counts"][state]
    assert one("scheduler_jobs_submitted_total") == status["total"]
    assert one("scheduler_queue_depth") == status["counts"]["queued"]
    assert one("scheduler_workers_connected") == len(status["workers"])
    assert one("scheduler_slots") == sum(w["concurrency"] for w in status["workers"])
    assert one("scheduler_slots_busy") == 0
    ran = status["counts"]["succeeded"] + status["counts"]["failed"]
    assert one("scheduler_job_run_seconds_count") == ran
    assert one("scheduler_journal_commit_seconds_count") > 0


def test_json_endpoints_serve_jobs_and_never_the_key(site):
    cluster, url = site
    with cluster.client() as client:
        client.apply_async(jobs.square, (4,)).get(20)
        newest = client.jobs(limit=1)[0]
    code, body = fetch(url + "api/jobs?state=failed&limit=2")
    failed = json.loads(body)
    assert code == 200 and len(failed) == 2 and {j["state"] for j in failed} == {"failed"}
    code, body = fetch(url + f"api/jobs/{newest['id']}")
    assert code == 200 and json.loads(body)["id"] == newest["id"]
    assert fetch(url + "api/jobs/999999")[0] == 404
    pages = ["", "app.js", "app.css", "api/status", "api/jobs?limit=1000", "metrics",
             f"api/jobs/{newest['id']}"]  # fmt: skip
    for page in pages:
        code, body = fetch(url + page)
        assert code == 200, page
        assert cluster.authkey.encode() not in body, page


def test_bad_requests_cost_the_master_nothing(site):
    cluster, url = site
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    garbage = (
        b"\x00\xff garbage\r\n\r\n",
        b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    )
    for bad in garbage:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(bad)
            sock.recv(1024)
    half = socket.create_connection((host, int(port)), timeout=5)  # opens and says nothing
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("POST", "/api/status", body=b"{}")
    assert conn.getresponse().status == 501  # read-only: no other method is served
    conn.close()
    half.close()
    assert fetch(url + "api/status")[0] == 200
    assert cluster.master is not None and cluster.master.popen.poll() is None
    assert "Traceback" not in cluster.master.log()


def test_a_taken_port_is_one_line_and_the_master_runs_on(site, tmp_path):
    taken = site[1].removeprefix("http://").rstrip("/")
    other = Cluster(tmp_path)
    try:
        master = other.start_master(SCHEDULER_HTTP=taken)
        master.wait_log("dashboard and /metrics off")
        with other.client() as client:
            assert client.status()["counts"]["queued"] == 0
        lines = [line for line in master.log().splitlines() if "cannot listen" in line]
        assert len(lines) == 1 and f"cannot listen on {taken}" in lines[0]
        assert "SCHEDULER_HTTP" in lines[0] and "Traceback" not in master.log()
    finally:
        other.stop()


class BrokenApi:
    """A view with a bug in it, for the server's sake."""

    def get(self, path: str, host: str):
        if path == "/boom":
            raise KeyError("a bug in a view")
        return Response(200, "text/plain", b"fine")


def test_a_failing_view_is_a_500_and_the_server_serves_on(caplog):
    served = web.start(("127.0.0.1", 0), BrokenApi())  # type: ignore[arg-type]
    assert served is not None
    try:
        assert fetch(served.url + "boom")[0] == 500
        assert fetch(served.url + "fine") == (200, b"fine")
        assert "GET /boom failed" in caplog.text
    finally:
        served.close()


def test_a_port_in_use_makes_start_return_none_with_one_line(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = taken.getsockname()
        assert web.start(address, BrokenApi()) is None  # type: ignore[arg-type]
    (record,) = [r for r in caplog.records if r.name == "scheduler.web"]
    assert "cannot listen on 127.0.0.1" in record.getMessage() and not record.exc_info


def test_failures_are_still_listed_after_a_master_restart(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_master(SCHEDULER_HTTP="127.0.0.1:0")
        cluster.start_slave("s1")
        cluster.wait_slaves("s1")
        with cluster.client() as client:
            handle = client.submit_shell("echo nope >&2; exit 4", shell=True, name="doomed")
            handle.wait(20)
        master = cluster.restart_master(SCHEDULER_HTTP="127.0.0.1:0")
        code, body = fetch(dashboard_url(master) + "api/status")
        (failure,) = json.loads(body)["failures"]
        assert (failure["name"], failure["exit_code"], failure["stderr"]) == ("doomed", 4, "nope\n")
    finally:
        cluster.stop()

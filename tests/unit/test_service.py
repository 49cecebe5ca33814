"""The service over a real journal (a temp dir), without sockets: reservations and submits."""

from __future__ import annotations

import time

import pytest

from scheduler import service as service_module
from scheduler.board import Board
from scheduler.errors import SchedulerError, SubmitError
from scheduler.job import JobSpec, State
from scheduler.journal import Journal
from scheduler.progress import Progress
from scheduler.protocol import VERSION, Lease
from scheduler.service import Service


def shell(*argv: str) -> JobSpec:
    return JobSpec("shell", (list(argv), False))


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path)
    yield j
    j.close()


def make(journal: Journal, **board: object) -> Service:
    return Service(Board(**board), journal, {}, Progress(time.time))  # type: ignore[arg-type]


def test_lease_numbers_are_reserved_ahead_and_never_waited_for_under_the_lock(
    journal, monkeypatch
):
    monkeypatch.setattr(service_module, "LEASE_BLOCK", 4)
    svc = make(journal, first_lease=1, lease_ceiling=4)
    svc.register("w", version=VERSION)
    svc.submit([shell("true") for _ in range(10)])
    first, _ = svc.lease("w", 10)
    assert [Lease._make(x).lease for x in first] == [1, 2, 3, 4]  # the saved ceiling
    assert svc.lease("w", 10)[0] == []
    svc.tick()  # the reservation written meanwhile is now saved: the ceiling moves
    deadline = time.monotonic() + 5
    while svc._board.lease_ceiling == 4 and time.monotonic() < deadline:
        svc.tick()
    more, _ = svc.lease("w", 10)
    assert [Lease._make(x).lease for x in more] == [5, 6, 7, 8]
    assert journal.load(10)[2].max_lease >= 8  # a restart starts above every lease used


def test_a_submit_the_journal_cannot_save_is_refused_and_leaves_nothing(journal):
    svc = make(journal)
    journal._db.execute("PRAGMA query_only = ON")
    with pytest.raises(SubmitError, match="journal cannot write.*nothing was queued"):
        svc.submit([shell("true")])
    assert svc.status()["counts"]["queued"] == 0 and svc.status()["total"] == 0
    journal._db.execute("PRAGMA query_only = OFF")
    deadline = time.monotonic() + 10
    while journal.failing and time.monotonic() < deadline:
        time.sleep(0.05)
    assert svc.submit([shell("true")]) == (2, 1)  # ids may skip; nothing came back


def test_an_empty_submit_refused_by_a_failing_journal_drops_nothing_of_another_caller(
    journal,
):
    """An empty submit (``map(f, [])``) that meets a failing journal abandons its own entry
    only: given the ticket of a report in flight, it had dropped that report's outcome,
    whose slave was then told it was saved."""
    import threading

    from scheduler.errors import JournalError

    svc = make(journal)
    svc.register("w", version=VERSION)
    svc.submit([tuple(JobSpec("shell", (["true"], False)))])
    (wire,), _ = svc.lease("w", 1)
    lease = Lease._make(wire)
    write, entered = journal._write, threading.Event()

    def slow_write(entries):  # the report's write is under way when the submit comes
        entered.set()
        time.sleep(0.3)
        return write(entries)

    journal._write = slow_write  # type: ignore[method-assign]
    journal._db.execute("PRAGMA query_only = ON")  # and it fails (the disk is full)
    replies: list = []
    reporter = threading.Thread(
        target=lambda: replies.append(svc.report("w", [(lease.job_id, lease.lease, True)])))
    reporter.start()
    assert entered.wait(10)
    with pytest.raises((SubmitError, JournalError)):
        svc.submit([], {})
    journal._write = write  # type: ignore[method-assign]
    journal._db.execute("PRAGMA query_only = OFF")  # room again: the retry saves it
    reporter.join(15)
    assert replies and replies[0].accepted == 1
    assert journal.fetch(lease.job_id).state is State.SUCCEEDED


def test_a_client_refuses_a_master_of_another_protocol_in_one_line():
    from scheduler.client import _check_protocol
    from scheduler.errors import ConnectError

    _check_protocol({"version": "x", "protocol": VERSION}, ("m", 1))  # same: fine
    for ping in ({"version": "0.1.0"}, {"version": "9.0", "protocol": VERSION + 1}):
        with pytest.raises(ConnectError) as refused:
            _check_protocol(ping, ("m", 8888))
        message = str(refused.value)
        assert "\n" not in message and "m:8888 speaks protocol" in message


def test_a_slave_of_another_protocol_is_refused_at_register(journal):
    svc = make(journal)
    with pytest.raises(SchedulerError, match="protocol"):
        svc.register("old", version=VERSION - 1)
    assert svc.status()["workers"] == []


def test_queued_jobs_beyond_the_window_wait_in_the_journal_and_stay_reachable(journal):
    svc = Service(Board(queue_window=5), journal, {}, Progress(time.time))
    first, n = svc.submit([shell("true", str(i)) for i in range(12)])
    assert (first, n) == (1, 12)
    status = svc.status()
    assert status["in_memory"] == 5 and status["counts"]["queued"] == 12
    # a cold job can be read, listed, watched and cancelled
    assert svc.get(9)["state"] == "queued"
    assert [j["id"] for j in svc.jobs("queued", limit=3)] == [12, 11, 10]
    assert svc.cancel(11)["state"] == "cancelled"
    assert svc.watch("s1", [12]) == 1
    # a restarted master loads the window; the rest stays cold
    jobs, _, stored = journal.load(10, queue_window=5)
    assert sorted(j.id for j in jobs if j.state is State.QUEUED) == [1, 2, 3, 4, 5]
    assert stored.cold == ((6, 12, 0),)
    # a slave gets every job but the cancelled one, in order, as the tick reads them back
    svc.register("w", version=VERSION)
    handed: list[int] = []
    for _ in range(10):
        got = [Lease._make(t) for t in svc.lease("w", 100).leases]
        handed += [x.job_id for x in got]
        svc.report("w", [(x.job_id, x.lease, True) for x in got])
        svc.tick()
    assert handed == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
    assert svc.collect("s1", 0) == [(12, "succeeded", "", None, None)]


def test_queued_jobs_in_listings_and_lookups_say_why_they_wait(journal):
    svc = Service(Board(queue_window=2), journal, {}, Progress(time.time))
    svc.submit([shell("true", str(i)) for i in range(3)])
    assert svc.get(1)["reason"] == "no slave connected"
    svc.register("w", concurrency=2, version=VERSION)
    svc.lease("w", 1)
    assert svc.get(2)["reason"] == "next in line for a free slot"
    assert "reason" not in svc.get(1)  # running: nothing to explain
    listed = {j["id"]: j.get("reason") for j in svc.jobs()}
    assert listed[1] is None and listed[3].startswith("waiting in the journal")


def test_urgent_jobs_beyond_the_window_come_first_and_a_restart_keeps_it_so(journal):
    svc = Service(Board(queue_window=4), journal, {}, Progress(time.time))
    svc.submit([shell("true", f"low{i}") for i in range(8)])
    urgent_first, _ = svc.submit([JobSpec("shell", (["true"], False), f"urgent{i}", priority=9)
                                  for i in range(3)])  # fmt: skip
    assert svc.status()["in_memory"] == 4  # the urgent ones wait cold, at their priority
    svc.tick()  # ... and are read back at once (with the SQLite journal, by priority)
    svc.register("w", version=VERSION)
    got = [Lease._make(t) for t in svc.lease("w", 4).leases]
    assert [x.job_id for x in got] == [urgent_first, urgent_first + 1, urgent_first + 2, 1]
    assert [x.priority for x in got] == [9, 9, 9, 0]
    # a restarted master loads the highest priorities first
    svc.submit([JobSpec("shell", (["true"], False), "late", priority=5)])
    svc.tick()  # (what runs is saved as running by the periodic write)
    journal.wait(journal.append([]))  # (which the journal's thread makes: in order)
    jobs, _, stored = journal.load(10, queue_window=2)
    assert [j.id for j in jobs if j.state is State.QUEUED] == [urgent_first + 3, 2]
    assert stored.cold == ((3, 8, 0),)


# -- long-polls parked in the master, over real sockets ---------------------------------


@pytest.fixture
def served(journal):
    """The service published on a loopback port in this process, and a way to connect."""
    import secrets
    import threading

    from scheduler import transport

    svc = make(journal)
    key = secrets.token_bytes(16)
    server = transport.serve(svc, ("127.0.0.1", 0), key)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = server.address
    proxies = []

    def connect(raw: bool = False):
        if raw:  # a bare connection speaking the manager's protocol, to close at will
            from multiprocessing import managers

            conn = transport._client(address, key)
            managers.dispatch(conn, None, "accept_connection", ("test",))
            return conn
        proxy = transport.connect(address, key)
        proxies.append(proxy)
        return proxy

    yield svc, connect
    svc.close()


def call_in_thread(method, *args):
    """Call ``method`` in a thread of its own; a function that waits for what it returned."""
    import queue
    import threading

    box: queue.SimpleQueue = queue.SimpleQueue()

    def run():
        try:
            box.put((True, method(*args)))
        except Exception as exc:
            box.put((False, exc))

    threading.Thread(target=run, daemon=True).start()

    def result(timeout=10.0):
        ok, value = box.get(timeout=timeout)
        if not ok:
            raise value
        return value

    result.box = box  # type: ignore[attr-defined]
    return result


def parked(svc, what: str, key: str) -> None:
    """Wait until the master holds the long-poll of ``key`` (a slave, or a session)."""
    polls = svc._leasing if what == "lease" else svc._collecting
    deadline = time.monotonic() + 10
    while key not in polls:
        assert time.monotonic() < deadline, f"no {what} of {key} parked"
        time.sleep(0.005)


def test_a_parked_lease_gets_a_job_submitted_later_and_a_parked_collect_its_outcome(served):
    """Neither call holds a thread of the master while it waits: the submit answers the
    slave's lease, the slave's report answers the client's collect."""
    svc, connect = served
    slave, client = connect(), connect()
    slave.register("w", "h", 1, 1, (), VERSION)
    client.watch("s1", [])  # the session exists
    lease = call_in_thread(slave.lease, "w", 1, 10.0)
    collect = call_in_thread(client.collect, "s1", 10.0)
    parked(svc, "lease", "w")
    parked(svc, "collect", "s1")
    first, count = client.submit([tuple(shell("true"))], {}, "s1")
    leases, _ = lease()
    (got,) = [Lease._make(t) for t in leases]
    assert got.job_id == first and count == 1
    slave.report("w", [(got.job_id, got.lease, True)])
    assert [o[:2] for o in collect()] == [(first, "succeeded")]
    assert not svc._leasing and not svc._collecting


def test_a_slave_asking_again_ends_its_old_poll_and_a_stop_answers_every_poll(served):
    svc, connect = served
    old, new, client = connect(), connect(), connect()
    old.register("w", "h", 1, 1, (), VERSION)
    client.watch("s1", [])
    first = call_in_thread(old.lease, "w", 1, 10.0)
    parked(svc, "lease", "w")
    second = call_in_thread(new.lease, "w", 1, 10.0)
    assert first(timeout=5).leases == []  # at once: that connection is the slave's old one
    collect = call_in_thread(client.collect, "s1", 10.0)
    parked(svc, "collect", "s1")
    svc.close()
    assert second(timeout=5).leases == [] and collect(timeout=5) == []


def test_a_poll_ends_empty_when_its_time_is_up_and_one_of_a_vanished_peer_is_harmless(served):
    svc, connect = served
    slave, gone, client = connect(), connect(), connect()
    slave.register("w", "h", 1, 1, (), VERSION)
    gone.register("x", "h", 1, 1, (), VERSION)
    client.watch("s1", [])
    started = time.monotonic()
    short = call_in_thread(slave.lease, "w", 1, 0.3)
    parked(svc, "lease", "w")
    for _ in range(20):  # the master's ticks end it
        svc.tick()
        time.sleep(0.05)
    assert short().leases == [] and time.monotonic() - started >= 0.3
    raw = connect(raw=True)
    raw.send((gone._token.id, "lease", ("x", 1, 10.0), {}))
    parked(svc, "lease", "x")
    raw.close()  # the slave's connection is gone with its call parked
    first, _ = client.submit([tuple(shell("true"))], {}, "s1")  # answers x's poll: lost
    assert svc._board.jobs[first].worker == "x"  # handed to x, whose slave never got it
    svc.heartbeat("x", ((), (), 1, False))  # x says it holds nothing: back in line
    assert svc._board.jobs[first].state is State.QUEUED
    again = call_in_thread(slave.lease, "w", 1, 10.0)
    assert [Lease._make(t).job_id for t in again().leases] == [first]


@pytest.mark.parametrize("wait", [float("nan"), float("inf"), -1.0, 1e300])
def test_a_poll_waits_at_most_max_wait_whatever_it_asks(served, wait):
    svc, connect = served
    slave = connect()
    slave.register("w", "h", 1, 1, (), VERSION)
    lease = call_in_thread(slave.lease, "w", 1, wait)
    if wait == -1.0:
        assert lease().leases == []  # no wait at all
        return
    parked(svc, "lease", "w")
    assert svc._leasing["w"].deadline == pytest.approx(time.time() + service_module.MAX_WAIT, abs=5)
    svc._leasing["w"].deadline = time.time()  # as if MAX_WAIT passed: the next tick ends it
    svc.tick()
    assert lease().leases == []


def test_a_slave_that_stops_reading_holds_up_no_other_call(served, monkeypatch):
    """The answer to a parked lease is sent by the call that brings the work: a slave that
    takes none of it for SEND_SECONDS is cut off, and that call (here a submit) returns."""
    from scheduler import transport

    monkeypatch.setattr(transport, "SEND_SECONDS", 0.5)
    svc, connect = served
    slave, client = connect(), connect()
    slave.register("w", "h", 1, 1, (), VERSION)
    raw = connect(raw=True)  # accepted after the patch: its sends time out at 0.5 s
    raw.send((slave._token.id, "lease", ("w", 1, 10.0), {}))
    parked(svc, "lease", "w")
    big = ("python", ("d1", b"x" * (64 << 20)), "f", None, None, None, None, None, None, None,
           None, None)  # fmt: skip
    submit = call_in_thread(client.submit, [big], {"d1": b"body"}, "s1")
    first, count = submit(timeout=60)  # without the cut: blocked in the send for good
    assert count == 1 and client.ping()["protocol"] == VERSION
    with pytest.raises((EOFError, OSError)):
        for _ in range(1000):  # the slave reads at last: what came is cut short
            raw.recv_bytes()
    raw.close()


def test_a_slave_registering_again_ends_the_poll_its_earlier_process_left(served):
    svc, connect = served
    gone, again = connect(), connect()
    gone.register("w", "h", 1, 1, (), VERSION)
    lease = call_in_thread(gone.lease, "w", 1, 10.0)
    parked(svc, "lease", "w")
    again.register("w", "h", 2, 1, (), VERSION)  # a new process under the same name
    assert lease(timeout=5).leases == []
    first, _ = again.submit([tuple(shell("true"))], {}, "s1")
    got = call_in_thread(again.lease, "w", 1, 10.0)
    assert [Lease._make(t).job_id for t in got().leases] == [first]


def test_a_call_for_an_object_of_an_earlier_master_names_id_to_obj(served):
    """transport.Link tells a proxy from before a master restart by "id_to_obj" in the
    error; the message says it, not only the source line a traceback may lack."""
    svc, connect = served
    raw = connect(raw=True)
    raw.send(("7f0000000000", "ping", (), {}))
    kind, text = raw.recv()
    raw.close()
    assert kind == "#TRACEBACK" and "id_to_obj" in text.strip().splitlines()[-1]


def test_calls_and_parked_answers_are_pickled_plainly_and_a_stdlib_peer_is_served(
    served, monkeypatch
):
    """Every connection of the wire sends with plain pickle (protocol.PlainConnection):
    the stdlib's ForkingPickler costs five times more per message. A peer still on the
    stdlib's connection (an older slave) is served all the same."""
    from multiprocessing import connection, reduction

    from scheduler.protocol import PlainConnection, plain

    svc, connect = served
    slave, client, raw = connect(), connect(), connect(raw=True)
    assert isinstance(raw, PlainConnection)
    with pytest.raises(TypeError):  # only a stdlib Connection (never a TLS one) is changed
        plain(raw)

    def forbidden(*args, **kwargs):
        raise AssertionError("a message went through ForkingPickler")

    monkeypatch.setattr(reduction.ForkingPickler, "dumps", classmethod(forbidden))
    slave.register("w", "h", 1, 1, (), VERSION)
    lease = call_in_thread(slave.lease, "w", 1, 10.0)
    parked(svc, "lease", "w")
    first, _ = client.submit([tuple(shell("true"))], {}, None)
    assert [t[0] for t in lease()[0]] == [first]  # answered by the submit's thread
    monkeypatch.undo()
    raw.__class__ = connection.Connection
    raw.send((slave._token.id, "ping", (), {}))
    kind, answer = raw.recv()
    assert kind == "#RETURN" and answer["protocol"] == VERSION
    raw.close()

"""The role table: which certificate may make which call (pure; no sockets)."""

from __future__ import annotations

import logging

import pytest

from scheduler import transport
from scheduler.transport import (
    CLIENT_CALLS,
    EVERY_ROLE,
    EXPOSED,
    WORKER_CALLS,
    Refusals,
    _Guarded,
    refusal,
)

W1, W2, C1, M = ("w1", "worker"), ("w2", "worker"), ("c1", "client"), ("m", "master")
SLAVE_CALLS = {"register": ("w1", "h", 1, 2, (), 3), "lease": ("w1", 4, 5.0, 1),
               "report": ("w1", [], None), "release": ("w1", []), "heartbeat": ("w1", ()),
               "goodbye": ("w1",)}  # fmt: skip
STDLIB_OPEN = ("create", "incref", "decref", "accept_connection", "dummy", "get_methods")
STDLIB_MASTER = ("shutdown", "debug_info", "number_of_objects")


def test_every_exposed_call_has_a_decided_role() -> None:
    # a new service method must be put in a role's table (or stay the master's, on purpose)
    master_only: set[str] = set()
    decided = set(WORKER_CALLS) | CLIENT_CALLS | (EVERY_ROLE & set(EXPOSED)) | master_only
    assert set(EXPOSED) == decided
    assert set(WORKER_CALLS) == {*SLAVE_CALLS, "mark", "ping"}
    assert CLIENT_CALLS == {"submit", "collect", "watch", "get", "jobs", "cancel", "status",
                            "ping", "marks", "chaos", "prune"}  # fmt: skip


def test_a_worker_makes_slave_calls_under_its_own_name_only() -> None:
    for method, args in SLAVE_CALLS.items():
        assert refusal(W1, method, args) is None
        assert refusal(W2, method, args) == (
            f"{method} for worker 'w1' needs that worker's certificate; "
            "this connection holds worker 'w2'"
        )
    assert refusal(W1, "mark", ("run", 3, "w1")) is None  # the name is mark's third argument
    assert refusal(W2, "mark", ("run", 3, "w1")) is not None
    assert refusal(W1, "mark", ("run", 3), {"worker": "w1"}) is None  # or a keyword
    assert refusal(W1, "heartbeat", (), {"worker": "w2"}) is not None
    assert refusal(W1, "goodbye", ()) is not None  # no name at all is not its name
    assert refusal(W1, "ping") is None


def test_a_worker_cannot_make_client_or_master_calls() -> None:
    assert refusal(W1, "submit", ([],)) == (
        "submit needs a client certificate; this connection holds worker 'w1'"
    )
    for method in CLIENT_CALLS - {"ping"}:
        assert refusal(W1, method) == (
            f"{method} needs a client certificate; this connection holds worker 'w1'"
        )
    for method in STDLIB_MASTER:
        assert refusal(W1, method) == (
            f"{method} needs the master's certificate; this connection holds worker 'w1'"
        )


def test_a_client_cannot_make_slave_calls() -> None:
    for method in CLIENT_CALLS:
        assert refusal(C1, method, ("anything",)) is None
    for method, args in SLAVE_CALLS.items():
        assert refusal(C1, method, ("c1", *args[1:])) == (
            f"{method} needs a worker certificate; this connection holds client 'c1'"
        )
    assert refusal(C1, "mark", ("run", 1, "c1")) is not None


def test_the_master_may_call_everything_and_everyone_the_stdlibs_proxy_requests() -> None:
    for method in (*EXPOSED, *STDLIB_OPEN, *STDLIB_MASTER, "__repr__", "#GETVALUE"):
        assert refusal(M, method, ("someone-else",)) is None
    for identity in (W1, C1, ("x", "admin"), ("y", "")):
        for method in (*STDLIB_OPEN, "refuse"):
            assert refusal(identity, method) is None
        for method in (*STDLIB_MASTER, "__repr__", "#GETVALUE", "no_such_call"):
            assert refusal(identity, method) is not None


def test_a_certificate_of_no_known_role_may_call_nothing() -> None:
    assert refusal(("x", "admin"), "ping") == (
        "ping needs a worker or client certificate; "
        "this connection holds a certificate of role 'admin' ('x')"
    )
    assert refusal(("y", ""), "status") == (
        "status needs a client certificate; this connection holds a role-less certificate ('y')"
    )


class FakeConn:
    """What serve_client reads requests from and answers on."""

    def __init__(self, *requests: object) -> None:
        self.requests = list(requests)
        self.sent: list[object] = []
        self.closed = False

    def recv(self) -> object:
        return self.requests.pop(0)

    def send(self, obj: object) -> None:
        self.sent.append(obj)

    def close(self) -> None:
        self.closed = True


def test_guarded_connection_turns_a_forbidden_call_into_refuse() -> None:
    noted: list[tuple[tuple[str, str], str]] = []
    conn = FakeConn(
        ("7f", "heartbeat", ["w1", ()], {}),
        ("7f", "submit", ([],), {}),
        ("7f", "heartbeat", ("w2", ()), {}),
        ("7f", "lease", 42, {}),  # arguments that are not a sequence
        "not a call at all",
    )
    guarded = _Guarded(conn, W1, lambda _, who, method: noted.append((who, method)))  # type: ignore[arg-type]
    assert guarded.recv() == ("7f", "heartbeat", ("w1", ()), {})
    why = "submit needs a client certificate; this connection holds worker 'w1'"
    assert guarded.recv() == ("7f", "refuse", (why,), {})
    other = "heartbeat for worker 'w2' needs that worker's certificate; this connection holds "
    assert guarded.recv() == ("7f", "refuse", (other + "worker 'w1'",), {})
    malformed = "a malformed call; this connection holds worker 'w1'"
    assert guarded.recv() == ("7f", "refuse", (malformed,), {})
    assert guarded.recv() == "not a call at all"  # the stdlib answers that one itself
    assert noted == [(W1, "submit"), (W1, "heartbeat"), (W1, "lease")]
    guarded.send(("#RETURN", 1))
    guarded.close()
    assert conn.sent == [("#RETURN", 1)] and conn.closed


def test_refusals_are_counted_and_logged_at_most_once_a_minute_unless_forced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    refusals = Refusals(clock=lambda: now[0], what="call(s)", hint="the hint")
    with caplog.at_level(logging.WARNING, logger=transport.__name__):
        refusals.note("submit by worker 'w1'", "10.0.0.7:4000")
        refusals.note("submit by worker 'w1'", "10.0.0.7:4001")
        refusals.note("register by client 'c1'", "10.0.0.8:4002")
        refusals.flush()
        now[0] += 10
        refusals.flush(force=True)
        refusals.flush(force=True)  # nothing new: nothing said
    assert [r.getMessage() for r in caplog.records] == [
        "refused 1 call(s) (1 submit by worker 'w1') from 10.0.0.7; the hint",
        "refused 2 call(s) (1 register by client 'c1', 1 submit by worker 'w1') from "
        "10.0.0.7, 10.0.0.8; the hint",
    ]

from __future__ import annotations

import pytest

from scheduler.errors import ConfigError, JobFailed, SubmitError
from scheduler.job import JobSpec, validate
from scheduler.settings import Secret, load, parse_address

KEY = "k" * 20


@pytest.mark.parametrize(
    "spec, message",
    [
        (("perl", ("x", False), "", None, None, None), "unknown job kind 'perl'"),
        (("shell", ([], False), "", None, None, None), "empty command"),
        (("shell", ("  ", True), "", None, None, None), "empty shell command"),
        (("shell", (["ls", 3], False), "", None, None, None), "non-empty strings"),
        (("python", ("nope", b""), "", None, None, None), "not sent with it"),
        (("shell", (["ls"], False), "", None, -1, None), "timeout must be a number of seconds"),
        (("shell", (["ls"], False), "", None, float("inf"), None), "at most 31536000"),
        (("shell", (["ls"], False), "", None, float("nan"), None), "timeout must be"),
        (("shell", (["ls"], False), "", None, True, None), "timeout must be"),
        (("shell", (["ls"], False), "", None, None, 0), "max_attempts must be"),
        (("shell", (["ls"], False), "", {"a": 1}, None, None), "labels must map"),
        ("garbage", "malformed job spec"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(SubmitError, match=message):
        validate(spec, {})


def test_good_specs_pass():
    assert validate(("shell", (["ls"], False), "n", {"a": "b"}, 5, 2), {}).kind == "shell"
    assert validate(("python", ("d", b"x"), "", None, None, None), {"d": b"f"}).name == ""
    assert isinstance(validate(JobSpec("shell", ("ls | wc", True)), {}), JobSpec)


def test_settings_from_environment_and_overrides():
    env = {"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_BIND": "0.0.0.0:9000",
           "SCHEDULER_CONCURRENCY": "3", "SCHEDULER_LEASE_SECONDS": "2.5"}  # fmt: skip
    cfg = load(env, concurrency=5)
    assert cfg.bind == ("0.0.0.0", 9000) and cfg.concurrency == 5 and cfg.lease_seconds == 2.5
    assert cfg.authkey.reveal() == KEY.encode()
    assert KEY not in repr(cfg) and KEY not in str(cfg.authkey)


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "SCHEDULER_AUTHKEY is not set"),
        ({"SCHEDULER_AUTHKEY": "short"}, "too short"),
        (
            {"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_BIND": "nohost"},
            "SCHEDULER_BIND: expected host:port",
        ),
        (
            {"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_CONCURRENCY": "two"},
            "SCHEDULER_CONCURRENCY: expected a positive integer, got 'two'",
        ),
        (
            {"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_LEASE_SECONDS": "0"},
            "SCHEDULER_LEASE_SECONDS: expected a positive number of seconds, got '0'",
        ),
        ({"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_LEASE_SECONDS": "inf"}, "expected a positive"),
        (
            {"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_MASTER": "http://10.0.0.5:8888/"},
            "SCHEDULER_MASTER: expected host:port without a scheme.*write '10.0.0.5:8888'",
        ),
    ],
)
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load(env)
    assert KEY not in str(exc.value)


def test_authkey_from_a_file(tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    assert load({"SCHEDULER_AUTHKEY_FILE": str(keyfile)}).authkey.reveal() == KEY.encode()
    # the variable itself wins over the file
    assert (
        load(
            {"SCHEDULER_AUTHKEY": "z" * 16, "SCHEDULER_AUTHKEY_FILE": str(keyfile)}
        ).authkey.reveal()
        == b"z" * 16
    )
    with pytest.raises(ConfigError, match="SCHEDULER_AUTHKEY_FILE: cannot read"):
        load({"SCHEDULER_AUTHKEY_FILE": str(tmp_path / "missing")})
    keyfile.write_text("short\n")
    with pytest.raises(ConfigError, match="too short") as exc:
        load({"SCHEDULER_AUTHKEY_FILE": str(keyfile)})
    assert "short" not in str(exc.value).replace("too short", "")


def test_addresses():
    assert parse_address("[::1]:80", "x") == ("::1", 80)
    with pytest.raises(ConfigError):
        parse_address("host:99999", "x")


def test_secret_never_shows():
    assert "abc" not in repr(Secret(b"abcdefabcdefabcdef")) + str(Secret(b"abcdefabcdefabcdef"))


def test_job_failed_message():
    assert str(JobFailed(3, "failed", "exited with 2\n", 2)) == "job 3 failed: exited with 2"


def test_a_misspelled_variable_gets_one_warning_with_the_closest_name(caplog):
    load({"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_CONCURENCY": "1", "SCHEDULER_QWERTYUIOP": "1"})
    assert caplog.messages == [
        "SCHEDULER_CONCURENCY is not a setting and is ignored; did you mean SCHEDULER_CONCURRENCY?",
        "SCHEDULER_QWERTYUIOP is not a setting and is ignored; see the README's settings table",
    ]


def test_the_http_address_can_be_turned_off():
    assert load({"SCHEDULER_AUTHKEY": KEY}).http == ("127.0.0.1", 8889)
    assert load({"SCHEDULER_AUTHKEY": KEY, "SCHEDULER_HTTP": ""}).http is None


def test_a_plain_python_call_is_taken_as_the_tuple_it_came_as():
    """The common spec travels as a plain tuple (protocol: per-job messages) and is read
    by position, never named again; anything else is still checked field by field."""
    from scheduler.job import AFTER, ARRAY, validate

    spec = ("python", ("d1", b"args"), "f", None, None, None, None, None, None, None, None,
            None)  # fmt: skip
    assert validate(spec, {"d1": b"body"}) is spec
    assert spec[AFTER] is None and spec[ARRAY] is None
    with pytest.raises(SubmitError, match="not sent with it"):
        validate(spec, {})
    late = spec[:AFTER] + ((3, 1, 3),) + spec[AFTER + 1 :]
    checked = validate(late, {"d1": b"body"})
    assert checked is not late and checked[AFTER] == (1, 3)  # the slow path: sorted, unique

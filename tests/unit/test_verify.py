"""How `scheduler verify` accounts for jobs, from their marks (pure, no cluster)."""

from __future__ import annotations

from scheduler.verify import Report, _account


class Handle:
    def __init__(self, state: str | None) -> None:
        self.state = state

    def ready(self) -> bool:
        return self.state is not None


def test_every_job_is_counted_once_in_the_right_row():
    handles = [Handle("succeeded") for _ in range(5)] + [Handle("failed"), Handle(None)]
    marks = [
        (0, "a", 1.0),
        (1, "dead", 1.0), (1, "b", 9.0),  # its slave was killed: ran again, expected
        (2, "a", 1.0), (2, "b", 2.0),  # ran twice although nothing killed "a"
        (3, "dead", 1.0), (3, "a", 12.0),
        # item 4 succeeded without any mark: lost (the mark is the witness)
        (5, "a", 1.0), (6, "b", 1.0),
    ]  # fmt: skip
    report = Report(jobs=7, seconds=3, killed="dead")
    _account(report, handles, marks, killed_at=5.0)
    assert report.once == [0]
    assert report.rerun_after_kill == [1, 3]
    assert report.twice_on_healthy == [2]
    assert report.lost == [4, 5, 6]
    assert report.moved_after == 4.0 and not report.ok


def test_a_clean_run_is_ok():
    report = Report(jobs=2, seconds=3, killed="dead")
    _account(report, [Handle("succeeded")] * 2, [(0, "a", 1.0), (1, "b", 1.0)], killed_at=None)
    assert report.ok and report.once == [0, 1]
    assert dict(report.rows())["lost"] == "0"

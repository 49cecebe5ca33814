"""``scheduler top``: a live terminal view of a master: counts, rate, ETA, and what each
slave runs, redrawn every second until Ctrl-C.

It needs ``rich``, which comes with the ``deploy`` extra and is not in the scheduler's
images: imported only here, when the view starts.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any, Protocol

from .errors import SchedulerError

INSTALL_HINT = "scheduler top needs rich: pip install 'scheduler-kit[deploy]'"
RATE_WINDOW = 10.0  # seconds the rate is averaged over
LOOKUPS_PER_FRAME = 20  # running jobs whose names are fetched per redraw (then cached)
SHOWN_PER_WORKER = 4  # running jobs listed per worker
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
STYLE = {"queued": "yellow", "running": "blue", "succeeded": "green", "failed": "red",
         "cancelled": "bright_black"}  # fmt: skip


class Master(Protocol):
    """What the view asks of a client (``scheduler.Client`` does)."""

    def status(self) -> dict: ...
    def job(self, job_id: int) -> dict: ...


def run(
    client: Master, *, interval: float = 1.0, once: bool = False, out: IO[str] | None = None
) -> int:
    """Show the view on ``out`` (default stdout) every ``interval`` seconds until Ctrl-C;
    with ``once``, print one frame (rate measured over ``interval``) and return.

    Returns 0, or 2 when rich is not installed (after saying how to get it).
    """
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    console = Console(file=out or sys.stdout)
    view = View(client)
    if once:
        view.sample()
        time.sleep(interval)
        console.print(view.frame())
        return 0
    try:
        with Live(view.frame(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(view.frame(), refresh=True)
    except KeyboardInterrupt:
        return 0


class View:
    """Samples the master and builds one rich frame; keeps the rate's history."""

    def __init__(self, client: Master, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.clock = clock
        self.samples: deque[tuple[float, int]] = deque()  # (time, jobs done)
        self.names: dict[int, str] = {}  # running job id -> what it runs
        self.status: dict[str, Any] | None = None
        self.trouble: str | None = None

    def sample(self) -> None:
        try:
            self.status = self.client.status()
            self.trouble = None
        except SchedulerError as exc:  # a master restart: say so, keep the last numbers
            self.trouble = str(exc)
            return
        now, done = self.clock(), _done(self.status["counts"])
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        self._learn_names()

    @property
    def rate(self) -> float | None:
        """Jobs finished per second over the last RATE_WINDOW seconds; None before two samples."""
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def _learn_names(self) -> None:
        assert self.status is not None
        running = {j for w in self.status["workers"] for j in w["running"]}
        for gone in self.names.keys() - running:
            del self.names[gone]
        for job_id in sorted(running - self.names.keys())[:LOOKUPS_PER_FRAME]:
            try:
                info = self.client.job(job_id)
            except SchedulerError:
                continue
            self.names[job_id] = info.get("name") or info.get("command") or ""

    def frame(self) -> Any:
        """The renderable: a header line, the counts with a bar, the workers table."""
        from rich.console import Group
        from rich.text import Text

        self.sample()
        if self.status is None:
            return Text(f"master not answering: {self.trouble}", style="red")
        parts: list[Any] = [self._header(), self._counts(), self._workers()]
        if self.trouble:
            parts.append(Text(f"master not answering: {self.trouble}", style="red"))
        if self.status.get("journal_error"):
            parts.append(Text(f"journal cannot write: {self.status['journal_error']}",
                              style="red"))  # fmt: skip
        return Group(*parts)

    def _header(self) -> Any:
        from rich.text import Text

        s = self.status or {}
        counts, rate = s["counts"], self.rate
        left = counts.get("queued", 0) + counts.get("running", 0)
        eta = "done" if not left else (_duration(left / rate) if rate else "-")
        rate_text = "-" if rate is None else f"{rate:,.1f}"
        return Text.assemble(
            ("scheduler ", "bold"), f"{s.get('version', '')}  up {_duration(s['uptime'])}  ",
            ("rate ", "dim"), f"{rate_text} jobs/s  ", ("ETA ", "dim"), eta,
        )  # fmt: skip

    def _counts(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        counts, total = self.status["counts"], self.status["total"]  # type: ignore[index]
        grid = Table.grid(padding=(0, 2))
        for _ in range(len(STATES) + 2):
            grid.add_column(justify="right")
        grid.add_row(*(f"[{STYLE[s]}]{s}[/]" for s in STATES), "total", "")
        bar = ProgressBar(total=max(total, 1), completed=_done(counts), width=30)
        grid.add_row(*(f"{counts.get(s, 0):,}" for s in STATES), f"{total:,}", bar)
        return grid

    def _workers(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        status = self.status or {}
        table = Table(title=f"workers ({len(status['workers'])})", title_justify="left",
                      expand=False)  # fmt: skip
        for name in ("name", "host", "slots", "running", "prefetched", "heartbeat", "state"):
            table.add_column(name, no_wrap=name != "running")
        for w in status["workers"]:
            cells = (
                w["name"], w["host"] or "-", w["concurrency"], self._running(w["running"]),
                len(w["waiting"]), f"{max(0.0, time.time() - w['last_heartbeat']):.1f}s ago",
                "not back yet" if not w["connected"] else ("draining" if w["draining"] else "ok"),
            )  # fmt: skip
            table.add_row(*(Text(str(c)) for c in cells))  # names are text, never markup
        return table

    def _running(self, ids: list[int]) -> str:
        shown = [f"{i} {self.names.get(i, '')}".strip() for i in ids[:SHOWN_PER_WORKER]]
        more = f"\n+{len(ids) - SHOWN_PER_WORKER} more" if len(ids) > SHOWN_PER_WORKER else ""
        return "\n".join(_short(s) for s in shown) + more if ids else "-"


def _done(counts: dict[str, int]) -> int:
    return counts.get("succeeded", 0) + counts.get("failed", 0) + counts.get("cancelled", 0)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


__all__ = ["INSTALL_HINT", "View", "run"]

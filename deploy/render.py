"""Text for people and JSON for scripts: plans, status, jobs. Pure (the clock is passed in)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .config import labels_text
from .observed import ContainerRow, Status, stamp_seconds
from .planner import Action, Create, Remove, RemoveVolume, Start
from .shipplan import Ship
from .specs import TLS_DIR, UNBUILT
from .tlsplan import UNISSUED, Issue

STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)  # fmt: skip


def describe(action: Action) -> str:
    """One line per action; the authkey shows as ********."""
    if isinstance(action, Create):
        spec = action.spec
        env = " ".join(f"{k}={v}" for k, v in sorted(spec.masked_env().items()))
        vols = "".join(f" volume {v}:{p}" for v, p in spec.volumes)
        if spec.tls is not None:
            serial = "to be issued" if spec.tls.serial == UNISSUED else spec.tls.serial[:16]
            vols += f" tls {spec.tls.volume}:{TLS_DIR}:ro (certificate {serial})"
        return (f"{spec.host}: create {spec.name} ({spec.role}, image {spec.image.ref}, "
                f"stop timeout {spec.stop_timeout}s{vols}) env {env}")  # fmt: skip
    if isinstance(action, Start):
        return f"{action.host}: start {action.container.name} (exists, {action.container.state})"
    if isinstance(action, Remove):
        verb = "drain and remove" if action.container.role == "worker" else "stop and remove"
        return (f"{action.host}: {verb} {action.container.name} ({action.reason}; "
                f"up to {action.timeout}s)")  # fmt: skip
    assert isinstance(action, RemoveVolume)
    return f"{action.host}: remove volume {action.name}"


def plan(actions: Sequence[Action], shipments: Sequence[Ship] = (),
         certificates: Sequence[Issue] = ()) -> str:  # fmt: skip
    """The certificates that would be issued, the images each host would receive, then the
    container actions."""
    if not actions and not shipments and not certificates:
        return "nothing to do: the cluster already matches the inventory"
    return "\n".join([*(f"issue {c.describe()}" for c in certificates),
                      *(shipment(s) for s in shipments), *(describe(a) for a in actions)])


def shipment(ship: Ship) -> str:
    """``tb2: ship scheduler-slave:latest 19f619fa9245 (absent there)``, one line per host."""
    parts = []
    for i, (ref, there) in enumerate(zip(ship.images, ship.found, strict=True)):
        mine = "not built here yet" if ref.id == UNBUILT else ref.version
        why = "absent there" if there is None else f"there: {there.removeprefix('sha256:')[:12]}"
        if i < len(ship.layers) and ship.layers[i]:
            why += f"; {ship.held[i]} of {ship.layers[i]} layers there"
        parts.append(f"{ref.ref} {mine} ({why})")
    sent = f"ship {', '.join(parts)}" if parts else ""
    named = ", ".join(f"{r.ref} {r.version}" for r in ship.names)
    named = f"name {named} (there under another name)" if named else ""
    return f"{ship.host}: {'; '.join(p for p in (sent, named) if p)}"


def _uptime(row: ContainerRow, now: float) -> float | None:
    if row.state != "running" or not row.started_at:
        return None
    try:
        return max(0.0, now - stamp_seconds(row.started_at))
    except ValueError:
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def status_json(status: Status, now: float) -> dict[str, Any]:
    hosts = []
    for hs in status.hosts:
        containers = [{
            "name": r.name, "role": r.role, "index": r.index, "state": r.state,
            "health": r.health, "uptime_seconds": _uptime(r, now), "image": r.image,
            "version": r.version,
        } for r in hs.containers]  # fmt: skip
        hosts.append({"name": hs.host.name, "address": hs.host.address,
                      "labels": dict(hs.host.labels), "reachable": hs.error is None,
                      "error": hs.error, "containers": containers})  # fmt: skip
    view = status.master or {}
    return {
        "cluster": status.cluster,
        "healthy": status.healthy,
        "hosts": hosts,
        "master": {
            "reachable": status.master is not None, "error": status.master_error,
            "jobs": view.get("counts", {}), "total": view.get("total"),
            "workers": view.get("workers", []),
        },
    }  # fmt: skip


def status_text(status: Status, now: float) -> str:
    rows = []
    for hs in status.hosts:
        if hs.error is not None:
            rows.append([hs.host.name, "-", "-", "UNREACHABLE", "-", "-", "-"])
        for r in sorted(hs.containers, key=lambda r: (r.role != "master", r.index)):
            rows.append([hs.host.name, r.name, r.role, r.state, r.health,
                         _duration(_uptime(r, now)), r.image])  # fmt: skip
    parts = [table(["HOST", "CONTAINER", "ROLE", "STATE", "HEALTH", "UPTIME", "IMAGE"], rows)]
    parts += [f"{hs.host.name}: {hs.error}" for hs in status.hosts if hs.error]
    if status.master is None:
        parts.append(f"master: {status.master_error}")
        return "\n".join(parts)
    counts = status.master.get("counts", {})
    parts.append("jobs: " + "  ".join(f"{k} {counts.get(k, 0)}" for k in STATES))
    workers = [[w["name"], w.get("concurrency", "-"), "draining" if w.get("draining") else "ready",
                labels_text(w.get("labels")) or "-",
                " ".join(str(j) for j in w.get("running") or ()) or "-"]
               for w in status.master.get("workers", [])]  # fmt: skip
    parts.append(table(["WORKER", "SLOTS", "STATE", "LABELS", "RUNNING JOBS"], workers))
    return "\n".join(parts)


def jobs_text(jobs: Sequence[dict[str, Any]]) -> str:
    rows = [[j["id"], j["state"], j.get("worker") or "-", j.get("attempts", "-"),
             "-" if j.get("exit_code") is None else j["exit_code"], _clip(j.get("command", ""))]
            if "tasks" not in j else _array_row(j) for j in jobs]  # fmt: skip
    return table(["ID", "STATE", "WORKER", "TRIES", "EXIT", "COMMAND"], rows)


def _array_row(array: dict[str, Any]) -> list[object]:
    """An array as the master lists it, one line for its tasks: how many in each state."""
    counts = ", ".join(f"{array['counts'][s]} {s}" for s in STATES if array["counts"].get(s))
    cap = f", at most {array['max_running']} at once" if array.get("max_running") else ""
    return [array["id"], array["state"], "-", "-", "-",
            f"array of {array['tasks']}: {counts}{cap} (--array {array['id']})"]  # fmt: skip


def job_text(job: dict[str, Any], now: float, tail: int = 40) -> str:
    """One job as ``scheduler job`` shows it: a field a line, then the output tails."""
    name = f" ({job['name']})" if job.get("name") else ""
    ended = job.get("ended")
    rows = [
        ("job", f"{job['id']}{name}"),
        ("state", job["state"]),
        ("command", job.get("command") or "-"),
        ("attempts", f"{job.get('attempts', 0)} of {job.get('max_attempts', '-')}"),
        ("worker", job.get("worker") or "-"),
        ("submitted", _clock(job.get("submitted"))),
        ("started", _clock(job.get("started"))),
        ("ended", _clock(ended)),
        ("took" if ended else "running for", _took(job.get("started"), ended or now)),
        ("exit code", "-" if job.get("exit_code") is None else str(job["exit_code"])),
        ("error", (job.get("error") or "-").rstrip()),
    ]  # fmt: skip
    # only what a job has: why it waits (queued), and where and when it may run
    array, cap = job.get("array"), job.get("max_running")
    rows[2:2] = [("waiting", job["reason"])] if job.get("reason") else []
    rows[4:4] = [(k, v) for k, v in (
        ("priority", job.get("priority")), ("requires", labels_text(job.get("requires"))),
        ("array", None if array is None else f"{array}, index {job.get('array_index')}"
         + (f", at most {cap} at once" if cap else "")),
    ) if v]  # fmt: skip
    lines = [f"{key:<12} {value}" for key, value in rows]
    for stream in ("stdout", "stderr"):
        body = (job.get(stream) or "").rstrip("\n").splitlines()
        if body:
            lines.append(f"{stream}:")
            lines.extend("  " + line for line in body[-tail:])
    return "\n".join(lines)


def _clock(stamp: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _took(started: float | None, until: float) -> str:
    if started is None:
        return "-"
    seconds = until - started
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def verify_text(report: dict[str, Any]) -> str:
    """The chaos run's accounting, one row a line, then the verdict."""
    rows = report["rows"]
    width = max(len(str(key)) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    verdict = ("nothing lost, nothing run twice on a healthy worker" if report["ok"]
               else "FAILED: jobs lost or run twice on a healthy worker")  # fmt: skip
    return "\n".join([*lines, f"verdict: {verdict}"])


def progress_columns() -> tuple[Any, ...]:
    """The columns of ``submit --wait``'s bar: done/total, bar, percent, rate, ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )  # fmt: skip
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("-- jobs/s" if speed is None else f"{speed:.1f} jobs/s")

    return (TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(),
            TaskProgressColumn(), Rate(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip

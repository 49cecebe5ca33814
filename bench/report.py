"""The one table (plain text, aligned) and its JSON twin."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Row:
    """One measurement. ``bar`` says whether ``ours`` meets the target; None when there is none."""

    name: str
    unit: str
    ours: float | None = None
    classic: float | None = None
    pool: float | None = None
    target: str = ""
    bar: Callable[[float], bool] | None = None

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.classic:
            return None
        return self.ours / self.classic

    @property
    def met(self) -> bool | None:
        if self.bar is None or self.ours is None:
            return None
        return self.bar(self.ours)

    def as_dict(self) -> dict:
        data = {**asdict(self), "ratio": self.ratio, "met": self.met}
        del data["bar"]
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in data.items()}


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("jobs/s", "items/s", "us", "MB"):
        return f"{value:,.0f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    head = ["measurement", "ours", "classic", "Pool", "ours/classic", "bar", "met"]
    lines = [head]
    for row in rows:
        met = {True: "yes", False: "NO", None: "-"}[row.met]
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append([f"{row.name} ({row.unit})", _number(row.ours, row.unit),
                      _number(row.classic, row.unit), _number(row.pool, row.unit), ratio,
                      row.target or "-", met])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in
                 enumerate(zip(line, widths, strict=True))]  # fmt: skip
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def to_json(rows: list[Row], context: dict) -> str:
    return json.dumps({**context, "rows": [r.as_dict() for r in rows]}, indent=2)

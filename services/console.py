"""What fedvec prints for people: plain-text tables, and the echo callback that long jobs
(the demo, the benchmarks) report progress through (click.echo, or a no-op under --json)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Echo = Callable[[str], None]


def quiet(_message: str) -> None:
    """The echo of a command asked for --json: only the JSON document goes to stdout."""


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

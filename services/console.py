"""What fedvec prints for people: plain-text tables, and the echo callback that long jobs
(the demo, the benchmarks) report progress through (click.echo, or a no-op under --json)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

Echo = Callable[[str], None]


def quiet(_message: str) -> None:
    """The echo of a command asked for --json: only the JSON document goes to stdout."""


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Progress:
    """Progress of a long wait: a bar on a terminal; written to a file or a pipe (a log), a
    line each time the count moves instead, so that a log holds steps, not redrawn bars."""

    def __init__(
        self, total: int, desc: str, *, show: bool = True, stream: TextIO | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.desc, self.show = total, desc, show
        self.n = 0
        self.t0 = time.monotonic()
        self.bar = None
        if show and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, file=self.stream)

    def update_to(self, n: int) -> None:
        if n == self.n:
            return
        self.n = n
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
        elif self.show:
            elapsed = time.monotonic() - self.t0
            print(f"{self.desc}: {n}/{self.total} ({elapsed:.0f}s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def interrupt_between_steps() -> Iterator[Callable[[], None]]:
    """Ctrl-C during a wait loop: the first press is noted and raised as KeyboardInterrupt
    by the check this yields, which the loop calls between its steps. An interrupt raised
    anywhere else (inside a broker or database library, while it holds a lock or closes a
    connection) can leave a lock held and the process hung with nothing printed. A second
    press raises at once. Outside the main thread (no signals there), or where SIGINT is
    ignored (started with nohup or in the background: it was not meant to stop), the check
    is a no-op."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        yield lambda: None
        return
    pressed: list[bool] = []

    def note(signum: int, frame: Any) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    def check() -> None:
        if pressed:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)

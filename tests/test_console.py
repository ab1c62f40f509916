"""What fedvec prints for people: tables, and progress that suits where it goes."""

from __future__ import annotations

import io
import time

import pytest

from services.console import Progress, table


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_pipe_is_a_line_per_step():
    out = io.StringIO()
    with Progress(3, "round 1", stream=out) as p:
        for n in (0, 1, 1, 3):
            p.update_to(n)
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["round 1: 1/3", "round 1: 3/3"]
    assert "\r" not in out.getvalue()


def test_progress_on_a_terminal_is_a_bar_and_nothing_when_hidden():
    tty = Terminal()
    with Progress(2, "evaluating", stream=tty) as p:
        p.update_to(2)
    assert "\r" in tty.getvalue() and "| 0/2 [" in tty.getvalue()  # a redrawn bar
    hidden = io.StringIO()
    with Progress(2, "evaluating", show=False, stream=hidden) as p:
        p.update_to(2)
    assert hidden.getvalue() == ""


def test_table_aligns_columns():
    assert table([["a", 1], ["bb", None]], ["name", "n"]).splitlines() == [
        "name  n",
        "----  -",
        "a     1",
        "bb",
    ]


def test_ctrl_c_in_a_wait_is_raised_between_steps_and_a_second_press_at_once():
    import signal

    from services.console import interrupt_between_steps

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in background
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _press_twice(interrupt_between_steps)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        # a process that ignores SIGINT (nohup, background) keeps ignoring it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupt_between_steps() as interrupted:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            interrupted()
    finally:
        signal.signal(signal.SIGINT, before)


def _press_twice(interrupt_between_steps) -> None:
    import os
    import signal

    with interrupt_between_steps() as interrupted:
        interrupted()  # nothing pressed yet
        os.kill(os.getpid(), signal.SIGINT)  # noted, not raised inside whatever runs now
        with pytest.raises(KeyboardInterrupt):
            interrupted()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second press: at once
            time.sleep(1)

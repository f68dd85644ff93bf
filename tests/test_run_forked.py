"""tests/conftest.py's run_forked: exit codes in order, and a process that hangs is killed at the deadline."""

import os
import signal
import time

from conftest import run_forked


def _exit_with(code: int) -> None:
    os._exit(code)


def _hang() -> None:
    time.sleep(600)


def test_exit_codes_come_back_in_order():
    assert run_forked(_exit_with, [(0,), (3,)], timeout=60) == [0, 3]


def test_a_hanging_process_is_killed_at_the_deadline():
    started = time.monotonic()
    assert run_forked(_hang, [(), ()], timeout=2) == [-signal.SIGKILL, -signal.SIGKILL]
    assert time.monotonic() - started < 30

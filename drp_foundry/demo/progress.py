"""The demo's progress display: which stage, which step, and when it will be done.

- ``StepTimer``: the rate of a loop of known length and its ETA, measured from the first step it
  sees (so start-up time and resumed steps do not distort it).
- ``parse_batch_line``: the step and total of a Composer console line (``[batch=12/60]``), to
  follow a ``composer train.py`` subprocess.
"""

from __future__ import annotations

import re
import time
from typing import Callable

_BATCH = re.compile(r'\[batch=(\d+)/(\d+)\]')


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def parse_batch_line(line: str) -> tuple[int, int] | None:
    """``(step, total)`` of a Composer console line such as ``[batch=12/60]:``, else None."""
    match = _BATCH.search(line)
    return (int(match[1]), int(match[2])) if match else None


class StepTimer:
    """Rate and ETA of a loop of ``total`` steps, from the steps seen since the first ``update``."""

    def __init__(self, total: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.clock = clock
        self.step: int | None = None
        self._first: tuple[int, float] | None = None

    def update(self, step: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        now = self.clock()
        if self._first is None or step < self._first[0]:
            self._first = (step, now)
        self.step = step
        self._now = now

    @property
    def seconds_per_step(self) -> float | None:
        if self._first is None or self.step is None or self.step <= self._first[0]:
            return None
        return (self._now - self._first[1]) / (self.step - self._first[0])

    @property
    def eta_seconds(self) -> float | None:
        rate = self.seconds_per_step
        if rate is None or self.total is None or self.step is None:
            return None
        return rate * max(0, self.total - self.step)

    def describe(self) -> str:
        """``step 20/60, 1.3 s/step, ETA 52s`` (rate and ETA once two steps were seen)."""
        if self.step is None:
            return 'starting'
        text = f'step {self.step}' + (f'/{self.total}' if self.total is not None else '')
        rate, eta = self.seconds_per_step, self.eta_seconds
        if rate is not None:
            text += f', {rate:.2f} s/step' if rate < 10 else f', {rate:.0f} s/step'
        if eta is not None:
            text += f', ETA {format_duration(eta)}'
        return text

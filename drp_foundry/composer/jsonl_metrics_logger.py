"""Logger destination that appends every logged metric to a JSON-lines file (one line per call).

Plots and reports (the demo, the fidelity study) read runs back from this file instead of
parsing console output. Only global rank 0 writes.

One file, one run: records are held in memory until the trainer has decided whether the run
resumes (a checkpoint load, or ``FIT_START`` without one).
- A run that does not resume and finds a file at ``path`` moves it aside to
  ``<stem>.<n><suffix>`` (first free n, said in the log) and starts a new file.
- A resumed run cuts the file back to its size when the checkpoint was saved (kept in the
  logger's checkpoint state), dropping the records of the steps the killed run made after
  its checkpoint, then appends. The file then holds exactly what an uninterrupted run writes.
- Either happens at ``FIT_START`` (or ``EVAL_STANDALONE_START``), never at the checkpoint load
  itself: a run that is refused after loading (Composer's "No training would occur" for a
  finished run), or fails to load, leaves the file exactly as it was and writes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from composer.core import State
from composer.loggers import LoggerDestination
from composer.utils import dist

from drp_foundry.fileio import read_jsonl

log = logging.getLogger(__name__)


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, 'detach'):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def move_aside(path: Path) -> Path:
    """Rename ``path`` to the first free ``<stem>.<n><suffix>``; returns the new path."""
    n = 1
    while (aside := path.with_name(f'{path.stem}.{n}{path.suffix}')).exists():
        n += 1
    os.replace(path, aside)
    return aside


class JSONLMetricsLogger(LoggerDestination):
    """Write ``{"step": batch, "metric": value, ...}`` lines to ``path`` (one file per run, see module doc).

    Args:
        path: output file; ``{run_name}`` is replaced by the run name.
        prefixes: keep only metrics whose name starts with one of these (``None``: all).

    Example:
        >>> from drp_foundry import JSONLMetricsLogger
        >>> logger = JSONLMetricsLogger(path='runs/{run_name}/metrics.jsonl', prefixes=['drp/', 'metrics/eval/'])
        >>> logger.prefixes  # Trainer(..., loggers=[logger]); read the file back with read_metrics(path)
        ('drp/', 'metrics/eval/')
    """

    def __init__(self, path: str = '{run_name}/metrics.jsonl', prefixes: Optional[Sequence[str]] = None):
        if not path:
            raise ValueError('drp_jsonl.path must name a file, e.g. runs/{run_name}/metrics.jsonl')
        self.path_template = path
        self.prefixes = tuple(prefixes) if prefixes else None
        self._path: Optional[Path] = None
        self._pending: list[str] | None = []  # lines held until the run is known to be fresh or resumed
        self.moved_aside: Optional[Path] = None
        self._resume_bytes: int | None = None  # from the checkpoint; applied at FIT_START

    def init(self, state: State, logger) -> None:
        self._path = Path(self.path_template.format(run_name=state.run_name))
        if dist.get_global_rank() == 0:
            self._path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Optional[Path]:
        return self._path

    # -- fresh or resumed --------------------------------------------------------------------
    def _start(self, resume_bytes: int | None) -> None:
        """Settle the file once: cut it back (resumed) or move an old one aside (fresh); flush held lines."""
        if self._pending is None or self._path is None:
            return
        pending, self._pending = self._pending, None
        if dist.get_global_rank() != 0:
            return
        path = self._path
        if resume_bytes is None:
            if path.exists() and path.stat().st_size > 0:
                self.moved_aside = move_aside(path)
                log.warning('drp_jsonl: %s holds another run (this run does not resume); moved it to %s and '
                            'started a new file', path, self.moved_aside)
        elif not path.exists() or path.stat().st_size < resume_bytes:
            log.warning('drp_jsonl: resuming, but %s is missing or shorter than at the checkpoint (%d bytes); '
                        'appending to what is there', path, resume_bytes)
        elif path.stat().st_size > resume_bytes:
            with open(path, 'rb') as f:
                f.seek(resume_bytes)
                dropped = f.read().count(b'\n')
            with open(path, 'r+b') as f:
                f.truncate(resume_bytes)
            log.info('drp_jsonl: resuming; dropped %d records logged after the checkpoint from %s', dropped, path)
        if pending:
            with open(path, 'a') as f:
                f.writelines(pending)

    def state_dict(self) -> dict[str, Any]:
        size = 0
        if self._path is not None and self._pending is None and self._path.exists():
            size = self._path.stat().st_size
        return {'path': None if self._path is None else str(self._path), 'bytes': size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        same_file = self._path is not None and state.get('path') == str(self._path)
        # only noted: the trainer may still refuse the run (nothing left to train) before FIT_START
        self._resume_bytes = int(state.get('bytes', 0)) if same_file else None

    def fit_start(self, state: State, logger) -> None:
        self._start(self._resume_bytes)  # None: no checkpoint state of this file was loaded, a fresh run

    def eval_standalone_start(self, state: State, logger) -> None:
        self._start(None)

    def close(self, state: State, logger) -> None:
        if self._pending is not None:  # never started (refused, or failed before FIT_START): touch nothing
            self._pending = None

    # -- writing -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if self._path is None or dist.get_global_rank() != 0:
            return
        kept = {k: _to_jsonable(v) for k, v in metrics.items()
                if self.prefixes is None or k.startswith(self.prefixes)}
        if not kept:
            return
        line = json.dumps({'step': step, **kept}) + '\n'
        if self._pending is not None:
            self._pending.append(line)
            return
        with open(self._path, 'a') as f:
            f.write(line)


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, Any]]]:
    """Metric name -> sorted ``(step, value)`` pairs; a step logged twice keeps its last value."""
    series: dict[str, dict[int, Any]] = {}
    for _, record in read_jsonl(path):
        step = record.pop('step')
        for name, value in record.items():
            series.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in series.items()}

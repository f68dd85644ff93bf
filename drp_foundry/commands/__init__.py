"""The commands, one module each (``main(argv) -> exit status``); console_scripts and ``python -m`` point here.

The entry scripts elsewhere (``train.py``, ``drp-demo``, ...) only call these.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


def write_folder_command(prog: str, errors: type[Exception], write: Callable[[], Any], out_dir: str) -> int:
    """Run ``write`` (which writes ``out_dir`` and returns a report with ``summary()``); print the report, or the
    error as ``PROG: error: ...`` with exit status 2 when ``write`` raises one of ``errors`` (bad input)."""
    try:
        report = write()
    except errors as error:
        print(f'{prog}: error: {error}', file=sys.stderr)
        return 2
    print(report.summary())
    print(f'wrote {out_dir}')
    return 0

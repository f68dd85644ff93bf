"""Stopping the demo with SIGTERM stops the stage it is running (no orphaned training process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

STAGE = textwrap.dedent('''
    import os, sys, time
    open(sys.argv[1], 'w').write(str(os.getpid()))
    print('[batch=1/100]', flush=True)
    time.sleep(120)
''')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_the_demo_reaches_its_stage_and_says_how_to_resume(tmp_path: Path):
    pid_file = tmp_path / 'stage.pid'
    demo = subprocess.Popen(
        [sys.executable, '-c', 'import sys; from pathlib import Path; from drp_foundry.demo.pipeline import run_logged; '
         'run_logged([sys.executable, "-c", sys.argv[1], sys.argv[2]], Path(sys.argv[3]))',
         STAGE, str(pid_file), str(tmp_path / 'stage.log')],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    stage_pid = int(pid_file.read_text())
    assert _alive(stage_pid)
    time.sleep(0.5)  # let the demo install its handler (it does so right after starting the stage)
    demo.send_signal(signal.SIGTERM)
    out, err = demo.communicate(timeout=60)
    assert demo.returncode == 1, (out, err)
    assert 'stopped by SIGTERM' in err and 'rerun the demo to resume' in err
    deadline = time.time() + 10
    while _alive(stage_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(stage_pid), 'the stage outlived the demo'

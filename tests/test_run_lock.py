"""One live run per save_folder (issue 28): a second ``train.py`` is refused, a killed one leaves no stuck lock.

The runs are the tiny GQA pruning run of tests/resume_harness.py (12 batches, checkpoint every 2). That a lock left by
a SIGKILLed train.py does not block its rerun is asserted by tests/test_kill_resume.py, which kills one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from resume_harness import (
    STEPS,
    _env,
    build_data,
    command,
    read_logged,
    write_config,
)

from drp_foundry.run_lock import LOCK_NAME, RunLockError, hold_run_lock

_HOLD = ('import sys, time; sys.path.insert(0, sys.argv[2]); from drp_foundry.run_lock import hold_run_lock; '
         'h = hold_run_lock(sys.argv[1]); print("held", flush=True); time.sleep(600)')


def _holder(folder):
    proc = subprocess.Popen([sys.executable, '-c', _HOLD, str(folder), str(os.getcwd())], stdout=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout.readline().strip() == 'held'
    return proc


def test_a_second_holder_is_refused_naming_the_folder_and_the_first(tmp_path):
    proc = _holder(tmp_path / 'ck')
    try:
        with pytest.raises(RunLockError) as err:
            hold_run_lock(tmp_path / 'ck')
        assert str(tmp_path / 'ck') in str(err.value) and f'pid {proc.pid}' in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    proc = _holder(tmp_path / 'ck')
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    held = hold_run_lock(tmp_path / 'ck')  # the kernel dropped the flock with the process
    assert json.loads((tmp_path / 'ck' / LOCK_NAME).read_text())['pid'] == os.getpid()
    assert json.loads(held.previous)['pid'] == proc.pid
    held.close()


def _model_tensors(path):
    state = torch.load(path, map_location='cpu', weights_only=False)['state']
    return state['model'], state['optimizers']


def _same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_two_train_py_on_one_save_folder_the_second_is_refused_and_the_first_runs_to_the_end(tmp_path,
                                                                                            sample_dir):
    data = build_data(sample_dir, tmp_path)
    run_dir = tmp_path / 'both'
    run_dir.mkdir()
    cfg = write_config(tmp_path / 'both.yaml', data, run_dir)
    procs = []
    try:  # as a user would: the same command twice, a second apart
        for name in ('a', 'b'):
            with open(tmp_path / f'{name}.log', 'w') as log:
                procs.append(subprocess.Popen(command(cfg, 1), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                              env=_env(), start_new_session=True))
            time.sleep(1)
        codes = [proc.wait(timeout=900) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    logs = [(tmp_path / f'{name}.log').read_text() for name in ('a', 'b')]
    assert sorted(code == 0 for code in codes) == [False, True], (codes, [log[-2000:] for log in logs])
    winner = codes.index(0)
    refused = logs[1 - winner]
    assert 'is in use by a live run' in refused and f'pid {procs[winner].pid}' in refused, refused[-2000:]
    assert str(run_dir / 'checkpoints') in refused
    assert 'Building trainer' not in refused and 'Traceback' not in refused
    # the refused one touched nothing of the first run's: the first ran to the end, logging every step once,
    # and its folder holds what a run writes (the uninterrupted run of the same config is compared bitwise in
    # tests/test_kill_resume.py)
    logged = read_logged(run_dir / 'metrics.jsonl')
    steps = {r['step'] for r in logged}
    assert max(steps) == STEPS and set(range(1, STEPS + 1)) <= steps
    assert len([r for r in logged if 'loss/train/total' in r]) == STEPS
    assert (run_dir / 'checkpoints' / f'ep0-ba{STEPS}-rank0.pt').exists()

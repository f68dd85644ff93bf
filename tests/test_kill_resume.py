"""kill -9 of a real ``train.py`` pruning run, then autoresume: bitwise the uninterrupted run (issue 15).

The run (tests/resume_harness.py): tiny Qwen2-GQA, masks + Lagrangian (warm-up batches 1-8),
``drp_multidomain`` with one worker, the drpruning policy (first scaling-law fit at the eval of
batch 6), eval + checkpoint every 2 batches, 16 batches. Each rank count kills two runs with
SIGKILL to the whole process group: once after the checkpoint of batch 4 (mid warm-up, before
any fit) and once after the checkpoint of batch 10 (after the first fit, warm-up over), each
time after a later batch was already logged. The rerun resumes from the checkpoint; the
metrics file (every logged value but wall-clock times) and the exported model must be
byte-identical to the uninterrupted run's.
"""

from __future__ import annotations

import json
import time

import pytest
from resume_harness import (
    FIRST_FIT,
    STEPS,
    WARMUP,
    build_data,
    export,
    files_digest,
    first_difference,
    kill_and_resume,
    read_logged,
    uninterrupted,
)

KILL_POINTS = (4, 10)


def _export_digest(run_dir, out):
    export(run_dir, out)
    report = json.loads((out / 'pruning_report.json').read_text())
    report.pop('checkpoint')  # the path of the exported checkpoint, different per run folder
    digest = files_digest(out)
    digest.pop('pruning_report.json')
    return digest, report


@pytest.mark.slow
@pytest.mark.parametrize('ranks', [1, 2])
def test_killed_pruning_run_resumes_bitwise(tmp_path, shared_sample_dir, ranks):
    started = time.perf_counter()
    data = build_data(shared_sample_dir, tmp_path)
    full = uninterrupted(tmp_path, data, ranks)
    reference = read_logged(full['run_dir'] / 'metrics.jsonl')
    steps = {r['step'] for r in reference}
    assert max(steps) == STEPS
    # the kill points are where they should be: mid warm-up, and after the first fit
    ramp = {r['step']: r['drp/ramped_target/hidden'] for r in reference if 'drp/ramped_target/hidden' in r}
    assert ramp[KILL_POINTS[0] + 1] > ramp[STEPS] and KILL_POINTS[0] < WARMUP
    fits = sorted(r['step'] for r in reference if any(k.startswith('drp/fit_prediction/') for k in r))
    assert fits and fits[0] == FIRST_FIT < KILL_POINTS[1]
    reference_export = _export_digest(full['run_dir'], tmp_path / 'export-full')
    timings = {'uninterrupted_s': round(full['seconds'], 1)}
    for kill_after in KILL_POINTS:
        result = kill_and_resume(tmp_path, data, kill_after, ranks)
        assert result['killed_at_step'] > kill_after  # killed after more batches were logged
        # the rerun resumed from the checkpoint of batch kill_after, not from the start
        assert f'[batch={kill_after + 1}/{STEPS}]' in result['log'] and f'[batch={kill_after}/{STEPS}]' not in result['log']
        logged = read_logged(result['run_dir'] / 'metrics.jsonl')
        assert first_difference(reference, logged) is None
        assert _export_digest(result['run_dir'], tmp_path / f'export-{kill_after}') == reference_export
        timings[f'kill{kill_after}_s'] = round(result['killed_s'], 1)
        timings[f'resume{kill_after}_s'] = round(result['resumed_s'], 1)
    timings['total_s'] = round(time.perf_counter() - started, 1)
    print(f'kill/resume ranks={ranks}: {timings}')

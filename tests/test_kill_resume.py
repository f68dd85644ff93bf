"""kill -9 of a real ``train.py`` pruning run, then autoresume: bitwise the uninterrupted run (issue 15).

The run (tests/resume_harness.py): tiny Qwen2-GQA, masks + Lagrangian (warm-up batches 1-8),
``drp_multidomain`` with one worker, the drpruning policy (first scaling-law fit at the eval of
batch 6), eval + checkpoint every 2 batches, 12 batches. For each rank count one run is killed
with SIGKILL to the whole process group twice: after the checkpoint of batch 4 (mid warm-up,
before any fit), rerun, then after the checkpoint of batch 10 (after the first fit, warm-up over)
of the resumed run, rerun to the end; each kill lands after a later batch was already logged.
The metrics file (every logged value but wall-clock times) and the exported model must be
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
    card = json.loads((out / 'model_card.json').read_text())
    card.pop('checkpoint')  # likewise; the card's README.md is rendered from these facts
    digest = files_digest(out)
    for name in ('pruning_report.json', 'model_card.json', 'README.md'):
        digest.pop(name)
    return digest, report, card


@pytest.mark.slow
@pytest.mark.parametrize('ranks', [1, 2])
def test_killed_pruning_run_resumes_bitwise(tmp_path, sample_dir, ranks):
    started = time.perf_counter()
    data = build_data(sample_dir, tmp_path)
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
    result = kill_and_resume(tmp_path, data, KILL_POINTS, ranks)
    for kill_after, killed_at, log in zip(KILL_POINTS, result['killed_at_step'], result['logs'][1:]):
        assert killed_at > kill_after  # killed after more batches were logged
        # the rerun resumed from the checkpoint of batch kill_after, not from the start
        assert f'[batch={kill_after + 1}/{STEPS}]' in log and f'[batch={kill_after}/{STEPS}]' not in log
    logged = read_logged(result['run_dir'] / 'metrics.jsonl')
    assert first_difference(reference, logged) is None
    assert _export_digest(result['run_dir'], tmp_path / 'export-killed') == reference_export
    seconds = [round(x, 1) for x in result['seconds']]
    print(f'kill/resume ranks={ranks}: uninterrupted {full["seconds"]:.1f} s; killed at ba{KILL_POINTS[0]} after '
          f'{seconds[0]} s, resumed and killed at ba{KILL_POINTS[1]} after {seconds[1]} s, resumed to the end in '
          f'{seconds[2]} s; test total {time.perf_counter() - started:.1f} s')

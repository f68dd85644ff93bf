"""kill -9 of a real 2-rank ``train.py`` pruning run, then autoresume: bitwise the uninterrupted run (issue 15).

The run (tests/resume_harness.py): tiny Qwen2-GQA on 2 ranks, masks + Lagrangian (warm-up batches 1-8),
``drp_multidomain`` with one worker, the drpruning policy (first scaling-law fit at the eval of
batch 6), eval + checkpoint every 2 batches, 12 batches. The run is killed with SIGKILL to the whole
process group after the checkpoint of batch 6, which is both mid warm-up (the ramped target still
moving) and after the first fit (the policy's fitted references in the state); the kill lands after a
later batch was already logged and leaves the run lock behind. The rerun must not be refused by that
lock, and the metrics file (every logged value but wall-clock times) and the exported model must be
byte-identical to the uninterrupted run's.

One rank count only: the 2-rank run exercises everything the 1-rank run does (each rank's checkpoint
shard, the dataloader state, the callback and mask state) plus the cross-rank parts; the 1-rank resume
is covered in-process (tests/test_multidomain_dataset.py, test_composer_checkpoint_resume_replays_the_
uninterrupted_batches; tests/test_pruning_algorithms.py, test_masks_lambdas_and_optimizer_state_resume_
from_a_checkpoint; tests/test_dynamic_loading_callback.py, test_resumed_trainer_makes_the_same_updates).
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

KILL_POINTS = (6,)  # after the first fit (FIRST_FIT) and before the end of the warm-up (WARMUP)
RANKS = 2


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
def test_killed_pruning_run_resumes_bitwise(tmp_path, sample_dir):
    ranks = RANKS
    started = time.perf_counter()
    data = build_data(sample_dir, tmp_path)
    full = uninterrupted(tmp_path, data, ranks)
    reference = read_logged(full['run_dir'] / 'metrics.jsonl')
    steps = {r['step'] for r in reference}
    assert max(steps) == STEPS
    # the kill point is where it should be: mid warm-up, and after the first fit
    ramp = {r['step']: r['drp/ramped_target/hidden'] for r in reference if 'drp/ramped_target/hidden' in r}
    assert ramp[KILL_POINTS[0] + 1] > ramp[STEPS] and KILL_POINTS[0] < WARMUP
    fits = sorted(r['step'] for r in reference if any(k.startswith('drp/fit_prediction/') for k in r))
    assert fits and fits[0] == FIRST_FIT <= KILL_POINTS[0]
    reference_export = _export_digest(full['run_dir'], tmp_path / 'export-full')
    result = kill_and_resume(tmp_path, data, KILL_POINTS, ranks)
    for kill_after, killed_at, log in zip(KILL_POINTS, result['killed_at_step'], result['logs'][1:]):
        assert killed_at > kill_after  # killed after more batches were logged
        # the rerun resumed from the checkpoint of batch kill_after, not from the start
        assert f'[batch={kill_after + 1}/{STEPS}]' in log and f'[batch={kill_after}/{STEPS}]' not in log
        assert 'in use by a live run' not in log  # the lock the kill left behind did not block the rerun
    assert all(result['lock_left'])  # a SIGKILL gives no chance to clean up: the lock file stays
    logged = read_logged(result['run_dir'] / 'metrics.jsonl')
    assert first_difference(reference, logged) is None
    assert _export_digest(result['run_dir'], tmp_path / 'export-killed') == reference_export
    seconds = [round(x, 1) for x in result['seconds']]
    print(f'kill/resume ranks={ranks}: uninterrupted {full["seconds"]:.1f} s; killed at ba{KILL_POINTS[0]} after '
          f'{seconds[0]} s, resumed to the end in {seconds[1]} s; test total {time.perf_counter() - started:.1f} s')

"""The projection constraint on two FSDP2 CPU ranks (gloo; issue 26): every mask row's expected count is
the ramped target after every step, and both ranks hold the same masks.

The run is tests/sharded_harness.py's FSDP2 run (3-layer GQA Llama, 8 batches, ``drp_multidomain``,
the drpruning policy, sharded checkpoints) with ``drp_lagrangian: {constraint: projection}``, the target
ramped over 4 batches, the temperature annealed from batch 2 and the last 2 batches hardened, and
without distillation. Under FSDP2 the mask module is its own unit sharded on dim 0: the (3, 2) head and
(3, 128) intermediate masks are split by layer (rows whole on one rank), the (3,) layer and (64,) hidden
masks are split within their one row, so their projection sums partial counts over the ranks at every
halving. ``tests/rank_probe_train.py`` writes every rank's full log-alphas after every batch.
"""

from __future__ import annotations

import json

import pytest
import torch
from resume_harness import build_data
from sharded_harness import TARGET, run, write_config, write_tiny_llama

from drp_foundry.pruning.projection import attainable_count_range, expected_counts

STEPS, WARMUP = 8, 4
SOURCE = {'layer': 3, 'head': 2, 'intermediate': 128, 'hidden': 64}
FINAL = {'layer': TARGET['layers'], 'head': TARGET['kv_heads'], 'intermediate': TARGET['intermediate'],
         'hidden': TARGET['hidden']}


def ramped_count(key, step):
    fraction = FINAL[key] / SOURCE[key]
    if step < WARMUP:
        fraction = 1.0 + (fraction - 1.0) * step / WARMUP
    low, high = attainable_count_range(SOURCE[key])
    return min(max(fraction * SOURCE[key], low), high)


@pytest.mark.slow
def test_projection_on_two_fsdp2_ranks(tmp_path, sample_dir):
    data = build_data(sample_dir, tmp_path)
    model_dir = write_tiny_llama(tmp_path / 'tiny-llama')
    run_dir = tmp_path / 'projection'
    config = write_config(tmp_path / 'projection.yaml', data, model_dir, run_dir, 'fsdp2', 2)
    cfg = json.loads(config.read_text())
    cfg['algorithms'].pop('drp_distillation')
    cfg['algorithms']['drp_lagrangian'] = {'warmup_steps': WARMUP, 'constraint': 'projection',
                                           'anneal_start_fraction': 0.25, 'harden_fraction': 0.25}
    cfg['callbacks']['drp_test_rank_probe']['masks_every_batch'] = True
    config.write_text(json.dumps(cfg, indent=1))
    result = run(config, run_dir, 'fsdp2', 2)
    assert 'Prepare FSDP2 took' in result['log']

    records = [[json.loads(line) for line in (run_dir / 'probe' / f'masks_rank{rank}.jsonl').read_text().splitlines()]
               for rank in (0, 1)]
    assert [r['step'] for r in records[0]] == list(range(1, STEPS + 1))
    assert records[0] == records[1]  # the same full masks, temperature and hardening on both ranks
    assert [r['hardened'] for r in records[0]] == [False] * 6 + [True] * 2  # batches 6, 7 (0-based) hardened
    for record in records[0]:
        for key, values in record['log_alpha'].items():
            log_alpha = torch.tensor(values).reshape(record['shapes'][key])
            counts = expected_counts(log_alpha, record['temperature'])
            wanted = ramped_count(key, record['step'])
            assert (counts - wanted).abs().max() < 1e-3, (record['step'], key, counts.tolist(), wanted)

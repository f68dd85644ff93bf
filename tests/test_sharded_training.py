"""Sharded pruning runs on two CPU ranks (gloo): DDP and FSDP2 (issue 16).

The runs (tests/sharded_harness.py): a tiny GQA Llama (3 layers, hidden 64, 4 query / 2 KV
heads) pruned to 2 / 48 / 2 over 1 / 64 with masks + Lagrangian + distillation from a random
teacher, ``drp_multidomain`` with one worker and the drpruning policy, a scheduler update every
2 of 8 batches of 4 sequences, gradient clipping below every batch's gradient norm (every update
is clipped, so the gradients must have the 1-rank run's scale: under FSDP2 on gloo they do only
with ``drp_fsdp2_gloo_average``, which drp-train adds; without it they are twice as large).
Every rank draws rank 0's mask noise (``mask_noise: shared``) and holds one microbatch of 2,
the 1-rank reference one microbatch of 4: both runs see the same masks on the same global
batch, so their losses may differ only by floating-point summation order (the ranks' losses
are averaged, the gradients all-reduced). Tolerance: relative 1e-5 on the loss; measured
differences are below 1e-6 (fp32 rounding), while any real mismatch (another batch, other
masks, a gradient not reduced) moves the loss by 1e-3 or more from the first batch on.

One module fixture builds the data and runs the 1-rank reference once; each test runs its
2-rank run(s) and checks several things on them.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from resume_harness import build_data, files_digest
from safetensors.torch import load_file
from sharded_harness import (
    CLIP_AT,
    FIRST_FIT,
    RESUME_FROM,
    STEPS,
    UPDATES,
    checkpoint_path,
    grad_norms,
    losses,
    probe_records,
    train,
    write_tiny_llama,
)

from drp_foundry.export import export_checkpoint

LOSS_RTOL = 1e-5
WALL = {}  # run -> seconds, printed with -s


@pytest.fixture(scope='module')
def reference(tmp_path_factory, sample_dir):
    work = tmp_path_factory.mktemp('sharded')
    data = build_data(sample_dir, work)
    model_dir = write_tiny_llama(work / 'tiny-llama')
    single = train(work, data, model_dir, 'single', 'ddp', 1)
    WALL['1 rank'] = single['seconds']
    return {'work': work, 'data': data, 'model_dir': model_dir, 'run_dir': single['run_dir']}


def _export(checkpoint, out):
    export_checkpoint(checkpoint, out)
    report = json.loads((out / 'pruning_report.json').read_text())
    report.pop('checkpoint')
    digest = files_digest(out)
    for name in ('pruning_report.json', 'model_card.json', 'README.md'):
        digest.pop(name)
    return digest, report


def _check_ranks_agree(run_dir):
    """Masks, lambdas, expected size, mixture and reference ratio: the same on both ranks at every update."""
    rank0, rank1 = probe_records(run_dir, 0), probe_records(run_dir, 1)
    assert sorted(rank0) == list(UPDATES)
    assert rank0 == rank1
    # the run moved what is compared: lambdas left 0, the mixture left its start, masks differ between updates
    assert rank0[UPDATES[-1]]['lambda']['hidden'][0] != 0.0
    assert any(rank0[step]['mixture'] != rank0[UPDATES[0]]['mixture'] for step in UPDATES[1:])
    assert rank0[UPDATES[0]]['log_alpha'] != rank0[UPDATES[-1]]['log_alpha']
    return rank0


def _check_losses_match(run_dir, reference_dir):
    two, one = losses(run_dir), losses(reference_dir)
    assert sorted(two) == sorted(one) and len(one) == STEPS
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=LOSS_RTOL), step
    return max(abs(two[s] - one[s]) / abs(one[s]) for s in one)


def _check_gradient_norms_match(run_dir, reference_dir):
    """The full gradient's norm before clipping, on both ranks, equals the 1-rank run's (the gradients are
    averaged over ranks, not summed) and is above the clipping threshold (every update is clipped)."""
    one = grad_norms(reference_dir, 0)
    assert sorted(one) == list(range(STEPS)) and min(one.values()) > CLIP_AT
    for rank in (0, 1):
        two = grad_norms(run_dir, rank)
        assert sorted(two) == sorted(one)
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-4), (rank, step, two[step], one[step])


def _check_probe_close(records, reference_dir):
    """The 1-rank run's masks, lambdas and expected size at every update, and its mixtures before the first
    scaling-law fit: equal up to the same rounding. From the first fit on (update FIRST_FIT) the mixtures are
    not compared: that fit passes three points through a power law whose excess losses are ~1e-3, so eval
    losses that differ by 1e-6 (the order of a sum) give a visibly different mixture (measured: 0.456 vs 0.307
    for the first domain). The mixture moves the data from FIRST_FIT + lag (2) = batch 8 on, after the last
    compared loss. Before the fit the mixture follows the eval losses with a gain: 1e-4. Single log-alphas
    only to 1e-2: Adam divides each entry's step by its gradient's running scale, so an entry whose gradient
    is near 0 moves by up to the mask lr (0.1) on a sign that rounding decides (measured with distillation:
    5e-3); the expected parameter count, a sum over all entries, to 2e-5 relative (measured: 3e-6 under
    FSDP2)."""
    single = probe_records(reference_dir, 0)
    for step in UPDATES:
        assert records[step]['expected_params'] == pytest.approx(single[step]['expected_params'], rel=2e-5)
        for key in ('mixture', 'reference_ratio') if step < FIRST_FIT else ():
            assert records[step][key] == pytest.approx(single[step][key], abs=1e-4), (step, key)
        for key, values in records[step]['lambda'].items():
            assert values == pytest.approx(single[step]['lambda'][key], abs=1e-5), (step, key)
        for key, values in records[step]['log_alpha'].items():
            assert values == pytest.approx(single[step]['log_alpha'][key], abs=1e-2), (step, key)


@pytest.mark.slow
def test_ddp_two_ranks(reference):
    work = reference['work']
    full = train(work, reference['data'], reference['model_dir'], 'ddp-full', 'ddp', 2)
    WALL['ddp 2 ranks'] = full['seconds']
    records = _check_ranks_agree(full['run_dir'])
    worst = _check_losses_match(full['run_dir'], reference['run_dir'])
    _check_gradient_norms_match(full['run_dir'], reference['run_dir'])
    _check_probe_close(records, reference['run_dir'])
    assert all(h['local'] == h['total'] and h['sharded'] == 0 for h in _teacher_holdings(full['run_dir']))  # whole
    # the export of the 2-rank run is the 1-rank run's model
    _, report = _export(checkpoint_path(full['run_dir'], 'ddp', STEPS), work / 'export-ddp')
    _, single_report = _export(checkpoint_path(reference['run_dir'], 'ddp', STEPS),
                                           work / 'export-single')
    assert report == single_report  # the same kept layers, hidden dims and sizes
    _weights_close(work / 'export-ddp', work / 'export-single')
    print(f'DDP: worst relative loss difference to 1 rank {worst:.1e}; wall {WALL}')


def _teacher_holdings(run_dir):
    """Per rank: how many of the distillation teacher's parameters it holds (``local``) of ``total``."""
    return [json.loads((run_dir / 'probe' / f'teacher_rank{rank}.json').read_text()) for rank in (0, 1)]


def _weights_close(a, b):
    wa, wb = load_file(str(a / 'model.safetensors')), load_file(str(b / 'model.safetensors'))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].shape == wb[key].shape, key
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_fsdp2_two_ranks(reference):
    started = time.perf_counter()
    work = reference['work']
    full = train(work, reference['data'], reference['model_dir'], 'fsdp2-full', 'fsdp2', 2)
    WALL['fsdp2 2 ranks'] = full['seconds']
    assert 'Prepare FSDP2 took' in full['log']  # Composer's FSDP2, not DDP
    # sharded checkpoints: one folder per save, a shard per rank
    final = checkpoint_path(full['run_dir'], 'fsdp2', STEPS)
    assert sorted(p.name for p in final.iterdir()) == ['.metadata', '__0_0.distcp', '__1_0.distcp']
    records = _check_ranks_agree(full['run_dir'])
    worst = _check_losses_match(full['run_dir'], reference['run_dir'])
    _check_gradient_norms_match(full['run_dir'], reference['run_dir'])
    assert 'drp_fsdp2_gloo_average' in full['log']  # drp-train added it under FSDP_VERSION=2
    _check_probe_close(records, reference['run_dir'])
    # the distillation teacher is sharded like the student: every tensor a DTensor, each rank holds half
    holdings = _teacher_holdings(full['run_dir'])
    assert all(h['sharded'] == h['tensors'] for h in holdings)
    assert sum(h['local'] for h in holdings) == holdings[0]['total']
    assert all(h['local'] <= 0.51 * h['total'] for h in holdings), holdings

    # resumed from the sharded checkpoint of batch RESUME_FROM: continues as the uninterrupted run
    resumed = train(work, reference['data'], reference['model_dir'], 'fsdp2-resumed', 'fsdp2', 2,
                    load_path=checkpoint_path(full['run_dir'], 'fsdp2', RESUME_FROM))
    WALL['fsdp2 resumed'] = resumed['seconds']
    assert f'[batch={RESUME_FROM + 1}/{STEPS}]' in resumed['log'] and '[batch=1/' not in resumed['log']
    after = {step: value for step, value in losses(full['run_dir']).items() if step >= RESUME_FROM}
    assert losses(resumed['run_dir']) == after
    resumed_records = _check_ranks_agree_after(resumed['run_dir'])
    assert resumed_records == {step: records[step] for step in UPDATES if step > RESUME_FROM}

    # export from the sharded checkpoint == export from a single-process checkpoint of the same state: the
    # 1-rank run's checkpoint file with its model replaced by the FSDP2 run's full state dict at the end
    sharded_digest, sharded_report = _export(final, work / 'export-sharded')
    checkpoint = torch.load(checkpoint_path(reference['run_dir'], 'ddp', STEPS), map_location='cpu',
                            weights_only=False)
    full_state = torch.load(full['run_dir'] / 'probe' / 'model_state.pt', map_location='cpu', weights_only=False)
    assert full_state.keys() == checkpoint['state']['model'].keys()
    checkpoint['state']['model'] = full_state
    torch.save(checkpoint, work / 'single-process.pt')
    single_digest, single_report = _export(work / 'single-process.pt', work / 'export-single-process')
    assert sharded_digest == single_digest
    assert sharded_report == single_report
    _weights_close(work / 'export-sharded', work / 'export-single-process')
    print(f'FSDP2: worst relative loss difference to 1 rank {worst:.1e}; wall {WALL}; '
          f'test {time.perf_counter() - started:.1f} s')


def _check_ranks_agree_after(run_dir):
    rank0, rank1 = probe_records(run_dir, 0), probe_records(run_dir, 1)
    assert sorted(rank0) == [step for step in UPDATES if step > RESUME_FROM]
    assert rank0 == rank1
    return rank0

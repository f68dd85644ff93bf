"""The projection constraint (``drp_lagrangian`` ``constraint: projection``, ours, issue 26): every mask row's
expected kept count is the ramped target after every optimizer step; with the temperature anneal and
hardening the run ends on hard masks, and the masked model in eval mode is the exported model."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from composer.models import HuggingFaceModel
from composer.optim import ConstantWithWarmupScheduler, DecoupledAdamW
from conftest import perturbed_tiny_gqa_model

from drp_foundry.composer.lagrangian_updater import LagrangianUpdater
from drp_foundry.composer.mask_learner import MaskLearner, find_mask_module
from drp_foundry.pruning import hard_concrete
from drp_foundry.pruning.projection import attainable_count_range, expected_counts, project_log_alpha

TARGET = dict(layers=3, hidden=64, heads=3, kv_heads=1, intermediate=96)  # of 4 / 96 / 6 (2 KV) / 160
ROW_LENGTH = {'layer': 4, 'head': 2, 'intermediate': 160, 'hidden': 96}
FINAL_COUNT = {'layer': 3, 'head': 1, 'intermediate': 96, 'hidden': 64}
COUNT_TOL = 1e-3  # expected kept entries; float32 log-alphas move a 160-entry row's count by ~1e-5


# --- the pure projection ------------------------------------------------------------------

@pytest.mark.parametrize('temperature', [hard_concrete.TEMPERATURE, 0.1])
def test_projection_puts_every_row_on_its_count_and_keeps_the_order(temperature):
    log_alpha = (torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3).clamp(-4.6, 4.6)
    targets = torch.tensor([3.0, 10.0, 20.0, 30.5, 37.0])
    projected = project_log_alpha(log_alpha, targets, temperature)
    assert projected.dtype == log_alpha.dtype and projected.shape == log_alpha.shape
    torch.testing.assert_close(expected_counts(projected, temperature), targets.double(), atol=COUNT_TOL, rtol=0)
    assert projected.min() >= hard_concrete.LOG_ALPHA_MIN and projected.max() <= hard_concrete.LOG_ALPHA_MAX
    for row in range(5):  # a common shift per row: the order is unchanged where no clamp ties entries
        free = (projected[row] > hard_concrete.LOG_ALPHA_MIN + 1e-6) & (projected[row] < hard_concrete.LOG_ALPHA_MAX - 1e-6)
        assert free.sum() >= 5
        assert torch.equal(projected[row][free].argsort(), log_alpha[row][free].argsort())
        above = int((projected[row] > hard_concrete.LOG_ALPHA_MIN + 1e-6).sum())
        assert torch.equal(hard_concrete.keep_top_k(projected[row], above), hard_concrete.keep_top_k(log_alpha[row], above))
    whole = project_log_alpha(log_alpha[1], 12.0, temperature)  # a 1-D mask is one row
    assert abs(float(expected_counts(whole, temperature)) - 12.0) < COUNT_TOL


def test_unattainable_targets_end_at_the_nearest_clamp():
    low, high = attainable_count_range(10)
    assert low == pytest.approx(10 * 0.0471, abs=1e-3) and high == pytest.approx(10 * 0.9980, abs=1e-3)
    log_alpha = torch.zeros(10)
    assert torch.allclose(project_log_alpha(log_alpha, 10.0), torch.full((10,), hard_concrete.LOG_ALPHA_MAX))
    assert torch.allclose(project_log_alpha(log_alpha, 0.0), torch.full((10,), hard_concrete.LOG_ALPHA_MIN))


def test_a_row_split_over_shards_sums_its_partial_counts():
    """A 1-D mask split over two ranks whose halves are equal: summing the partial counts over the 'ranks'
    (here: doubling the local one) gives the shift of the whole row."""
    half = (torch.randn(30, generator=torch.Generator().manual_seed(1)) * 2).clamp(-4.6, 4.6)
    whole = project_log_alpha(torch.cat([half, half]), 25.0)
    local = project_log_alpha(half, 25.0, sum_over_shards=lambda partial: partial * 2, row_length=60)
    torch.testing.assert_close(torch.cat([local, local]), whole)
    wrong = project_log_alpha(half, 25.0, row_length=60)  # without the sum the half alone is put on 25
    assert not torch.allclose(wrong, local)


def test_annealed_temperature():
    beta = hard_concrete.annealed_temperature
    assert beta(0, 10, 20, 0.1) == beta(10, 10, 20, 0.1) == pytest.approx(2 / 3)
    assert beta(15, 10, 20, 0.1) == pytest.approx((2 / 3 + 0.1) / 2)
    assert beta(20, 10, 20, 0.1) == beta(99, 10, 20, 0.1) == pytest.approx(0.1)
    assert beta(9, 10, 10, 0.1) == pytest.approx(2 / 3) and beta(10, 10, 10, 0.1) == pytest.approx(0.1)


# --- in a Composer run (1 rank) ---------------------------------------------------------

source_model = perturbed_tiny_gqa_model


class AfterEveryStep(Callback):
    """At BATCH_END (after the algorithms): the expected count of every row and the state of the masks."""

    def __init__(self):
        self.records = []

    def batch_end(self, state, logger):
        masks = find_mask_module(state.model)
        self.records.append({
            'step': int(state.timestamp.batch), 'temperature': masks.temperature, 'hardened': masks.hardened,
            'counts': {key: expected_counts(masks.log_alpha(key), masks.temperature) for key in masks.granularities},
            'log_alpha': {key: masks.log_alpha(key).detach().clone() for key in masks.granularities}})


def run(steps, init='constant', warmup=4, mask_lr=1.0, save_folder=None, **constraint):
    model = source_model()
    composer_model = HuggingFaceModel(model, use_logits=True)
    rows = torch.randint(0, 512, (4 * steps, 20), generator=torch.Generator().manual_seed(5))
    loader = torch.utils.data.DataLoader([{'input_ids': r, 'labels': r} for r in rows], batch_size=4)
    recorder = AfterEveryStep()
    extra = {} if save_folder is None else dict(save_folder=str(save_folder), save_interval=f'{steps}ba',
                                                 save_filename='final.pt')
    trainer = Trainer(model=composer_model, optimizers=DecoupledAdamW(composer_model.parameters(), lr=1e-3),
                      train_dataloader=loader, max_duration=f'{steps}ba',
                      schedulers=ConstantWithWarmupScheduler(t_warmup='0ba'),
                      algorithms=[MaskLearner(TARGET, init=init, calibration_batches=2, mask_lr=mask_lr),
                                  LagrangianUpdater(warmup_steps=warmup, constraint='projection', **constraint)],
                      callbacks=[recorder], progress_bar=False, log_to_console=False, device='cpu', **extra)
    trainer.fit()
    return composer_model, recorder.records


def ramped_count(key, step, warmup, start=1.0):
    final = FINAL_COUNT[key] / ROW_LENGTH[key]
    fraction = final if step >= warmup else start + (final - start) * step / warmup
    low, high = attainable_count_range(ROW_LENGTH[key])
    return min(max(fraction * ROW_LENGTH[key], low), high)


def test_projection_holds_every_row_on_the_ramp_after_every_step():
    _, records = run(steps=8, warmup=4)
    assert [r['step'] for r in records] == list(range(1, 9))
    for record in records:
        for key, counts in record['counts'].items():
            wanted = ramped_count(key, record['step'], 4)
            assert (counts - wanted).abs().max() < COUNT_TOL, (record['step'], key, counts, wanted)


def test_projection_holds_importance_init_on_target_from_the_first_step():
    _, records = run(steps=6, init='importance', warmup=4, mask_lr=0.1)
    for record in records:
        for key, counts in record['counts'].items():  # no ramp after importance init
            assert (counts - FINAL_COUNT[key]).abs().max() < COUNT_TOL, (record['step'], key, counts)


def test_the_lagrangian_does_not_hold_the_target_in_a_short_run():
    """The control: the same run with the paper's Lagrangian is off target after the ramp."""
    model = source_model()
    composer_model = HuggingFaceModel(model, use_logits=True)
    rows = torch.randint(0, 512, (32, 20), generator=torch.Generator().manual_seed(5))
    loader = torch.utils.data.DataLoader([{'input_ids': r, 'labels': r} for r in rows], batch_size=4)
    recorder = AfterEveryStep()
    Trainer(model=composer_model, optimizers=DecoupledAdamW(composer_model.parameters(), lr=1e-3),
            train_dataloader=loader, max_duration='8ba', schedulers=ConstantWithWarmupScheduler(t_warmup='0ba'),
            algorithms=[MaskLearner(TARGET), LagrangianUpdater(warmup_steps=4)], callbacks=[recorder],
            progress_bar=False, log_to_console=False, device='cpu').fit()
    last = recorder.records[-1]
    assert max(float((last['counts'][key] - FINAL_COUNT[key]).abs().max()) for key in FINAL_COUNT) > 1.0


def test_anneal_and_hardening_end_on_the_exported_model(tmp_path):
    from drp_foundry.pruning.fidelity import undecided_share

    steps = 20
    composer_model, records = run(steps=steps, init='importance', warmup=0, mask_lr=0.1, save_folder=tmp_path / 'run',
                                  anneal_start_fraction=0.3, final_temperature=0.1, harden_fraction=0.2)
    masks = find_mask_module(composer_model)
    by_step = {r['step']: r for r in records}
    assert by_step[6]['temperature'] == pytest.approx(2 / 3) and by_step[16]['temperature'] == pytest.approx(0.1)
    assert [r['hardened'] for r in records] == [False] * 16 + [True] * 4  # steps 16-19 (0-based) hardened
    for step in (18, 19, 20):  # decided at the first hardened step, then frozen
        for key in masks.granularities:
            assert torch.equal(by_step[step]['log_alpha'][key], by_step[17]['log_alpha'][key])
            assert not torch.equal(by_step[16]['log_alpha'][key], by_step[17]['log_alpha'][key])
    for record in records:  # on target at every step, whatever the temperature
        for key, counts in record['counts'].items():
            assert (counts - FINAL_COUNT[key]).abs().max() < COUNT_TOL, (record['step'], key)
    # hard at the end: at beta 0.1 no gate disagrees with its exported value more than 5% of the time (every row
    # here keeps 50-75% of its entries, inside the 29-86% where hardening leaves every entry decided)
    share = undecided_share(masks)
    assert share['total'] == 0.0, share
    # the masked model in eval mode (the run's eval_mask_mode 'expected') is the exported model
    hf_model = composer_model.model.eval()
    exported = export_model(tmp_path / 'run' / 'final.pt')
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, exported(tokens).logits, rtol=0, atol=1e-4)


def export_model(checkpoint_path):
    """The exported model of a checkpoint (``drp_foundry.export``'s masks, fold and slice), in memory."""
    from drp_foundry.export import build_masked_model, load_composer_checkpoint
    from drp_foundry.pruning.export import fold_and_slice
    from drp_foundry.pruning.hf_injection import get_mask_module

    checkpoint = load_composer_checkpoint(checkpoint_path)
    masked = build_masked_model(checkpoint, checkpoint_path)
    pruned, _ = fold_and_slice(masked, get_mask_module(masked).deterministic('target'))
    return pruned.eval()

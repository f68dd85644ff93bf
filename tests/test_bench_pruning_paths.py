"""bench/pruning_paths.py (the loop of the quality and budget benches) and bench/pruning_budget.py's reading.

The loop must train what the recipes train: every path on one learning-rate curve over the budget, the
learned masks exactly on target at the export (projection), the one-shot control identical to one-shot
at its start, and FLOPs that count the masked source during pruning.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_bench, perturbed_tiny_gqa_model

TARGET = dict(layers=3, hidden=48, heads=3, kv_heads=1, intermediate=80)


def _load(name: str):
    return load_bench(name)


@pytest.fixture(scope='module')
def paths():
    return _load('pruning_paths')


@pytest.fixture(scope='module')
def budget():
    return _load('pruning_budget')


def _batches(steps: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (2, 16), generator=generator) for _ in range(steps)]


def _run(paths, key, steps=10, **settings):
    eval_sets = {'a': torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(9))}
    batches = _batches(steps)
    lines = []
    result = paths.run_path(key, lambda: perturbed_tiny_gqa_model().train(), TARGET, batches, batches[:2], eval_sets,
                            paths.PathSettings(steps=steps, lr=1e-3, **settings), lines.append, seed=0)
    return result, lines


def test_one_curve_over_the_budget_whatever_the_stages(paths):
    curve = [paths.lr_multiplier(step, 100, 3) for step in range(100)]
    assert curve[0] == pytest.approx(1 / 3) and curve[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(curve[2:], curve[3:]))  # no second warm-up at the export (step 20)
    assert curve[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize('key', ['l0_importance', 'l0_constant'])
def test_learned_masks_end_exactly_on_target_with_the_projection(paths, key):
    result, _ = _run(paths, key, steps=10, prune_fraction=0.5, distill_alpha=0.5)
    assert result['expected_params_at_export'] == pytest.approx(result['target_params'], rel=1e-4)
    # head masks are KV groups: 3 query heads over 1 of the 2 KV groups
    assert result['kept_layer_counts']['head'] == [1] and result['kept_layer_counts']['intermediate'] == [80]
    assert result['steps'] == 10 and result['prune_tokens'] == 5 * 32
    # hardened for the last step: the masked model as trained is the exported one
    masked, exported = result['masked_eval']['a'], result['exported_eval']['a']
    assert masked == pytest.approx(exported, abs=1e-4)


def test_the_fixed_mask_control_starts_at_the_one_shot_model_and_pays_for_the_masked_source(paths):
    fixed, fixed_log = _run(paths, 'oneshot_fixed', steps=4, prune_fraction=0.5, distill_alpha=0.0)
    oneshot, oneshot_log = _run(paths, 'oneshot', steps=4, distill_alpha=0.0)
    assert fixed['history'][0]['stage'] == 'step 0 (masked)' and oneshot['history'][0]['stage'] == 'one-shot'
    assert fixed['history'][0]['losses']['a'] == pytest.approx(oneshot['history'][0]['losses']['a'], abs=2e-2)  # bf16
    assert fixed['tokens'] == oneshot['tokens'] == 4 * 32
    assert fixed['flops'] > oneshot['flops']  # two steps of the masked source cost more than the pruned model
    source = perturbed_tiny_gqa_model()
    pruned_flops = paths.forward_flops_per_token(oneshot_model_of(paths), 16)
    expected = 3 * 32 * (2 * paths.forward_flops_per_token(source, 16) + 2 * pruned_flops)
    assert fixed['flops'] == pytest.approx(expected)


def oneshot_model_of(paths):
    from drp_foundry.oneshot import oneshot_prune

    model, _, _ = oneshot_prune(perturbed_tiny_gqa_model(), TARGET, [row for b in _batches(2) for row in b])
    return model


def test_distillation_adds_the_teachers_forward_to_the_flops(paths):
    plain, _ = _run(paths, 'oneshot', steps=2, distill_alpha=0.0)
    distilled, _ = _run(paths, 'oneshot', steps=2, distill_alpha=0.5)
    teacher = paths.forward_flops_per_token(perturbed_tiny_gqa_model(), 16)
    assert distilled['flops'] - plain['flops'] == pytest.approx(2 * 32 * teacher)


def test_the_budget_study_picks_the_constraint_the_product_would(budget):
    assert budget.constraint_for(100) == 'projection'  # 80 steps after the ramp: the Lagrangian warns
    assert budget.constraint_for(400) == 'lagrangian'  # 320 >= 310


def _row(budget_steps, mean, se, n=3):
    from scipy import stats

    half = stats.t.ppf(0.975, n - 1) * se
    return {'budget': budget_steps, 'tokens_per_param': budget_steps / 1000,
            'diffs': {'l0_importance': {'n': n, 'mean': mean, 'se': se, 'lo': mean - half, 'hi': mean + half}}}


def test_the_crossover_is_the_first_budget_from_which_learned_masks_win_at_every_larger_one(budget):
    rows = [_row(40, +0.05, 0.01), _row(100, -0.05, 0.01), _row(250, +0.01, 0.01), _row(500, -0.04, 0.005),
            _row(1000, -0.08, 0.01)]
    assert budget.crossover(rows, 'l0_importance')['budget'] == 500  # 250 is not a win: 100 does not count
    assert budget.crossover(rows[:3], 'l0_importance') is None  # the largest budget is not a win
    assert budget.crossover([_row(40, -0.05, 0.01, n=1)], 'l0_importance') is None  # one seed: no interval
